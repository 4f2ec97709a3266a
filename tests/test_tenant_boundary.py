"""The tenant boundary, tried as an attacker who can write a workflow.

- A block key may not read the host's environment: the master keyring, a cloud secret and the
  platform's own keys never reach a provider through a workflow; ``byok run`` refuses before any
  call, with exit status 2 and the JSON path.
- A block names a stored key by label instead: that key serves the block, billed as BYOK.
- A provider (or a gateway) that echoes the key back in its errors, in any form, leaks it nowhere:
  not in stdout, stderr, ``--json``, the database or the logs.

Everything runs through the real ``byok`` command and plugin, against the provider emulator or a
fake provider on loopback.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from byok_plugin.cli import main
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer

ROOT = Path(__file__).resolve().parents[1]
RELEASE_NOTES = str(ROOT / "sample_workflows" / "release-notes-translation.json")


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    """The demo's installation (store, master key, platform keys, emulator) on a real SQLite file
    and on a real PostgreSQL database."""
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def byok(env: dict[str, str | None], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def blocks_of(result: Result) -> dict[str, Any]:
    return {b["block"]: b for b in json.loads(result.stdout)["blocks"]}


def one_block(tmp_path: Path, key: dict[str, str], provider: str = "openai") -> Path:
    model = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5"}[provider]
    doc = {
        "name": "probe",
        "version": "1",
        "blocks": {
            "ask": {
                "type": "agent",
                "model": model,
                "prompt": "Say hello.",
                "key": key,
                "max_tokens": 50,
                "retries": 0,
            }
        },
    }
    path = tmp_path / f"probe-{secrets.token_hex(4)}.json"
    path.write_text(json.dumps(doc))
    return path


# --- the three attacks: a block key that reads the host's environment ---------------------------


def _attacks(stack: DemoStack) -> dict[str, tuple[str, dict[str, str], str]]:
    """name -> (variable, extra environment, the secret that must not leave)."""
    aws = "wJalrXUtnFEMI/K7MDENG/" + secrets.token_urlsafe(24)
    platform = stack.platform_keys["openai"]
    return {
        "master keyring": ("BYOK_ENCRYPTION_KEYS", {}, stack.environ["BYOK_ENCRYPTION_KEYS"]),
        "aws-like secret": ("AWS_SECRET_ACCESS_KEY", {"AWS_SECRET_ACCESS_KEY": aws}, aws),
        "platform pool variable": ("BYOK_PLATFORM_KEYS_OPENAI", {}, platform),
        "numbered platform key": ("OPENAI_API_KEY_1", {"OPENAI_API_KEY_1": platform}, platform),
        "platform key under another name": (
            "TEAM_OPENAI_KEY",
            {"TEAM_OPENAI_KEY": platform, "BYOK_BLOCK_KEY_ENV_ALLOW": "TEAM_"},
            platform,
        ),
    }


ATTACKS = [
    "master keyring",
    "aws-like secret",
    "platform pool variable",
    "numbered platform key",
    "platform key under another name",
]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("allow", ["", "BYOK_,OPENAI_,TEAM_"], ids=["default", "allow-all"])
def test_a_block_key_never_reads_the_hosts_secrets(
    stack: DemoStack, tmp_path: Path, attack: str, allow: str
) -> None:
    variable, extra, secret = _attacks(stack)[attack]
    env: dict[str, str | None] = {**stack.environ, **extra}
    if allow and "BYOK_BLOCK_KEY_ENV_ALLOW" not in extra:
        env["BYOK_BLOCK_KEY_ENV_ALLOW"] = allow
    path = one_block(tmp_path, {"env": variable})
    for command in (["run", str(path), "-w", BYOK_WORKSPACE], ["validate", str(path)]):
        result = byok(env, *command)
        assert result.exit_code == 2, result.output
        assert "$.blocks.ask.key.env: " in result.output
        assert variable in result.output
        assert "Traceback" not in result.output
        assert secret not in result.output
    assert stack.emulator.calls() == []  # refused before any call


def test_the_refusals_say_why(stack: DemoStack, tmp_path: Path) -> None:
    attacks = _attacks(stack)
    expected = {
        "master keyring": "reads no block key from the environment",
        "platform pool variable": "byok's own configuration",
        "numbered platform key": "where platform keys are read from",
        "platform key under another name": "holds one of the platform's keys",
    }
    for attack, why in expected.items():
        variable, extra, _ = attacks[attack]
        env: dict[str, str | None] = {"BYOK_BLOCK_KEY_ENV_ALLOW": "BYOK_,OPENAI_"}
        if attack == "master keyring":
            env = {"BYOK_BLOCK_KEY_ENV_ALLOW": None}
        env = {**stack.environ, **env, **extra}
        result = byok(env, "run", str(one_block(tmp_path, {"env": variable})), "-w", "acme")
        assert result.exit_code == 2
        assert why in result.output, (attack, result.output)


def test_an_allowed_variable_serves_a_local_run_as_the_blocks_own_key(
    stack: DemoStack, tmp_path: Path
) -> None:
    team_key = stack.emulator.new_key("openai", label="team-openai")
    env: dict[str, str | None] = {
        **stack.environ,
        "BYOK_BLOCK_KEY_ENV_ALLOW": "TEAM_",
        "TEAM_OPENAI_KEY": team_key,
    }
    path = one_block(tmp_path, {"env": "TEAM_OPENAI_KEY"})
    result = byok(env, "run", str(path), "-w", PLATFORM_WORKSPACE, "--json")
    assert result.exit_code == 0, result.output
    (call,) = blocks_of(result)["ask"]["calls"]
    assert call["source"] == "block"
    assert Decimal(call["charge"]["amount"]) == 0
    (seen,) = stack.emulator.calls("openai")
    assert seen.key_label == "team-openai"
    assert team_key not in result.output


# --- a block names a stored key by label --------------------------------------------------------


def test_a_label_selected_key_serves_the_block_as_byok(stack: DemoStack) -> None:
    info = stack.app.key_service(stack.pm).set_key(
        OPERATOR, PLATFORM_WORKSPACE, "anthropic", stack.block_key, label="localization", test=False
    )
    result = byok(
        {**stack.environ},
        "run",
        RELEASE_NOTES,
        "-w",
        PLATFORM_WORKSPACE,
        "-i",
        "changelog=fix: login loop",
        "--json",
    )
    assert result.exit_code == 0, result.output
    blocks = blocks_of(result)
    (translate,) = blocks["translate"]["calls"]
    assert (translate["source"], translate["key_id"]) == ("workspace", info.key.id)
    assert Decimal(translate["charge"]["amount"]) == 0
    (notes,) = blocks["notes"]["calls"]
    assert notes["source"] == "platform"  # the workspace has no openai key: the platform's
    # the emulator saw that very key for the translation, and the platform's for the notes
    (seen,) = stack.emulator.calls("anthropic")
    assert seen.used_key(stack.block_key)
    assert [c.key_label for c in stack.emulator.calls("openai")] == ["platform-openai"]
    # the ledger: workspace source (BYOK), charged 0, list cost kept
    rows = {r.block_id: r for r in stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE])}
    row = rows["translate"]
    assert (row.source.value, row.key_id, row.amount) == ("workspace", info.key.id, 0)
    assert row.list_cost is not None
    assert row.list_cost > 0
    assert rows["notes"].amount > 0
    assert stack.block_key not in result.output


@pytest.mark.parametrize("state", ["missing", "disabled"])
def test_a_missing_or_disabled_label_fails_the_block_without_a_platform_call(
    stack: DemoStack, state: str
) -> None:
    service = stack.app.key_service(stack.pm)
    if state == "disabled":
        service.set_key(
            OPERATOR,
            PLATFORM_WORKSPACE,
            "anthropic",
            stack.block_key,
            label="localization",
            test=False,
        )
        service.disable(OPERATOR, PLATFORM_WORKSPACE, "anthropic", label="localization")
    stack.set_fallback_policy(PLATFORM_WORKSPACE, "on_error")  # a fallback is still never taken
    result = byok(
        {**stack.environ}, "run", RELEASE_NOTES, "-w", PLATFORM_WORKSPACE, "-i", "changelog=x"
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "block 'translate' failed" in result.stderr
    assert "asks for the anthropic key labelled 'localization'" in result.stderr
    assert ("is disabled" if state == "disabled" else "does not exist") in result.stderr
    assert "the platform key is not used" in result.stderr
    assert stack.emulator.calls("anthropic") == []
    rows = stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE])
    assert [r.block_id for r in rows] == ["notes"]


# --- an echoing provider leaks the key nowhere ---------------------------------------------------


def echoes(key: str) -> list[str]:
    """The key as echoing providers and gateways send it back, and random pieces of it."""
    rng = secrets.SystemRandom()
    pieces = []
    for _ in range(4):
        length = rng.randint(8, 20)
        start = rng.randint(0, len(key) - length)
        pieces.append(key[start : start + length])
    return [
        f"Incorrect API key provided: {key}",
        f"key prefix {key[:16]}...",
        f"authorization: bearer {key.lower()}",
        f"AUTHORIZATION: BEARER {key.upper()}",
        json.dumps({"received": {"headers": {"authorization": f"Bearer {key}"}}}),
        json.dumps({"keys": [key, {"k": key}]}).replace("/", "\\/"),
        f"url: /v1/chat?api_key={quote(key, safe='')}",
        quote(key, safe=""),
        f"x-api-key={key}",
        *(f"fragment {p} here" for p in pieces),
    ]


class EchoProvider(BaseHTTPRequestHandler):
    """An OpenAI-shaped provider that answers every call with an error echoing the key."""

    status = 401

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        key = (self.headers.get("authorization") or "").removeprefix("Bearer ")
        messages = echoes(key)
        body = json.dumps(
            {
                "error": {
                    "message": " | ".join(messages),
                    "type": "invalid_request_error",
                    "code": f"bad_key_{key[-12:]}",
                    "param": messages,
                }
            }
        ).encode()
        if self.status == 200:  # a streamed answer whose error event echoes the key
            event = json.dumps({"error": json.loads(body)["error"]})
            data = f"data: {event}\n\n".encode()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("x-request-id", f"req_{key[:10]}")
        if self.status == 429:
            self.send_header("retry-after", "0")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def echo_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, type[EchoProvider]]]:
    handler = type("Echo", (EchoProvider,), {"status": 401})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        server.shutdown()
        server.server_close()


def database_text(stack: DemoStack) -> str:
    """Every row of every table of the store, as text (and the SQLite files' raw bytes)."""
    engine = stack.app.engine
    parts = []
    with engine.connect() as conn:
        for table in sa.inspect(engine).get_table_names():
            parts += [repr(tuple(row)) for row in conn.execute(sa.text(f'SELECT * FROM "{table}"'))]
    for path in stack.home.rglob("*"):
        if path.is_file():
            parts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(parts)


@pytest.mark.parametrize("status", [401, 429, 500, 200], ids=["401", "429", "500", "stream-error"])
@pytest.mark.parametrize("label", [False, True], ids=["workspace-key", "labelled-key"])
def test_an_echoing_provider_leaks_the_key_nowhere(
    stack: DemoStack,
    tmp_path: Path,
    echo_server: tuple[str, type[EchoProvider]],
    caplog: pytest.LogCaptureFixture,
    status: int,
    label: bool,
) -> None:
    url, handler = echo_server
    handler.status = status
    key = stack.workspace_keys["openai"]
    if label:
        key = "sk-proj-" + secrets.token_urlsafe(40)
        stack.app.key_service(stack.pm).set_key(
            OPERATOR, BYOK_WORKSPACE, "openai", key, label="team", test=False
        )
    random_part = key.removeprefix("sk-proj-")
    assert len(random_part) >= 40
    forbidden = [key, random_part, key[: len(key) // 2], key[len(key) // 2 :]]
    path = one_block(tmp_path, {"label": "team"}) if label else None
    if path is None:
        doc = json.loads(one_block(tmp_path, {"label": "x"}).read_text())
        del doc["blocks"]["ask"]["key"]
        path = tmp_path / "plain.json"
        path.write_text(json.dumps(doc))
    env: dict[str, str | None] = {**stack.environ, "BYOK_OPENAI_BASE_URL": url}
    outputs = []
    with caplog.at_level(logging.DEBUG):
        for as_json in ([], ["--json"]):
            stream = ["--stream"] if status == 200 else []
            result = byok(env, "run", str(path), "-w", BYOK_WORKSPACE, *as_json, *stream)
            assert result.exit_code == 1, result.output
            assert (f"HTTP {status}" if status != 200 else "server error") in result.output
            assert "[redacted]" in result.output  # the provider's message is kept, scrubbed
            outputs += [result.stdout, result.stderr, result.output]
            stack.app.key_service(stack.pm).enable(OPERATOR, BYOK_WORKSPACE, "openai")  # cooldowns
    searched = {
        "output": "\n".join(outputs),
        "logs": caplog.text,
        "database": database_text(stack),
    }
    for where, text in searched.items():
        low = text.lower()
        for secret in forbidden:
            assert secret.lower() not in low, f"{where} holds the key or a part of it"


# --- a 5xx is not a refusal: the block's own retry may use the key again -------------------------


@pytest.mark.parametrize("labelled", [True, False])
def test_one_5xx_on_a_workspace_key_puts_it_in_no_cooldown_and_the_retry_succeeds(
    stack: DemoStack, labelled: bool
) -> None:
    import asyncio

    from byok_plugin.host.emulator import Fault, FaultKind
    from byok_plugin.host.providers import NO_RETRY
    from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
    from byok_plugin.host.workflow import parse_workflow

    block: dict[str, Any] = {"type": "agent", "model": "claude-sonnet-4-5", "prompt": "Hello."}
    workspace = BYOK_WORKSPACE
    if labelled:
        workspace = PLATFORM_WORKSPACE
        block["key"] = {"label": "localization"}
        stack.app.key_service(stack.pm).set_key(
            OPERATOR, workspace, "anthropic", stack.block_key, label="localization", test=False
        )
    workflow = parse_workflow({"name": "one", "version": "1", "blocks": {"a": block}})
    stack.emulator.add_fault(Fault(FaultKind.SERVER_ERROR, provider="anthropic", times=1))

    async def go() -> Any:
        options = RunnerOptions(block_retries=2)
        async with WorkflowRunner.open(
            stack.pm, environ=stack.environ, options=options, retry=NO_RETRY
        ) as runner:
            return await runner.run(workflow, actor=OPERATOR, workspace_id=workspace, inputs={})

    result = asyncio.run(go())
    assert result.ok, result.error
    assert result.blocks["a"].attempts == 2
    assert len(stack.emulator.calls("anthropic")) == 2  # the 5xx, then the retry on the same key
    assert stack.app.audit_store.events(workspace, action="key.cooldown") == []
