"""``byok org ...`` through click's runner, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from byok_hookspecs import CredentialSource
from click.testing import CliRunner, Result
from keys_support import leaks, random_key

from byok_plugin.cli import main
from byok_plugin.cli.demo import DemoStack
from byok_plugin.host.emulator import EmulatorServer

TRIAGE = str(
    Path(__file__).resolve().parents[1] / "sample_workflows" / "support-ticket-triage.json"
)


def _run(args: list[str], env: dict[str, str], stdin: str | None = None) -> Result:
    result = CliRunner().invoke(main, args, input=stdin, env=env, catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def env(isolated_home: Path, database_url: str) -> dict[str, str]:
    env = {
        "BYOK_HOME": str(isolated_home),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_VALIDATE_KEYS": "0",
    }
    assert _run(["init"], env).exit_code == 0
    return env


def test_an_organization_key_is_inherited_and_shown_masked(env: dict[str, str]) -> None:
    assert "created" in _run(["org", "create", "acme"], env).output
    assert "already exists" in _run(["org", "create", "acme"], env).output
    assert _run(["org", "attach", "acme", "--workspace", "team-a"], env).exit_code == 0
    secret = random_key("openai")
    stored = _run(["org", "set-key", "acme", "--provider", "openai"], env, stdin=secret)
    assert stored.exit_code == 0, stored.output
    assert "for organization 'acme'" in stored.output
    listed = _run(["org", "keys", "acme", "--json"], env)
    listed_document = json.loads(listed.output)
    assert listed_document["version"] == 1
    assert listed_document["organization"] == "acme"
    (key,) = listed_document["keys"]
    assert key["provider"] == "openai"
    assert key["workspace_id"] == "org:acme"
    inherited = _run(["org", "inherited", "--workspace", "team-a", "--json"], env)
    shown = json.loads(inherited.output)
    assert next(iter(shown)) == "version"
    assert shown["organization_id"] == "acme"
    assert shown["opted_out"] is False
    assert [(k["id"], k["inherited"], k["active"]) for k in shown["keys"]] == [
        (key["id"], True, True)
    ]
    table = _run(["org", "inherited", "--workspace", "team-a"], env)
    assert key["id"] in table.output
    assert "organization acme" in table.output
    # opted out: still listed, marked unused
    assert "does not use" in _run(["org", "opt-out", "--workspace", "team-a"], env).output
    shown = json.loads(_run(["org", "inherited", "-w", "team-a", "--json"], env).output)
    assert shown["opted_out"] is True
    assert shown["keys"][0]["active"] is False
    assert "opted out" in _run(["org", "inherited", "-w", "team-a"], env).output
    assert "uses" in _run(["org", "opt-out", "-w", "team-a", "--undo"], env).output
    # never the value, anywhere
    every = listed.output + inherited.output + table.output + stored.output
    assert leaks(every, [secret]) == []
    deleted = _run(["org", "delete-key", "acme", "-p", "openai", "--key-id", key["id"]], env)
    assert key["id"] in deleted.output
    assert "inherits no keys" in _run(["org", "inherited", "-w", "team-a"], env).output


def test_mistakes_get_a_clear_message_and_nothing_is_written(env: dict[str, str]) -> None:
    bad = _run(["org", "create", "bad id"], env)
    assert bad.exit_code == 2
    assert "organization id" in bad.output
    missing = _run(["org", "attach", "nope", "-w", "team-a"], env)
    assert missing.exit_code == 1
    assert "no organization 'nope'" in missing.output
    reserved = _run(["org", "create", "acme"], env)
    assert reserved.exit_code == 0
    reserved = _run(["org", "attach", "acme", "-w", "org:other"], env)
    assert reserved.exit_code == 2
    assert "reserved" in reserved.output
    lonely = _run(["org", "opt-out", "-w", "team-z"], env)
    assert lonely.exit_code == 2
    assert "belongs to no organization" in lonely.output
    unknown = _run(["org", "set-key", "nope", "-p", "openai"], env, stdin=random_key("openai"))
    assert unknown.exit_code == 1
    assert "no organization 'nope'" in unknown.output
    assert "belongs to no organization" in _run(["org", "inherited", "-w", "team-z"], env).output


def test_a_run_on_inherited_keys_is_byok_and_recorded_as_organization(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """``byok run`` through the real plugin and the emulator: a workspace with no key of its own
    runs on its organization's keys, charged 0, recorded with source ``organization``."""
    stack = DemoStack(tmp_path / "home", emulator)
    try:
        env = stack.environ
        assert _run(["org", "create", "acme"], env).exit_code == 0
        assert _run(["org", "attach", "acme", "-w", "team-a"], env).exit_code == 0
        for provider in ("openai", "anthropic"):
            stored = _run(
                ["org", "set-key", "acme", "-p", provider, "--no-test"],
                env,
                stdin=stack.workspace_keys[provider],
            )
            assert stored.exit_code == 0, stored.output
        result = _run(
            ["run", TRIAGE, "-w", "team-a", "-i", "ticket=My invoice is wrong", "--json"], env
        )
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        agents = [b for b in document["blocks"] if b["type"] == "agent" and b["source"]]
        assert agents
        assert {b["source"] for b in agents} == {"organization"}
        assert all(Decimal(b["charge"]) == 0 for b in agents)
        rows = list(stack.app.ledger.rows(workspaces=["team-a"]))
        assert rows
        assert {r.source for r in rows} == {CredentialSource.ORGANIZATION}
        assert all(r.amount == 0 and r.list_cost is not None and r.list_cost > 0 for r in rows)
        # the emulator saw the organization's keys
        seen = {c.provider for c in emulator.calls() if c.method == "POST"}
        assert seen <= {"openai", "anthropic"}
        assert leaks(result.output, list(stack.workspace_keys.values())) == []
    finally:
        stack.close()
