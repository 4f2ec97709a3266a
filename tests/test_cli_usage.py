"""``byok usage`` and ``byok fallback``: through click's runner, on a real ledger."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from byok_hookspecs import Charge, CredentialSource, Usage, UsageRecord
from click.testing import CliRunner

from byok_plugin.app import App
from byok_plugin.cli import main
from byok_plugin.settings import Settings

D = Decimal
WS = CredentialSource.WORKSPACE
PF = CredentialSource.PLATFORM
BL = CredentialSource.BLOCK

# workspace, when, provider, model, source, fallback, list cost, charged, input, output
CALLS = [
    ("acme", datetime(2026, 11, 3, 10, tzinfo=UTC), "openai", "gpt-4o", WS, False, "0.0125", "0", 1000, 1000),
    ("acme", datetime(2026, 11, 3, 11, tzinfo=UTC), "openai", "gpt-4o", PF, False, "0.01", "0.012", 2000, 500),
    ("acme", datetime(2026, 11, 4, 9, tzinfo=UTC), "anthropic", "claude-haiku-4-5", WS, False, "0.0079", "0", 900, 300),
    ("beta", datetime(2026, 11, 4, 12, tzinfo=UTC), "exa", "exa-search", PF, True, "0.005", "0.005", 0, 0),
    ("beta", datetime(2026, 11, 5, 8, tzinfo=UTC), "mistral", "mistral-large-latest", BL, False, "0.004", "0", 5000, 1000),
]  # fmt: skip


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environ = {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": f"sqlite:///{tmp_path / 'byok.db'}",
    }
    app = App(Settings.from_environ(environ))
    try:
        for i, (ws, when, provider, model, source, fallback, cost, charged, inp, out) in enumerate(
            CALLS
        ):
            app.ledger.record(
                UsageRecord(
                    idempotency_key=f"run-{i}:b:1",
                    workspace_id=ws,
                    usage=Usage(
                        provider,
                        model,
                        input_tokens=inp,
                        output_tokens=out,
                        tool_requests=1 if provider == "exa" else 0,
                    ),
                    charge=Charge(
                        amount=D(charged),
                        reason={WS: "byok", PF: "platform", BL: "block_key"}[source],
                        list_cost=D(cost),
                    ),
                    source=source,
                    fallback=fallback,
                    occurred_at=when,
                )
            )
    finally:
        app.close()
    return environ


def _run(env: dict[str, str], *args: str):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_json_totals_share_and_savings_checked_by_hand(env: dict[str, str]) -> None:
    result = _run(env, "usage", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    totals = report["totals"]
    assert totals["calls"] == 5
    assert totals["byok_calls"] == 2
    assert totals["byok_share"] == "0.4000"  # 2 of 5 calls on the workspaces' own keys
    assert totals["fallback_calls"] == 1
    assert totals["block_key_calls"] == 1
    assert D(totals["charged"]) == D("0.012") + D("0.005")
    assert D(totals["list_cost"]) == D("0.0125") + D("0.01") + D("0.0079") + D("0.005") + D("0.004")
    assert D(totals["byok_saved"]) == D("0.0125") + D("0.0079")  # the BYOK calls at list price
    assert totals["tool_requests"] == 1
    workspaces = {w["workspace"]: w for w in report["workspaces"]}
    assert workspaces["acme"]["byok_share"] == "0.6667"
    assert D(workspaces["acme"]["byok_saved"]) == D("0.0204")
    assert D(workspaces["acme"]["charged"]) == D("0.012")
    assert workspaces["beta"]["byok_share"] == "0.0000"
    assert D(workspaces["beta"]["byok_saved"]) == 0
    # one row per day x workspace x provider x model x source
    assert report["group_by"] == ["day", "workspace", "provider", "model", "source"]
    assert len(report["rows"]) == 5
    first = report["rows"][0]
    assert (first["day"], first["workspace"], first["source"]) == ("2026-11-03", "acme", "platform")


def test_date_range_includes_the_until_day_and_workspace_filter(env: dict[str, str]) -> None:
    report = json.loads(
        _run(env, "usage", "--since", "2026-11-04", "--until", "2026-11-04", "--json").output
    )
    assert report["totals"]["calls"] == 2  # the two calls of 4 November
    assert {r["model"] for r in report["rows"]} == {"claude-haiku-4-5", "exa-search"}
    assert report["since"] == "2026-11-04T00:00:00+00:00"
    assert report["until"] == "2026-11-05T00:00:00+00:00"
    acme = json.loads(
        _run(env, "usage", "-w", "acme", "--since", "2026-11-03T10:30:00Z", "--json").output
    )
    assert acme["totals"]["calls"] == 2
    assert [w["workspace"] for w in acme["workspaces"]] == ["acme"]


def test_grouping_and_csv(env: dict[str, str]) -> None:
    result = _run(env, "usage", "--by", "workspace,source", "--csv")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert list(rows[0])[:3] == ["workspace", "source", "calls"]
    by_key = {(r["workspace"], r["source"]): r for r in rows}
    assert set(by_key) == {
        ("acme", "workspace"),
        ("acme", "platform"),
        ("beta", "platform"),
        ("beta", "block"),
    }
    assert by_key[("acme", "workspace")]["calls"] == "2"
    assert D(by_key[("acme", "workspace")]["byok_saved"]) == D("0.0204")
    assert D(by_key[("acme", "platform")]["charged"]) == D("0.012")
    assert by_key[("beta", "platform")]["currency"] == "USD"


FORMULAS = (
    '=HYPERLINK("https://evil.example/","x")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "\tleading tab",
    "\rleading cr",
)


def test_csv_neutralises_cells_a_spreadsheet_would_run(tmp_path: Path) -> None:
    environ = {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": f"sqlite:///{tmp_path / 'byok.db'}",
    }
    app = App(Settings.from_environ(environ))
    try:
        for i, text in enumerate(FORMULAS):
            # workspace ids are printable (no tab or CR); models come from providers and hosts
            workspace = text if text[0] not in "\t\r" else f"ws-{i}"
            app.ledger.record(
                UsageRecord(
                    idempotency_key=f"formula-{i}:b:1",
                    workspace_id=workspace,
                    usage=Usage("openai", text, input_tokens=1, output_tokens=1),
                    charge=Charge(amount=D("0.5"), reason="platform", list_cost=D("0.5")),
                    source=PF,
                    occurred_at=datetime(2026, 11, 3, tzinfo=UTC),
                )
            )
    finally:
        app.close()
    result = _run(environ, "usage", "--by", "workspace,model", "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == len(FORMULAS)
    cells = [r["workspace"] for r in rows] + [r["model"] for r in rows]
    for cell in cells:
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    # the text is kept after the quote (a CR, which a terminal acts on, written \u000d), and
    # numbers are untouched
    assert {r["model"] for r in rows} == {f"'{text}".replace("\r", "\\u000d") for text in FORMULAS}
    assert {r["workspace"] for r in rows} >= {'\'=HYPERLINK("https://evil.example/","x")'}
    assert all(D(r["charged"]) == D("0.5") for r in rows)
    assert [r["workspace"] for r in rows if r["workspace"].startswith("ws-")] == ["ws-4", "ws-5"]


def test_table_shows_the_share_and_the_savings(env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["usage"], env={**env, "COLUMNS": "250"})
    assert result.exit_code == 0
    assert "BYOK saved" in result.output
    assert "40.0% on the workspaces' own keys" in result.output
    assert "BYOK saved $0.0204 at list price" in result.output
    assert "66.7%" in result.output  # acme's share


def test_an_empty_range_says_so(env: dict[str, str]) -> None:
    result = _run(env, "usage", "--since", "2030-01-01")
    assert result.exit_code == 0
    assert "No usage recorded" in result.output
    assert (
        json.loads(_run(env, "usage", "--since", "2030-01-01", "--json").output)["totals"]["calls"]
        == 0
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--since", "last-week"], "'last-week' is not a date"),
        (["--since", "2026-11-05", "--until", "2026-11-01"], "must be after --since"),
        (["--by", "colour"], "colour is not a grouping"),
        (["--json", "--csv"], "choose one of --json and --csv"),
        (["--until", "9999-12-31"], "beyond the dates this command can count with"),
        (["--since", "0001-01-01T00:00:00+14:00"], "beyond the dates"),
        (["--until", "9999-12-31T23:59:59-12:00"], "beyond the dates"),
    ],
)
def test_bad_options_are_clear_errors(env: dict[str, str], args: list[str], expected: str) -> None:
    commands = [["usage"]]
    if args[0] in ("--since", "--until") and "beyond" in expected:  # the same dates everywhere
        commands += [["reconcile"], ["audit"]] if args[0] == "--since" else [["reconcile"]]
    for command in commands:
        result = CliRunner().invoke(main, [*command, *args], env=env)
        assert result.exit_code == 2, (command, result.output)
        assert expected in result.output
        assert "Traceback" not in result.output


def test_fallback_show_and_set(env: dict[str, str]) -> None:
    result = _run(env, "fallback", "show", "-w", "acme")
    assert result.exit_code == 0
    assert "fallback never (the default)" in result.output
    result = _run(env, "fallback", "set", "-w", "acme", "on_rate_limit")
    assert result.exit_code == 0
    assert "fallback on_rate_limit" in result.output
    shown = _run(env, "fallback", "show", "-w", "acme").output
    assert "fallback on_rate_limit (set by local-operator" in shown
    bad = CliRunner().invoke(main, ["fallback", "set", "-w", "acme", "always"], env=env)
    assert bad.exit_code == 2
    assert "'always' is not one of" in bad.output
    app = App(Settings.from_environ(env))
    try:
        assert app.workspace_settings.fallback_policy("acme").value == "on_rate_limit"
        events = app.audit_store.events("acme", action="settings.fallback_policy")
        assert [e.detail for e in events] == ["never -> on_rate_limit"]
    finally:
        app.close()
