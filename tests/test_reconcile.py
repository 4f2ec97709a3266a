"""``byok reconcile``: per key and day, the ledger's cost beside the cost Exa reported, the table's
price for the same calls, the difference, and the calls left to settle; on a real ledger."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from byok_hookspecs import Charge, Credential, CredentialSource, Usage, UsageRecord
from click.testing import CliRunner
from keys_support import keyring_value, make_app, master_key

from byok_plugin.cli import main
from byok_plugin.cli.context import CliContext
from byok_plugin.settings import Settings

D = Decimal
DAY1 = datetime(2026, 12, 1, 10, tzinfo=UTC)
DAY2 = datetime(2026, 12, 2, 10, tzinfo=UTC)


def _env(database_url: str, home: Path, master: Any) -> dict[str, str]:
    """The environment of the CLI on the test's store."""
    return {
        "BYOK_HOME": str(home),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_ENCRYPTION_KEYS": keyring_value(master),
    }


def test_reconcile_lists_what_exa_reported_beside_the_table(
    database_url: str, tmp_path: Path
) -> None:
    master = master_key()
    app = make_app(database_url, tmp_path, keys=[master])
    platform = Credential(api_key="k", provider="exa", source=CredentialSource.PLATFORM)

    def record(key: str, usage: Usage, when: datetime, status: str = "complete") -> None:
        charge = app.billing.charge(usage, platform)
        if status == "uncertain":  # not charged; the list cost of its estimate is kept
            charge = Charge(D(0), reason="uncertain", list_cost=charge.list_cost)
        assert app.ledger.record(
            UsageRecord(
                idempotency_key=key,
                workspace_id="acme",
                usage=usage,
                charge=charge,
                source=CredentialSource.PLATFORM,
                key_id="pool-0",
                occurred_at=when,
                status=status,
            )
        )

    def search(cost: str | None) -> Usage:
        return Usage("exa", "exa-search", tool_requests=1, reported_cost=D(cost) if cost else None)

    try:
        record("r:a:1", search("0.007"), DAY1)  # table: 0.005
        record("r:b:1", search("0.025"), DAY1)  # 26-100 results: the table's floor is 0.005
        record("r:c:1", search(None), DAY1)  # nothing reported: the table's price is charged
        record("r:d:1:uncertain:0", search(None), DAY1, status="uncertain")
        record("r:e:1", search("0.005"), DAY2)
        openai = Usage("openai", "gpt-4o", input_tokens=1000)
        app.ledger.record(
            UsageRecord(
                "r:f:1",
                "acme",
                openai,
                app.billing.charge(openai, Credential("k", "openai", CredentialSource.PLATFORM)),
                CredentialSource.PLATFORM,
                occurred_at=DAY1,
            )
        )
    finally:
        app.close()
    env = _env(database_url, tmp_path, master)
    result = CliRunner().invoke(main, ["reconcile", "--provider", "exa", "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    amounts = (
        "list_cost",
        "reported_cost",
        "table_cost",
        "difference",
        "uncertain_estimated_cost",
    )
    for line in (*report["lines"], *report["differences"]):
        for name in amounts:  # exact decimals (PostgreSQL gives them 12 places)
            line[name] = D(line[name])
    day1, day2 = report["lines"]
    assert day1 == {
        "provider": "exa",
        "key_id": "pool-0",
        "day": "2026-12-01",
        "calls": 4,
        "reported_calls": 2,
        "uncertain_calls": 1,
        "uncertain_estimated_cost": D("0.005"),  # apart from the list cost
        "interrupted_calls": 0,
        "unpriced_calls": 0,
        "list_cost": D("0.007") + D("0.025") + D("0.005"),
        "reported_cost": D("0.032"),
        "table_cost": D("0.010"),
        "difference": D("0.022"),
    }
    assert (day2["reported_cost"], day2["table_cost"], day2["difference"]) == (
        D("0.005"),
        D("0.005"),
        0,
    )
    assert [line["day"] for line in report["differences"]] == ["2026-12-01"]
    table = CliRunner().invoke(main, ["reconcile", "-p", "exa"], env=env)
    assert table.exit_code == 0, table.output
    assert "1 key-days where the provider's cost differs" in table.output
    assert "1 uncertain calls" in table.output

    # relative dates are the app's: "today" and "yesterday" of 2 December, whenever this runs
    def days(*args: str) -> list[str]:
        cli = CliContext(Settings.from_environ(env), clock=lambda: DAY2 + timedelta(hours=1))
        result = CliRunner().invoke(
            main, ["reconcile", "-p", "exa", "--json", *args], env=env, obj=cli
        )
        assert result.exit_code == 0, result.output
        return [line["day"] for line in json.loads(result.output)["lines"]]

    assert days("--since", "today") == ["2026-12-02"]
    assert days("--since", "yesterday", "--until", "yesterday") == ["2026-12-01"]


def test_reconcile_refuses_to_add_costs_in_several_currencies(
    database_url: str, tmp_path: Path
) -> None:
    # a billing plugin may charge in another currency: its rows' costs do not add to the
    # others', as `byok usage` already refuses
    master = master_key()
    app = make_app(database_url, tmp_path, keys=[master])
    try:
        for n, currency in enumerate(("USD", "EUR")):
            usage = Usage("exa", "exa-search", tool_requests=1, reported_cost=D("0.45"))
            app.ledger.record(
                UsageRecord(
                    f"r:{n}:1",
                    "acme",
                    usage,
                    Charge(D("0.45"), currency=currency, reason="platform", list_cost=D("0.45")),
                    CredentialSource.PLATFORM,
                    occurred_at=DAY1,
                )
            )
    finally:
        app.close()
    env = _env(database_url, tmp_path, master)
    for args in (["reconcile"], ["reconcile", "--json"], ["usage"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 1, (args, result.output)
        assert "several currencies (EUR, USD)" in result.output
        assert "Traceback" not in result.output
    one = CliRunner().invoke(main, ["reconcile", "--json", "--until", "2026-11-30"], env=env)
    assert one.exit_code == 0, one.output
