"""``byok usage`` by workflow, block and key; relative dates; the CSV carries every JSON field;
every ``--json`` output is a versioned object. On a real ledger (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import click
import pytest
from byok_hookspecs import Charge, CredentialSource, Usage, UsageRecord
from click.testing import CliRunner, Result

from byok_plugin.app import App
from byok_plugin.cli import main
from byok_plugin.cli.context import CliContext
from byok_plugin.cli.json_output import JSON_VERSION
from byok_plugin.cli.usage import parse_when
from byok_plugin.settings import Settings

D = Decimal
#: the app's clock in these tests: relative dates such as "today" must not race midnight
NOW = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)
# workflow, block, key id (None: a platform key), days ago, charged
CALLS = [
    ("triage", "classify", "key_aaaaaaaaaaaaaaaa", 0, "0"),
    ("triage", "classify", None, 0, "0.002"),
    ("triage", "answer", "key_aaaaaaaaaaaaaaaa", 3, "0"),
    ("digest", "summarise", "key_bbbbbbbbbbbbbbbb", 10, "0"),
    (None, None, None, 40, "0.5"),
]


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    environ = {"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": database_url}
    app = App(Settings.from_environ(environ))
    try:
        for i, (workflow, block, key_id, days_ago, charged) in enumerate(CALLS):
            source = CredentialSource.WORKSPACE if key_id else CredentialSource.PLATFORM
            app.ledger.record(
                UsageRecord(
                    idempotency_key=f"run-{i}:{block}:1",
                    workspace_id="acme",
                    usage=Usage("openai", "gpt-4o-mini", input_tokens=100, output_tokens=10),
                    charge=Charge(
                        amount=D(charged),
                        reason="byok" if key_id else "platform",
                        list_cost=D("0.002"),
                    ),
                    source=source,
                    key_id=key_id,
                    workflow_id=workflow,
                    run_id=f"run-{i}",
                    block_id=block,
                    occurred_at=NOW - timedelta(days=days_ago),
                )
            )
    finally:
        app.close()
    return environ


def _run(env: dict[str, str], *args: str) -> Result:
    cli = CliContext(Settings.from_environ(env), clock=lambda: NOW)
    result = CliRunner().invoke(main, list(args), env=env, obj=cli)
    assert result.exit_code == 0, result.output
    return result


def test_usage_by_workflow_block_and_key(env: dict[str, str]) -> None:
    report = json.loads(_run(env, "usage", "--by", "workflow,block,key", "--json").stdout)
    assert report["version"] == JSON_VERSION
    assert report["group_by"] == ["workflow", "block", "key"]
    rows = {(r["workflow"], r["block"], r["key"]): r for r in report["rows"]}
    assert set(rows) == {
        ("triage", "classify", "key_aaaaaaaaaaaaaaaa"),
        ("triage", "classify", None),  # a platform key has no key id: null, not a made-up value
        ("triage", "answer", "key_aaaaaaaaaaaaaaaa"),
        ("digest", "summarise", "key_bbbbbbbbbbbbbbbb"),
        (None, None, None),
    }
    assert D(rows[("triage", "classify", None)]["charged"]) == D("0.002")
    by_key = json.loads(_run(env, "usage", "--by", "key", "--json").stdout)["rows"]
    assert {r["key"]: r["calls"] for r in by_key} == {
        None: 2,
        "key_aaaaaaaaaaaaaaaa": 2,
        "key_bbbbbbbbbbbbbbbb": 1,
    }
    table = _run(env, "usage", "--by", "workflow,block").stdout
    assert "summarise" in table


def test_the_csv_carries_every_field_of_the_json_rows(env: dict[str, str]) -> None:
    args = ("usage", "--by", "workflow,block,key")
    report = json.loads(_run(env, *args, "--json").stdout)
    rows = list(csv.DictReader(io.StringIO(_run(env, *args, "--csv").stdout)))
    assert len(rows) == len(report["rows"])
    for json_row, csv_row in zip(report["rows"], rows, strict=True):
        assert set(csv_row) == set(json_row) | {"currency"}
        for name, value in json_row.items():
            assert csv_row[name] == ("" if value is None else str(value)), name


@pytest.mark.parametrize(
    ("since", "calls"),
    [("today", 2), ("7d", 3), ("30d", 4), (None, 5)],
)
def test_relative_since(env: dict[str, str], since: str | None, calls: int) -> None:
    args = ["usage", "--json"] + (["--since", since] if since else [])
    assert json.loads(_run(env, *args).stdout)["totals"]["calls"] == calls


@pytest.mark.parametrize(
    ("value", "end", "expected"),
    [
        ("today", False, datetime(2026, 3, 15, tzinfo=UTC)),
        ("today", True, datetime(2026, 3, 16, tzinfo=UTC)),
        ("yesterday", False, datetime(2026, 3, 14, tzinfo=UTC)),
        ("yesterday", True, datetime(2026, 3, 15, tzinfo=UTC)),
        ("this-month", False, datetime(2026, 3, 1, tzinfo=UTC)),
        ("this-month", True, datetime(2026, 4, 1, tzinfo=UTC)),
        ("last-month", False, datetime(2026, 2, 1, tzinfo=UTC)),
        ("last-month", True, datetime(2026, 3, 1, tzinfo=UTC)),
        ("7d", False, datetime(2026, 3, 8, 13, 30, tzinfo=UTC)),
        ("7D", True, datetime(2026, 3, 8, 13, 30, tzinfo=UTC)),
        ("0d", False, datetime(2026, 3, 15, 13, 30, tzinfo=UTC)),
        ("2026-03-01", True, datetime(2026, 3, 2, tzinfo=UTC)),
    ],
)
def test_parse_when_relative_dates(value: str, end: bool, expected: datetime) -> None:
    now = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)
    assert parse_when(value, "--since", end=end, now=now) == expected


def test_month_edges_cross_the_year() -> None:
    january = datetime(2026, 1, 20, tzinfo=UTC)
    assert parse_when("last-month", "--since", end=False, now=january) == datetime(
        2025, 12, 1, tzinfo=UTC
    )
    december = datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    assert parse_when("this-month", "--until", end=True, now=december) == datetime(
        2026, 1, 1, tzinfo=UTC
    )


@pytest.mark.parametrize("value", ["7days", "-7d", "last-week", "d", "2026-13-01"])
def test_a_bad_relative_date_is_a_clear_error(value: str) -> None:
    with pytest.raises(click.BadParameter, match="this-month"):
        parse_when(value, "--since", end=False)


@pytest.mark.parametrize(
    "args",
    [
        ["usage"],
        ["keys", "list", "-w", "acme"],
        ["budget", "list", "-w", "acme"],
        ["reconcile"],
        ["plugins"],
        ["ledger", "spool"],
        ["validate", str(Path(__file__).parents[1] / "sample_workflows/research-brief.json")],
        ["org", "keys", "acme-org"],
        ["org", "inherited", "-w", "acme"],
        ["keys", "check", "-w", "acme"],
        ["audit", "-w", "acme"],
    ],
)
def test_every_json_output_is_a_versioned_object(env: dict[str, str], args: list[str]) -> None:
    if args[0] == "org":
        _run(env, "org", "create", "acme-org")
        _run(env, "org", "attach", "acme-org", "-w", "acme")
    document = json.loads(_run(env, *args, "--json").stdout)
    assert isinstance(document, dict)
    assert next(iter(document)) == "version"
    assert document["version"] == JSON_VERSION
    if args[0] == "validate":  # the workflow's own version has a name of its own
        assert document["workflow_version"]
