"""``byok run``: progress lines when piped, the cost table, JSON, exit codes 0 / 1 / 2, inputs from
the command line and from a file, and no secret ever in the output.

Runs through the real plugin and the emulator (a :class:`DemoStack` provides the store, the keys
and the environment).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from byok_plugin.cli import main
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.cli.run import RunProgress, money
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = str(ROOT / "sample_workflows" / "support-ticket-triage.json")
COMPARE = str(ROOT / "sample_workflows" / "multi-provider-comparison.json")
TICKET = "ticket=My invoice is wrong"


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def byok(stack: DemoStack, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=stack.environ)


def secrets_of(stack: DemoStack) -> list[str]:
    master = stack.environ["BYOK_ENCRYPTION_KEYS"].split(":", 1)[1]
    return [*stack.workspace_keys.values(), *stack.platform_keys.values(), stack.block_key, master]


def assert_no_secret(stack: DemoStack, result: Result) -> None:
    for secret in secrets_of(stack):
        assert secret not in result.output


def test_a_byok_run_prints_progress_lines_and_a_zero_cost_table(stack: DemoStack) -> None:
    result = byok(stack, "run", TRIAGE, "--workspace", BYOK_WORKSPACE, "--input", TICKET)
    assert result.exit_code == 0, result.output
    # progress, one plain line per event on stderr (not a terminal here)
    lines = result.stderr.splitlines()
    assert any(re.search(r"\] classify\s+started\s+openai/gpt-4o-mini", line) for line in lines), (
        lines
    )
    assert any(
        re.search(r"\] classify\s+completed\s+workspace key, \d+ tokens, \$0\.00", line)
        for line in lines
    )
    assert any(re.search(r"\] result\s+completed", line) for line in lines)
    # then the table on stdout
    table = result.stdout
    for block in ("classify", "draft_reply", "escalate"):
        assert re.search(
            rf"{block}\s+(openai|anthropic)\s+\S+\s+workspace\s+\d+\s+\$0\.00", table
        ), table
    assert re.search(r"total\s+\d+\s+\$0\.00", table)
    assert "output result:" in table
    assert "Emulated anthropic reply" in table
    assert_no_secret(stack, result)


def test_a_platform_run_shows_the_charge_and_json_has_the_totals(stack: DemoStack) -> None:
    result = byok(stack, "run", COMPARE, "-w", PLATFORM_WORKSPACE, "-i", "question=Why?", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["status"] == "completed"
    assert document["workspace"] == PLATFORM_WORKSPACE
    agents = [b for b in document["blocks"] if b["type"] == "agent"]
    assert {b["provider"] for b in agents} == {"openai", "anthropic", "google", "mistral"}
    assert {b["source"] for b in agents} == {"platform"}
    charges = [Decimal(b["charge"]) for b in agents]
    assert all(c > 0 for c in charges)
    assert Decimal(document["totals"]["charge"]) == sum(charges)
    rows = list(stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE]))
    assert sum((r.amount for r in rows), Decimal(0)) == sum(charges)
    assert_no_secret(stack, result)


def test_the_table_total_is_the_ledger_total(stack: DemoStack) -> None:
    result = byok(stack, "run", COMPARE, "-w", PLATFORM_WORKSPACE, "-i", "question=Why?")
    assert result.exit_code == 0, result.output
    total = sum(
        (r.amount for r in stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE])), Decimal(0)
    )
    assert re.search(rf"total\s+\d+\s+{re.escape(money(total))}", result.stdout), result.stdout


def test_stream_streams_every_agent_block(stack: DemoStack) -> None:
    result = byok(stack, "run", COMPARE, "-w", BYOK_WORKSPACE, "-i", "question=Why?", "--stream")
    assert result.exit_code == 0, result.output
    posts = [c for c in stack.emulator.calls() if c.method == "POST"]
    assert len(posts) == 5
    assert all(c.stream for c in posts)
    result = byok(stack, "run", COMPARE, "-w", BYOK_WORKSPACE, "-i", "question=Why?", "--no-stream")
    assert result.exit_code == 0
    assert not any(c.stream for c in stack.emulator.calls()[5:])


def test_inputs_from_a_file_with_command_line_overrides(stack: DemoStack, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"ticket": "from the file", "customer_tier": "free"}))
    result = byok(
        stack,
        "run",
        TRIAGE,
        "-w",
        BYOK_WORKSPACE,
        "--inputs",
        str(inputs),
        "-i",
        "customer_tier=enterprise",
    )
    assert result.exit_code == 0, result.output
    classify = next(c for c in stack.emulator.calls("openai") if c.method == "POST")
    prompt = json.dumps(classify.body)
    assert "from the file" in prompt
    assert "Customer tier: enterprise" in prompt


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-w", BYOK_WORKSPACE], "$.inputs.ticket: required input 'ticket' was not given"),
        (
            ["-w", BYOK_WORKSPACE, "-i", TICKET, "-i", "tikcet=x"],
            "$.inputs.tikcet: is not an input",
        ),
        (["-w", BYOK_WORKSPACE, "-i", "ticket"], "'ticket' is not NAME=VALUE"),
        ([], "Missing option '--workspace'"),
        (["-w", "", "-i", TICKET], "a workspace id is required"),
        (["-w", " acme", "-i", TICKET], "must not start or end with whitespace"),
    ],
)
def test_bad_inputs_exit_2_before_anything_runs(
    stack: DemoStack, args: list[str], expected: str
) -> None:
    result = byok(stack, "run", TRIAGE, *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert stack.emulator.calls() == []


def test_an_inputs_file_that_is_not_an_object_exits_2(stack: DemoStack, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text("[1, 2")
    result = byok(stack, "run", TRIAGE, "-w", BYOK_WORKSPACE, "--inputs", str(inputs))
    assert result.exit_code == 2
    assert "not valid JSON" in result.output


def test_a_bad_workflow_exits_2_with_the_path(stack: DemoStack, tmp_path: Path) -> None:
    doc = json.loads(Path(TRIAGE).read_text())
    doc["blocks"]["classify"]["prompt"] = "{{draft_reply.content}}"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    result = byok(stack, "run", str(bad), "-w", BYOK_WORKSPACE, "-i", TICKET)
    assert result.exit_code == 2
    assert (
        "$.blocks.classify.prompt: {{draft_reply.content}}: block 'draft_reply' is not upstream"
        in result.output
    )
    assert stack.emulator.calls() == []


def test_an_unset_block_key_variable_exits_2_with_the_path(
    stack: DemoStack, tmp_path: Path
) -> None:
    doc = json.loads((ROOT / "sample_workflows" / "release-notes-translation.json").read_text())
    doc["blocks"]["translate"]["key"] = {"env": "LOCALIZATION_ANTHROPIC_KEY"}
    path = tmp_path / "env-key.json"
    path.write_text(json.dumps(doc))
    env = {**stack.environ, "BYOK_BLOCK_KEY_ENV_ALLOW": "LOCALIZATION_"}
    result = CliRunner().invoke(
        main, ["run", str(path), "-w", BYOK_WORKSPACE, "-i", "changelog=x"], env=env
    )
    assert result.exit_code == 2
    assert (
        "$.blocks.translate.key.env: environment variable LOCALIZATION_ANTHROPIC_KEY is not set"
        in result.output
    )
    assert stack.emulator.calls() == []


def test_a_refused_key_exits_1_naming_workspace_provider_and_masked_key(stack: DemoStack) -> None:
    key = stack.workspace_keys["openai"]
    stack.emulator.state.remove_key("openai", key)
    result = byok(stack, "run", TRIAGE, "-w", BYOK_WORKSPACE, "-i", TICKET)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    error = result.stderr
    assert (
        f"Error: block 'classify' failed: workspace '{BYOK_WORKSPACE}': openai refused the workspace key {key[:6]}...{key[-4:]} (HTTP 401"
        in error
    )
    assert re.search(r"classify\s+openai\s+gpt-4o-mini\s+-\s+-\s+-\s+failed", result.stdout), (
        result.stdout
    )
    assert re.search(r"draft_reply\s+anthropic\s+\S+\s+-\s+-\s+-\s+skipped", result.stdout)
    assert_no_secret(stack, result)


def test_run_and_demo_and_validate_have_help() -> None:
    for command in ("run", "validate", "demo"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0
        assert "Usage:" in result.output


def test_a_terminal_gets_a_live_display_instead_of_lines(stack: DemoStack) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=140, color_system=None)
    workflow = load_workflow(TRIAGE)
    with RunProgress(workflow, console, live=True) as progress:
        result = stack.run(
            workflow, BYOK_WORKSPACE, {"ticket": "x"}, stream=True, on_event=progress
        )
    assert result.ok, result.error
    screen = buffer.getvalue()
    final = screen[screen.rindex("support-ticket-triage 1.2.0") :]  # the last frame drawn
    for block in workflow.order:
        assert re.search(rf"✓\s+{block}\s", final), final
    assert re.search(r"classify\s+openai/gpt-4o-mini\s+workspace key, \d+ tokens, \$0\.00", final)
    assert "] classify" not in screen  # no plain progress lines on a terminal
    assert progress.streamed["draft_reply"] > 0
