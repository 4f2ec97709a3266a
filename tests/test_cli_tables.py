"""Every table command at an 80- and a 120-column terminal and piped: no money cell, id or model
is cut. The values to find whole come from the same command's ``--json`` output (or the run
behind it), so a cell shortened to "…", folded onto two lines or rounded away fails the test.

A terminal is what Rich takes for one (``TTY_COMPATIBLE=1``, ``COLUMNS``); colour is off and
the remaining style codes are stripped before reading.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console
from rich.text import Text

from byok_plugin.cli import main
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack, realistic_key
from byok_plugin.cli.json_output import JSON_VERSION
from byok_plugin.cli.tables import Column, TableSpec, show
from byok_plugin.cli.text import money
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[1]
COMPARE = str(ROOT / "sample_workflows" / "multi-provider-comparison.json")
TRIAGE = str(ROOT / "sample_workflows" / "support-ticket-triage.json")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: (name, extra environment): two terminal widths, and a pipe
LAYOUTS = [
    ("80 columns", {"TTY_COMPATIBLE": "1", "COLUMNS": "80", "NO_COLOR": "1"}),
    ("120 columns", {"TTY_COMPATIBLE": "1", "COLUMNS": "120", "NO_COLOR": "1"}),
    ("piped", {"TTY_COMPATIBLE": "0", "COLUMNS": "80"}),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    """A store with keys, two runs of a multi-provider workflow in the ledger and a budget."""
    with EmulatorServer() as emulator:
        built = DemoStack(tmp_path_factory.mktemp("tables") / "home", emulator)
        built.store_workspace_keys(BYOK_WORKSPACE)
        for workspace in (BYOK_WORKSPACE, PLATFORM_WORKSPACE):
            result = byok(built.environ, "run", COMPARE, "-w", workspace, "-i", "question=hello")
            assert result.exit_code == 0, result.output
        for name, limit in (("monthly-everything", "1234.5"), ("tiny", "0.000125")):
            made = byok(
                built.environ, "budget", "set", "-w", BYOK_WORKSPACE, name, "--limit", limit
            )
            assert made.exit_code == 0, made.output
        yield built
        built.close()


def byok(environ: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=environ)


def shown(stack: DemoStack, layout: dict[str, str], *args: str) -> str:
    result = byok({**stack.environ, **layout}, *args)
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.stdout)


def assert_whole(output: str, values: Iterable[str]) -> None:
    """Each value appears on one line, not followed or preceded by more of a number or id."""
    for value in values:
        pattern = rf"(?<![\w$.,-]){re.escape(value)}(?![\w.,-])"
        assert re.search(pattern, output), f"{value!r} is cut or missing in:\n{output}"


def json_of(stack: DemoStack, *args: str) -> dict:  # type: ignore[type-arg]
    result = byok(stack.environ, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("layout_name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize("by", ["day,workspace,provider,model,source", "workflow,block,key,model"])
def test_usage_keeps_money_ids_and_models_whole(
    stack: DemoStack, layout_name: str, layout: dict[str, str], by: str
) -> None:
    report = json_of(stack, "usage", "--by", by)
    assert report["rows"]
    output = shown(stack, layout, "usage", "--by", by)
    values = {money(Decimal(report["totals"]["charged"]))}
    for row in report["rows"]:
        values |= {row["model"], money(Decimal(row["charged"]))}
        values |= {row[name] for name in ("workspace", "key", "block") if row.get(name)}
    for workspace in report["workspaces"]:
        values |= {workspace["workspace"], money(Decimal(workspace["charged"]))}
    assert_whole(output, values)
    if layout_name == "piped":  # every column, one line per row, the title on a line of its own
        assert "BYOK saved" in output
        assert "cached in" in output
        assert "not shown at this width" not in output
        if by.startswith("day"):
            dated = [line for line in output.splitlines() if line.startswith("20")]
            assert len(dated) == len(report["rows"])


@pytest.mark.parametrize(("layout_name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_keys_list_keeps_ids_labels_and_hints_whole(
    stack: DemoStack, layout_name: str, layout: dict[str, str]
) -> None:
    keys = json_of(stack, "keys", "list", "-w", BYOK_WORKSPACE)["keys"]
    assert keys
    output = shown(stack, layout, "keys", "list", "-w", BYOK_WORKSPACE)
    assert_whole(output, [k["id"] for k in keys] + [k["label"] for k in keys])
    if layout_name != "80 columns":  # the masked key may give way to the ids at 80 columns
        assert_whole(output, [k["hint"] for k in keys])
    # one line per key, whatever the width: nothing is wrapped onto a second line
    assert sum(1 for line in output.splitlines() if any(k["id"] in line for k in keys)) == len(keys)


@pytest.mark.parametrize(("layout_name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_run_keeps_blocks_models_and_charges_whole(
    stack: DemoStack, layout_name: str, layout: dict[str, str]
) -> None:
    args = ("run", COMPARE, "-w", PLATFORM_WORKSPACE, "-i", "question=hello")
    result = byok({**stack.environ, **layout}, *args)
    assert result.exit_code == 0, result.output
    output = ANSI.sub("", result.stdout)
    run = json.loads(byok(stack.environ, *args, "--json").stdout)
    assert run["version"] == JSON_VERSION
    agents = [b for b in run["blocks"] if b["calls"]]
    assert agents
    # a second run charges what the first did: the table's charges are those of the JSON's run
    values = {money(Decimal(run["totals"]["charge"]))}
    for block in agents:
        values |= {block["block"], block["model"], money(Decimal(block["charge"]))}
    assert_whole(output, values)


@pytest.mark.parametrize(("layout_name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_budget_list_keeps_every_amount_whole(
    stack: DemoStack, layout_name: str, layout: dict[str, str]
) -> None:
    budgets = json_of(stack, "budget", "list", "-w", BYOK_WORKSPACE)["budgets"]
    output = shown(stack, layout, "budget", "list", "-w", BYOK_WORKSPACE)
    values = {b["name"] for b in budgets}
    for budget in budgets:
        values |= {money(Decimal(budget[field])) for field in ("limit", "spent", "left")}
    assert "$1,234.50" in values
    assert "$0.000125" in values
    assert_whole(output, values)


@pytest.mark.parametrize(("layout_name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_reconcile_keeps_keys_and_costs_whole(
    stack: DemoStack, layout_name: str, layout: dict[str, str]
) -> None:
    lines = json_of(stack, "reconcile")["lines"]
    assert lines
    output = shown(stack, layout, "reconcile")
    values = set()
    for line in lines:
        values |= {line["key_id"], line["provider"], line["day"]}
        values |= {money(Decimal(line[f])) for f in ("reported_cost", "table_cost", "difference")}
    assert_whole(output, values)


@pytest.mark.parametrize(("layout_name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_demo_keeps_blocks_models_and_amounts_whole(
    layout_name: str, layout: dict[str, str]
) -> None:
    result = CliRunner().invoke(main, ["demo", "--workflow", "support-ticket-triage"], env=layout)
    assert result.exit_code == 0, result.output
    output = ANSI.sub("", result.stdout)
    workflow = load_workflow(Path(TRIAGE))
    agents = workflow.agent_blocks
    assert_whole(output, [a.id for a in agents] + [a.model for a in agents])
    # each block's row ends in its charge, written whole: dollars, a point, at least cents
    for agent in agents:
        rows = [line for line in output.splitlines() if line.startswith(agent.id + " ")]
        assert len(rows) == 2, output  # once per workspace
        for row in rows:
            assert re.search(r"\$\d[\d,]*\.\d{2,}$", row.rstrip()), row


# --- the rule itself ------------------------------------------------------------------------------

SPEC = TableSpec(
    columns=(
        Column("id", "id"),
        Column("model", "model"),
        Column("note", "text", priority=1),
        Column("extra", "number", priority=2),
        Column("charge", "money"),
    ),
    rows=(
        ("key_0123456789abcdef", "claude-sonnet-4-5-20250929", "a long note " * 4, "1", "$0.0125"),
    ),
    title="a title longer than the table is wide, which must never be wrapped onto two lines",
)


def _render(spec: TableSpec, width: int, *, terminal: bool) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=terminal, color_system=None)
    show(console, spec)
    return buffer.getvalue()


def test_columns_drop_by_priority_and_text_wraps_before_anything_is_cut() -> None:
    wide = _render(SPEC, 200, terminal=True)
    assert "extra" in wide
    assert "not shown" not in wide
    # 80 columns: "extra" (priority 2) goes first, the note wraps
    narrow = _render(SPEC, 80, terminal=True)
    assert "extra" not in narrow.splitlines()[1]
    assert "not shown at this width: extra" in narrow
    assert_whole(narrow, ["key_0123456789abcdef", "claude-sonnet-4-5-20250929", "$0.0125"])
    assert all(len(line) <= 80 for line in narrow.splitlines()[1:-1])
    assert sum(1 for line in narrow.splitlines() if "note" in line) > 2  # header + wrapped
    # 64 columns: a note squeezed under TEXT_MIN characters goes too
    squeezed = _render(SPEC, 64, terminal=True)
    assert "not shown at this width: note, extra" in squeezed


def test_rows_become_lines_when_even_the_needed_columns_do_not_fit() -> None:
    tiny = _render(SPEC, 40, terminal=True)
    assert "    id: key_0123456789abcdef" in tiny
    assert " model: claude-sonnet-4-5-20250929" in tiny
    assert "charge: $0.0125" in tiny


def test_piped_tables_have_every_column_and_never_break_a_value() -> None:
    long_note = "word " * 80
    spec = TableSpec(columns=SPEC.columns, rows=((*SPEC.rows[0][:2], long_note, "1", "$1.00"),))
    piped = _render(spec, 80, terminal=False)
    assert long_note.strip() in piped  # one line, at the table's natural width
    assert piped.splitlines()[0].split() == ["id", "model", "note", "extra", "charge"]


def test_user_text_in_cells_is_never_markup() -> None:
    spec = TableSpec(columns=(Column("label", "id"),), rows=(("[bold]x[/]",), (Text("[/]"),)))
    assert "[bold]x[/]" in _render(spec, 80, terminal=True)


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        ("0", "USD", "$0.00"),
        ("0.5", "USD", "$0.50"),
        ("1234.5", "USD", "$1,234.50"),
        ("0.00000125", "USD", "$0.00000125"),
        ("0.000000000005", "USD", "$0.000000000005"),
        ("-0.01", "USD", "-$0.01"),
        ("2.50", "EUR", "2.50 EUR"),
        ("1E+3", "USD", "$1,000.00"),
    ],
)
def test_money_is_printed_one_way_and_never_rounded(amount: str, currency: str, text: str) -> None:
    assert money(Decimal(amount), currency) == text


@pytest.mark.parametrize(("layout_name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_plugins_keeps_names_whole_and_its_hooks_on_one_line_when_piped(
    stack: DemoStack, layout_name: str, layout: dict[str, str]
) -> None:
    plugins = json_of(stack, "plugins")["plugins"]
    output = shown(stack, layout, "plugins")
    assert_whole(output, [p["name"] for p in plugins] + [p["distribution"] for p in plugins])
    assert_whole(output, [h["hook"] for p in plugins for h in p["hooks"]])  # wrapped between words
    if layout_name == "piped":
        (row,) = [line for line in output.splitlines() if line.startswith("byok_plugin ")]
        assert all(h["hook"] in row for h in plugins[0]["hooks"])
        assert all(line == line.rstrip() for line in output.splitlines())  # no padding after


ORG, ORG_WORKSPACE = "acme-org", "acme-team"


@pytest.fixture(scope="module")
def org(stack: DemoStack) -> str:
    """An organization with a key per provider (registered with the emulator) and a workspace
    that inherits them."""
    for args in (("org", "create", ORG), ("org", "attach", ORG, "-w", ORG_WORKSPACE)):
        made = byok(stack.environ, *args)
        assert made.exit_code == 0, made.output
    for provider in ("openai", "anthropic"):
        key = realistic_key(provider)
        stack.emulator.add_key(provider, key, label=f"{ORG}-{provider}")
        args = ["org", "set-key", ORG, "-p", provider, "-l", f"shared-{provider}-pool", "--no-test"]
        stored = CliRunner().invoke(main, args, input=key, env=stack.environ)
        assert stored.exit_code == 0, stored.output
    return ORG


@pytest.mark.parametrize(("layout_name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize(
    "args", [("org", "keys", ORG), ("org", "inherited", "-w", ORG_WORKSPACE)], ids=["keys", "inh"]
)
def test_org_keys_keep_ids_labels_and_hints_whole(
    stack: DemoStack, org: str, layout_name: str, layout: dict[str, str], args: tuple[str, ...]
) -> None:
    keys = json_of(stack, *args)["keys"]
    assert len(keys) == 2
    output = shown(stack, layout, *args)
    assert_whole(output, [k["id"] for k in keys] + [k["label"] for k in keys])
    if layout_name != "80 columns":  # the masked key may give way to the ids at 80 columns
        assert_whole(output, [k["hint"] for k in keys])
    assert sum(1 for line in output.splitlines() if any(k["id"] in line for k in keys)) == 2
    assert f"organization {org}" in output.splitlines()[0]  # the title, on a line of its own
    if layout_name == "piped":
        assert output.splitlines()[1].split()[:3] == ["provider", "label", "id"]
        assert "cooldown until" in output
        assert all(line == line.rstrip() for line in output.splitlines())


@pytest.mark.parametrize(("layout_name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_keys_check_prints_a_whole_line_per_key(
    stack: DemoStack, layout_name: str, layout: dict[str, str]
) -> None:
    # checked live against the emulator (the stack stores keys unchecked)
    live = {**stack.environ, "BYOK_VALIDATE_KEYS": "1"}
    args = ("keys", "check", "-w", BYOK_WORKSPACE)
    checked = json.loads(byok(live, *args, "--json").stdout)["keys"]
    assert checked
    assert {r["status"] for r in checked} == {"valid"}
    result = byok({**live, **layout}, *args)
    assert result.exit_code == 0, result.output
    lines = ANSI.sub("", result.stdout).splitlines()
    assert len(lines) == len(checked)  # one line per key, never wrapped, whatever the width
    for checked_key in checked:
        (line,) = [line for line in lines if checked_key["key_id"] in line]
        assert line.startswith(f"{BYOK_WORKSPACE} {checked_key['provider']} ")
        assert f" {checked_key['label']!r} {checked_key['key_id']} " in line
        assert f"({checked_key['hint']}): valid" in line
    if layout_name == "80 columns":  # a line longer than the terminal is still one line
        assert max(len(line) for line in lines) > 80
