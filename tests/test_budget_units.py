"""Budget amounts past what the store's BIGINT columns hold (``MAX_UNITS`` nano-dollars, about
9.2e9 USD). A worst case priced from a price file at its top rates ($1 a token), a 16 MB request
and ``BYOK_CHARGE_MULTIPLIER=1000`` is refused by a hard budget with its usual error and capped by
a soft one; a settlement past the column saturates there, and the ledger row committed with it
lands once. Every test runs on a real SQLite file and a real PostgreSQL database
(``database_url``), through the default plugin's hooks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pluggy
import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    BudgetExceeded,
    Charge,
    Credential,
    CredentialSource,
    Usage,
    UsageRecord,
)
from test_budgets import START, WS, Clock, reservation, settlement

from byok_plugin.app import App
from byok_plugin.billing.budgets import (
    MAX_LIMIT,
    MAX_UNITS,
    UNIT,
    budget_holds,
    budgets,
    to_units,
)
from byok_plugin.billing.pricing import _MAX_PRICE, _RATE_FIELDS
from byok_plugin.cli.demo import PLATFORM_WORKSPACE, DemoStack
from byok_plugin.core.json_file import MAX_BYTES
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.providers.base import MAX_TOKEN_COUNT
from byok_plugin.host.run_result import BlockStatus, RunStatus
from byok_plugin.host.workflow import parse_workflow
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import MAX_CHARGE_MULTIPLIER, Settings

MODEL = "gpt-top"
CREDENTIAL = Credential(
    api_key="sk-not-a-real-key-000000",
    provider="openai",
    source=CredentialSource.PLATFORM,
    key_id="env:OPENAI_API_KEY",
)


def top_prices(path: Path, model: str) -> Path:
    """A price file pricing OpenAI's ``model`` at the top rate a price file may set ($1 a token)."""
    rates = dict.fromkeys(_RATE_FIELDS, str(_MAX_PRICE))
    path.write_text(json.dumps({"version": "top", "models": {f"openai/{model}": rates}}))
    return path


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    prices = top_prices(tmp_path / "prices.json", MODEL)
    settings = Settings.from_environ(
        {
            "BYOK_HOME": str(tmp_path),
            "BYOK_DATABASE_URL": database_url,
            "BYOK_LOAD_PLUGINS": "byok_plugin",
            "BYOK_PRICE_FILE": str(prices),
            "BYOK_CHARGE_MULTIPLIER": str(MAX_CHARGE_MULTIPLIER),
        }
    )
    built = App(settings, clock=Clock(START))
    yield built
    built.close()


@pytest.fixture
def pm(app: App) -> pluggy.PluginManager:
    return plugin_manager_for(app, load_entrypoints=False)


def charge_of(pm: pluggy.PluginManager, usage: Usage) -> Charge:
    charge = pm.hook.byok_compute_charge(usage=usage, credential=CREDENTIAL)
    assert charge is not None
    return charge  # type: ignore[no-any-return]


def worst_case(pm: pluggy.PluginManager) -> Charge:
    """What the runner holds for a 16 MB request with the largest ``max_tokens`` (one input token
    per byte), priced at $1 a token times 1000: about 1.7e10 USD, past the column."""
    usage = Usage("openai", MODEL, input_tokens=MAX_BYTES + 64, output_tokens=200_000)
    charge = charge_of(pm, usage)
    assert charge.amount == (MAX_BYTES + 64 + 200_000) * MAX_CHARGE_MULTIPLIER
    assert charge.amount > MAX_LIMIT
    return charge


def holds(app: App, key: str) -> list[tuple[str, int, int | None]]:
    """The call's holds: (state, amount, spent) in units."""
    h = budget_holds
    with app.engine.connect() as conn:
        rows = conn.execute(
            sa.select(h.c.state, h.c.amount_units, h.c.spent_units).where(
                h.c.idempotency_key == key
            )
        ).all()
    return [(r.state, r.amount_units, r.spent_units) for r in rows]


@pytest.mark.parametrize("limit", ["250", str(MAX_LIMIT)])
def test_a_hard_budget_refuses_a_worst_case_past_the_column_with_its_budget_error(
    app: App, pm: pluggy.PluginManager, limit: str
) -> None:
    app.budgets.set_budget(WS, "monthly", limit=limit)
    pm.hook.byok_reserve_budget(reservation=reservation("r:small", "2"))
    assert pm.hook.byok_settle_budget(settlement=settlement("r:small", "1")) is True
    worst = worst_case(pm)
    with pytest.raises(BudgetExceeded) as info:
        pm.hook.byok_reserve_budget(
            reservation=reservation("r:huge", str(worst.amount), list_cost=worst.list_cost)
        )
    refused = info.value
    assert (refused.workspace_id, refused.budget) == (WS, "monthly")
    assert (refused.needed, refused.spent, refused.reserved) == (worst.amount, 1, 0)
    assert refused.left == Decimal(limit) - 1
    message = str(refused)
    assert f"workspace {WS!r}: budget 'monthly' refuses the call" in message
    assert f"may cost up to {worst.amount:f} USD" in message
    assert f"{refused.left:f} left" in message
    # nothing held; the refusal is audited, and the budget goes on admitting what fits
    assert holds(app, "r:huge") == []
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (1, 0)
    assert any(e.action == "budget.refused" for e in app.audit_store.events(WS))
    hold = pm.hook.byok_reserve_budget(reservation=reservation("r:next", "3"))
    assert hold is not None
    assert hold.amount == 3
    # each amount fits a BIGINT, their sum does not: refused, not an error of the store
    big = str(MAX_LIMIT - 2)
    with pytest.raises(BudgetExceeded) as info:
        pm.hook.byok_reserve_budget(reservation=reservation("r:big", big))
    assert (info.value.needed, info.value.spent, info.value.reserved) == (Decimal(big), 1, 3)


def test_a_soft_budget_at_max_limit_caps_its_holds_and_saturates(
    app: App, pm: pluggy.PluginManager
) -> None:
    app.budgets.set_budget(WS, "soft", limit=str(MAX_LIMIT), hard=False)
    worst = worst_case(pm)
    first = pm.hook.byok_reserve_budget(
        reservation=reservation("r:1", str(worst.amount), list_cost=worst.list_cost)
    )
    # never refused: the hold is what the column can take
    assert first is not None
    assert (first.budgets, first.amount) == (("soft",), MAX_LIMIT)
    assert holds(app, "r:1") == [("held", MAX_UNITS, None)]
    # the column is full: the next call is held too, for nothing more
    second = pm.hook.byok_reserve_budget(reservation=reservation("r:2", "5"))
    assert second is not None
    assert (second.budgets, second.amount) == (("soft",), 0)
    status = app.budgets.get(WS, "soft")
    assert status is not None
    assert (status.spent, status.reserved, status.left) == (0, MAX_LIMIT, 0)
    # the call cost more than the column: spent saturates, the hold is freed
    assert pm.hook.byok_settle_budget(settlement=settlement("r:1", str(worst.amount))) is True
    assert pm.hook.byok_settle_budget(settlement=settlement("r:2", "5")) is True
    status = app.budgets.get(WS, "soft")
    assert status is not None
    assert (status.spent, status.reserved) == (MAX_LIMIT, 0)
    assert holds(app, "r:1") == [("settled", MAX_UNITS, MAX_UNITS)]
    events = [e for e in app.audit_store.events(WS) if e.action == "budget.threshold"]
    assert len(events) == 1
    assert "reached 100% of its limit" in (events[0].detail or "")
    # still working: two worst cases that each fit the column alone, not together
    almost = MAX_LIMIT - 2 * UNIT
    third = pm.hook.byok_reserve_budget(reservation=reservation("r:3", str(almost)))
    fourth = pm.hook.byok_reserve_budget(reservation=reservation("r:4", str(almost)))
    assert third is not None
    assert fourth is not None
    assert (third.amount, fourth.amount) == (almost, 2 * UNIT)
    status = app.budgets.get(WS, "soft")
    assert status is not None
    assert (status.spent, status.reserved) == (MAX_LIMIT, MAX_LIMIT)
    with app.engine.connect() as conn:
        row = conn.execute(sa.select(budgets.c.spent_units, budgets.c.reserved_units)).one()
    assert tuple(row) == (MAX_UNITS, MAX_UNITS)  # integers, never a REAL past the range


def test_a_settlement_past_the_column_keeps_its_ledger_row_and_settles_once(
    app: App, pm: pluggy.PluginManager
) -> None:
    # a limit past $92M too: its thresholds (percent times limit) pass a BIGINT
    app.budgets.set_budget(WS, "monthly", limit="5000000000")
    pm.hook.byok_reserve_budget(reservation=reservation("r:0", "2"))
    assert pm.hook.byok_settle_budget(settlement=settlement("r:0", "1")) is True
    hold = pm.hook.byok_reserve_budget(reservation=reservation("r:1", "10"))
    assert hold is not None
    # the provider reported the most usage it may (10^10 tokens of each kind)
    usage = Usage("openai", MODEL, input_tokens=MAX_TOKEN_COUNT, output_tokens=MAX_TOKEN_COUNT)
    charge = charge_of(pm, usage)
    assert charge.amount == 2 * MAX_TOKEN_COUNT * MAX_CHARGE_MULTIPLIER
    record = UsageRecord("r:1", WS, usage, charge, CredentialSource.PLATFORM, CREDENTIAL.key_id)
    paid = settlement("r:1", str(charge.amount), list_cost=charge.list_cost)
    for _ in range(2):  # the second time (a retry) changes nothing
        assert pm.hook.byok_record_usage_and_settle(records=[record], settlements=[paid]) is True
        rows = list(app.ledger.rows(workspaces=[WS]))
        assert [(r.idempotency_key, r.amount) for r in rows] == [("r:1", charge.amount)]
        status = app.budgets.get(WS, "monthly")
        assert status is not None
        assert (status.spent, status.reserved, status.left) == (MAX_LIMIT, 0, 0)
        assert holds(app, "r:1") == [("settled", to_units(Decimal(10)), MAX_UNITS)]
    assert pm.hook.byok_settle_budget(settlement=paid) is False
    events = [e for e in app.audit_store.events(WS) if e.action == "budget.threshold"]
    assert len(events) == 1
    assert "reached 100% of its limit" in (events[0].detail or "")
    # and the budget refuses the next call clearly
    with pytest.raises(BudgetExceeded) as info:
        pm.hook.byok_reserve_budget(reservation=reservation("r:2", "1"))
    assert (info.value.spent, info.value.left) == (MAX_LIMIT, 0)


def test_a_group_of_settlements_past_the_column_saturates_together(
    app: App, pm: pluggy.PluginManager
) -> None:
    app.budgets.set_budget(WS, "soft", limit="1000", hard=False)
    keys = ("r:1", "r:2")
    for key in keys:
        pm.hook.byok_reserve_budget(reservation=reservation(key, "1"))
    # each fits the column alone; their sum does not
    amount = MAX_LIMIT - UNIT
    usage = Usage("openai", MODEL, input_tokens=1)
    records = [
        UsageRecord(key, WS, usage, Charge(amount=amount), CredentialSource.PLATFORM)
        for key in keys
    ]
    paid = [settlement(key, str(amount)) for key in keys]
    together = pm.hook.byok_record_usage_and_settle(records=records, settlements=paid)
    if together is None:  # SQLite settles a group's calls one by one, as the runner then does
        pm.hook.byok_record_usage_batch(records=records)
        assert [pm.hook.byok_settle_budget(settlement=s) for s in paid] == [True, True]
    else:
        assert together is True
    assert len(list(app.ledger.rows(workspaces=[WS]))) == 2
    status = app.budgets.get(WS, "soft")
    assert status is not None
    assert (status.spent, status.reserved) == (MAX_LIMIT, 0)
    with app.engine.connect() as conn:
        spent = conn.execute(sa.select(budgets.c.spent_units)).scalar_one()
    assert spent == MAX_UNITS


def test_the_runner_refuses_a_16_mb_request_at_top_prices_with_the_budget_error(
    emulator: EmulatorServer, tmp_path: Path, database_url: str
) -> None:
    """The whole path: the runner prices the worst case of a 16 MB prompt at $1 a token times
    1000 (about 1.7e10 USD) and the hard budget refuses it before anything is sent."""
    prices = top_prices(tmp_path / "prices.json", "gpt-4o-mini")
    stack = DemoStack(
        tmp_path / "home",
        emulator,
        database_url=database_url,
        extra_env={
            "BYOK_PRICE_FILE": str(prices),
            "BYOK_CHARGE_MULTIPLIER": str(MAX_CHARGE_MULTIPLIER),
        },
    )
    workflow = parse_workflow(
        {
            "name": "huge",
            "version": "1",
            "blocks": {
                "answer": {
                    "type": "agent",
                    "model": "gpt-4o-mini",
                    "prompt": "{{inputs.text}}",
                    "max_tokens": 200_000,
                }
            },
            "inputs": {"text": {"type": "string"}},
        }
    )
    try:
        stack.app.budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="250")
        result = stack.run(workflow, PLATFORM_WORKSPACE, {"text": "x" * MAX_BYTES})
        assert result.status is RunStatus.FAILED
        answer = result.blocks["answer"]
        assert answer.status is BlockStatus.FAILED
        assert answer.calls == ()
        message = answer.error or ""
        assert f"workspace {PLATFORM_WORKSPACE!r}: budget 'monthly' refuses the call" in message
        assert "of 250 USD 0 is spent, 0 reserved by calls in flight, 250 left" in message
        assert [c for c in emulator.calls() if c.method == "POST"] == []  # never sent
        status = stack.app.budgets.get(PLATFORM_WORKSPACE, "monthly")
        assert status is not None
        assert (status.spent, status.reserved) == (0, 0)
    finally:
        stack.close()
