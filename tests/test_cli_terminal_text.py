"""Text a terminal would act on is shown escaped: ESC sequences from a model's answer, a ledger's
workflow id or a workflow file never reach the terminal raw.

A security review printed ``x\\u001b]0;PWNED\\u0007\\u001b[2J\\u001b[31mFAKE: all charges refunded``
through ``byok run`` (the table title, and a model's answer under ``output ...:``) and ``byok
usage --by workflow`` (table and CSV): the terminal's title changed, the screen was cleared and
the fake line shown in red. Each test here fails when such a character is printed as it is.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import click
import pytest
from byok_hookspecs import ByokError, Charge, CredentialSource, Usage, UsageRecord
from click.testing import CliRunner, Result
from rich.console import Console

from byok_plugin.app import App
from byok_plugin.cli import main
from byok_plugin.cli.demo import BYOK_WORKSPACE, DemoStack
from byok_plugin.cli.keys import user_errors
from byok_plugin.cli.run import RunProgress
from byok_plugin.cli.text import plain, printable
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.run_result import BlockResult, BlockStatus
from byok_plugin.host.runner import RunEvent
from byok_plugin.host.workflow import parse_workflow
from byok_plugin.settings import Settings

ATTACK = "x\u001b]0;PWNED\u0007\u001b[2J\u001b[31mFAKE: all charges refunded\u001b[0m"
#: what a terminal acts on, one of each kind
UNSAFE = {
    "ESC": "\x1b",
    "BEL": "\x07",
    "BS": "\x08",
    "CR": "\r",
    "NUL": "\x00",
    "DEL": "\x7f",
    "C1 CSI": "\x9b",
    "C1 OSC": "\x9d",
    "line separator": "\u2028",
    "right-to-left override": "\u202e",
    "right-to-left isolate": "\u2067",
    "lone surrogate": "\udc80",
}


def _raw_controls(text: str) -> list[str]:
    """The characters of ``text`` in :data:`UNSAFE` (ESC included)."""
    return [c for c in text if c in UNSAFE.values()]


# --- printable() and plain() --------------------------------------------------------------------


@pytest.mark.parametrize("char", UNSAFE.values(), ids=UNSAFE.keys())
def test_printable_writes_each_unsafe_character_as_its_code(char: str) -> None:
    shown = printable(f"a{char}b")
    assert shown == f"a\\u{ord(char):04x}b"
    assert printable(f"a{char}b", lines=True) == shown
    assert plain(f"a{char}b").plain == shown


def test_line_breaks_and_tabs_are_kept_only_for_multi_line_text() -> None:
    assert printable("one\ntwo\tthree") == "one\\u000atwo\\u0009three"
    assert printable("one\ntwo\tthree", lines=True) == "one\ntwo\tthree"
    assert plain("one\ntwo", lines=True).plain == "one\ntwo"


def test_printable_text_is_left_as_it_is() -> None:
    text = "Grüße, 分类 🎫 — [bold]not markup[/] \\u001b :smile: ‘quotes’ é\u0301 \u00a0nbsp"
    assert printable(text) == text
    assert plain(text).plain == text


def test_the_reported_name_prints_as_its_codes() -> None:
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=200).print(plain(ATTACK))
    assert "\x1b]0;" not in out.getvalue()
    assert "\x1b[2J" not in out.getvalue()
    assert "\\u001b]0;PWNED\\u0007\\u001b[2J" in out.getvalue()


# --- byok run ---------------------------------------------------------------------------------


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def _echo_flow(tmp_path: Path) -> Path:
    """A workflow whose output is the model's answer (the emulator's answer quotes the prompt)."""
    flow = tmp_path / "echo.json"
    flow.write_text(
        json.dumps(
            {
                "name": "echo",
                "version": "1",
                "inputs": {"t": {"type": "string"}},
                "blocks": {
                    "start": {"type": "input"},
                    "a": {"type": "agent", "model": "gpt-4o-mini", "prompt": "{{start.t}}"},
                    "out": {"type": "output", "value": "{{a.content}}"},
                },
                "edges": [{"from": "start", "to": "a"}, {"from": "a", "to": "out"}],
            }
        )
    )
    return flow


def _byok(stack: DemoStack, *args: str, terminal: bool = False) -> Result:
    env = dict(stack.environ)
    if terminal:  # Rich writes as it would to a terminal (its own styles are ESC sequences)
        env["FORCE_COLOR"] = "1"
    return CliRunner().invoke(main, list(args), env=env)


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_byok_run_shows_a_model_answer_s_escape_sequences_as_codes(
    stack: DemoStack, tmp_path: Path, terminal: bool
) -> None:
    flow = _echo_flow(tmp_path)
    result = _byok(
        stack, "run", str(flow), "-w", BYOK_WORKSPACE, "-i", f"t={ATTACK}", terminal=terminal
    )
    assert result.exit_code == 0, result.output
    answer = result.stdout.split("output out:", 1)[1]
    assert "\\u001b]0;PWNED\\u0007\\u001b[2J\\u001b[31mFAKE:" in answer  # the answer is there
    for sequence in ("\x1b]0;", "\x07", "\x1b[2J", "\x1b[31mFAKE"):
        assert sequence not in result.output


def test_byok_run_json_escapes_what_a_terminal_acts_on_and_keeps_the_value(
    stack: DemoStack, tmp_path: Path
) -> None:
    # C1 and bidi characters: json.dumps(ensure_ascii=False) writes them as they are
    said = "pay\u202eusd001 \x9b2J done"
    flow = _echo_flow(tmp_path)
    result = _byok(stack, "run", str(flow), "-w", BYOK_WORKSPACE, "-i", f"t={said}", "--json")
    assert result.exit_code == 0, result.output
    assert _raw_controls(result.stdout) == []
    assert "\\u202e" in result.stdout
    assert "\\u009b" in result.stdout
    assert said in json.loads(result.stdout)["outputs"]["out"]  # the same JSON value


def test_a_template_quoted_in_an_error_is_shown_escaped(tmp_path: Path) -> None:
    doc = json.loads(_echo_flow(tmp_path).read_text())
    doc["blocks"]["a"]["prompt"] = "{{\x1b[2J\x1b]0;PWNED\x07}}"
    flow = tmp_path / "bad.json"
    flow.write_text(json.dumps(doc))
    for command in (["validate", str(flow)], ["run", str(flow), "-w", "acme", "-i", "t=x"]):
        result = CliRunner().invoke(main, command, env={"BYOK_HOME": str(tmp_path / "home")})
        assert result.exit_code == 2, result.output
        assert "$.blocks.a.prompt: {{\\u001b[2J\\u001b]0;PWNED\\u0007}} is not a reference" in (
            result.output
        )
        assert _raw_controls(result.output) == []


def test_progress_shows_a_block_error_escaped_live_and_in_lines(tmp_path: Path) -> None:
    # a provider's error message is quoted in a block's error
    workflow = parse_workflow(json.loads(_echo_flow(tmp_path).read_text()))
    failed = BlockResult("a", "agent", BlockStatus.FAILED, error=f"provider said: {ATTACK}")
    screen = io.StringIO()
    live = Console(file=screen, force_terminal=True, width=200)
    with RunProgress(workflow, live, live=True) as progress:
        progress(RunEvent("finished", "a", "agent", result=failed))
    lines = io.StringIO()
    with RunProgress(workflow, Console(file=lines, width=1000), live=False) as progress:
        progress(RunEvent("finished", "a", "agent", result=failed))
    for shown in (screen.getvalue(), lines.getvalue()):
        assert "provider said: x\\u001b]0;PWNED\\u0007\\u001b[2J" in shown
        assert "\x1b]0;" not in shown
        assert "\x1b[2J" not in shown
        assert "\x07" not in shown


# --- byok usage ---------------------------------------------------------------------------------


@pytest.fixture
def ledger_env(tmp_path: Path) -> dict[str, str]:
    """A ledger with a call whose workflow id holds the reported escape sequences (recorded
    before workflow names were checked, or by another host)."""
    environ = {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": f"sqlite:///{tmp_path / 'byok.db'}",
        "COLUMNS": "300",
    }
    app = App(Settings.from_environ(environ))
    try:
        for i, workflow in enumerate((ATTACK, "=cmd\x1b[2J", "plain-flow")):
            app.ledger.record(
                UsageRecord(
                    idempotency_key=f"run-{i}:b:1",
                    workspace_id="acme",
                    usage=Usage("openai", "gpt-4o-mini", input_tokens=10, output_tokens=5),
                    charge=Charge(
                        amount=Decimal("0.5"), reason="platform", list_cost=Decimal("0.5")
                    ),
                    source=CredentialSource.PLATFORM,
                    occurred_at=datetime(2026, 11, 3, tzinfo=UTC),
                    workflow_id=workflow,
                )
            )
    finally:
        app.close()
    return environ


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_byok_usage_by_workflow_shows_a_workflow_id_escaped(
    ledger_env: dict[str, str], terminal: bool
) -> None:
    env = dict(ledger_env, **({"FORCE_COLOR": "1"} if terminal else {}))
    result = CliRunner().invoke(main, ["usage", "--by", "workflow"], env=env)
    assert result.exit_code == 0, result.output
    assert "x\\u001b]0;PWNED\\u0007\\u001b[2J\\u001b[31mFAKE: all charges refunded" in result.output
    assert "plain-flow" in result.output
    for sequence in ("\x1b]0;", "\x07", "\x1b[2J", "\x1b[31mFAKE"):
        assert sequence not in result.output


def test_byok_usage_csv_shows_a_workflow_id_escaped_and_formulas_quoted(
    ledger_env: dict[str, str],
) -> None:
    result = CliRunner().invoke(main, ["usage", "--by", "workflow", "--csv"], env=ledger_env)
    assert result.exit_code == 0, result.output
    assert _raw_controls(result.output) == []
    workflows = {row["workflow"] for row in csv.DictReader(io.StringIO(result.output))}
    assert workflows == {
        "x\\u001b]0;PWNED\\u0007\\u001b[2J\\u001b[31mFAKE: all charges refunded\\u001b[0m",
        "'=cmd\\u001b[2J",  # the formula quote, then the text escaped
        "plain-flow",
    }


def test_a_package_error_s_message_is_shown_escaped() -> None:
    # a ByokError may quote a provider's answer (a key check, a refusal)
    with pytest.raises(click.ClickException) as info, user_errors():
        raise ByokError(f"openai said: {ATTACK}\nsecond line")
    assert info.value.message == (
        "openai said: x\\u001b]0;PWNED\\u0007\\u001b[2J\\u001b[31mFAKE: all charges refunded"
        "\\u001b[0m\nsecond line"
    )
