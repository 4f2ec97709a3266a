"""Workspace budgets in the store, through the hooks: reserve, settle, expiry, periods, thresholds.

Every test runs on a real SQLite file and a real PostgreSQL database (``database_url``). The clock
is the app's own (a value the test moves), so expiry and periods need no sleeping.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pluggy
import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    BudgetExceeded,
    BudgetHold,
    BudgetReservation,
    BudgetSettlement,
    CredentialSource,
)
from keys_support import OPERATOR, keyring_value, master_key, random_key
from migration_support import model_differences

from byok_plugin.app import App
from byok_plugin.billing.budgets import (
    KEEP_HOLDS,
    PRUNE_BATCH,
    PRUNE_EVERY,
    BudgetError,
    BudgetStore,
    budget_holds,
    budgets,
    to_units,
)
from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.keys.reader import sqlite_file_of
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings
from byok_plugin.store import create_store_engine, ensure_migrated

WS = "acme"
START = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def app(database_url: str, tmp_path: Path, clock: Clock) -> Iterator[App]:
    settings = Settings.from_environ(
        {
            "BYOK_HOME": str(tmp_path),
            "BYOK_DATABASE_URL": database_url,
            "BYOK_LOAD_PLUGINS": "byok_plugin",
            "BYOK_ENCRYPTION_KEYS": keyring_value(master_key()),
        }
    )
    built = App(settings, clock=clock)
    yield built
    built.close()


@pytest.fixture
def pm(app: App) -> pluggy.PluginManager:
    return plugin_manager_for(app, load_entrypoints=False)


def reservation(key: str, amount: str, **kw: object) -> BudgetReservation:
    values: dict[str, object] = {
        "idempotency_key": key,
        "workspace_id": WS,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "source": CredentialSource.PLATFORM,
        "amount": Decimal(amount),
        "list_cost": Decimal(amount),
    }
    values.update(kw)
    return BudgetReservation(**values)  # type: ignore[arg-type]


def settlement(key: str, amount: str, **kw: object) -> BudgetSettlement:
    values: dict[str, object] = {
        "idempotency_key": key,
        "workspace_id": WS,
        "amount": Decimal(amount),
        "list_cost": Decimal(amount),
    }
    values.update(kw)
    return BudgetSettlement(**values)  # type: ignore[arg-type]


def test_revision_0007_creates_the_budget_tables_as_modelled(database_url: str) -> None:
    mine = {budgets.name, budget_holds.name}
    engine = create_store_engine(database_url)
    try:
        ensure_migrated(engine)
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= mine
            assert model_differences(conn, mine) == []
    finally:
        engine.dispose()


def test_hook_byok_reserve_budget_without_budgets_holds_nothing(pm: pluggy.PluginManager) -> None:
    assert pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "5")) is None
    assert pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "1")) is False


def test_hook_byok_reserve_budget_holds_then_refuses_what_does_not_fit(
    app: App, pm: pluggy.PluginManager
) -> None:
    app.budgets.set_budget(WS, "monthly", limit="1.00", actor_id="admin")
    hold = pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.60"))
    assert isinstance(hold, BudgetHold)
    assert hold.budgets == ("monthly",)
    assert hold.amount == Decimal("0.6")
    assert hold.expires_at == START + timedelta(seconds=900)
    with pytest.raises(BudgetExceeded) as refused:
        pm.hook.byok_reserve_budget(reservation=reservation("r:b:1", "0.50"))
    message = str(refused.value)
    assert "workspace 'acme'" in message
    assert "budget 'monthly'" in message
    assert "0.6 reserved" in message
    assert "0 is spent" in message
    assert "0.4 left" in message
    assert "up to 0.5 USD" in message
    assert refused.value.left == Decimal("0.4")
    # audited at the app's time (the budget's period is read off the same clock)
    (audited,) = [e for e in app.audit_store.events(WS) if e.action == "budget.refused"]
    assert audited.occurred_at == START
    # the refusal held nothing; a call that fits still goes
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved, status.left) == (0, Decimal("0.6"), Decimal("0.4"))
    assert pm.hook.byok_reserve_budget(reservation=reservation("r:c:1", "0.40")) is not None
    with pytest.raises(BudgetExceeded):
        pm.hook.byok_reserve_budget(reservation=reservation("r:d:1", "0.000000001"))


def test_hook_byok_settle_budget_moves_the_hold_to_spent_once(
    app: App, pm: pluggy.PluginManager
) -> None:
    app.budgets.set_budget(WS, "monthly", limit="1.00")
    pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.60"))
    assert pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "0.25")) is True
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved, status.left) == (Decimal("0.25"), 0, Decimal("0.75"))
    # idempotent on the call's key
    assert pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "0.25")) is False
    assert app.budgets.get(WS, "monthly").spent == Decimal("0.25")  # type: ignore[union-attr]
    # a settled call reserved again (a run repeated under its run id) holds nothing more
    again = pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.60"))
    assert again is not None
    assert again.amount == 0
    assert app.budgets.get(WS, "monthly").reserved == 0  # type: ignore[union-attr]
    # a call that never completed releases its hold and spends nothing
    pm.hook.byok_reserve_budget(reservation=reservation("r:b:1", "0.70"))
    pm.hook.byok_settle_budget(settlement=settlement("r:b:1", "0", completed=False))
    status = app.budgets.get(WS, "monthly")
    assert (status.spent, status.reserved) == (Decimal("0.25"), 0)  # type: ignore[union-attr]


def test_reserving_again_under_the_same_key_replaces_the_hold(
    app: App, pm: pluggy.PluginManager
) -> None:
    app.budgets.set_budget(WS, "monthly", limit="1.00")
    pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.90"))
    # the provider refused the key, another credential serves the same call
    pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.30"))
    assert app.budgets.get(WS, "monthly").reserved == Decimal("0.3")  # type: ignore[union-attr]
    with pytest.raises(BudgetExceeded):  # a replacement that does not fit keeps the old hold
        pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "1.50"))
    assert app.budgets.get(WS, "monthly").reserved == Decimal("0.3")  # type: ignore[union-attr]


def test_a_hold_never_settled_lapses_and_its_capacity_comes_back(
    app: App, pm: pluggy.PluginManager, clock: Clock
) -> None:
    app.budgets.set_budget(WS, "monthly", limit="1.00")
    pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.80", hold_seconds=60))
    with pytest.raises(BudgetExceeded):
        pm.hook.byok_reserve_budget(reservation=reservation("r:b:1", "0.80"))
    clock.advance(seconds=61)
    assert app.budgets.get(WS, "monthly").reserved == 0  # type: ignore[union-attr]
    assert pm.hook.byok_reserve_budget(reservation=reservation("r:b:1", "0.80")) is not None
    with app.engine.connect() as conn:
        row = conn.execute(
            sa.select(budgets.c.reserved_units).where(budgets.c.workspace_id == WS)
        ).one()
    assert row.reserved_units == to_units(Decimal("0.80"))  # the lapsed hold left reserved
    # the late call still counts what it spent when it settles
    assert pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "0.10")) is True
    status = app.budgets.get(WS, "monthly")
    assert (status.spent, status.reserved) == (Decimal("0.1"), Decimal("0.8"))  # type: ignore[union-attr]


def test_a_byok_shadow_budget_counts_list_cost_of_workspace_keys_only(
    app: App, pm: pluggy.PluginManager
) -> None:
    app.budgets.set_budget(WS, "own-keys", limit="1.00", metric="list_cost")
    platform = reservation("r:p:1", "5", source=CredentialSource.PLATFORM)
    assert pm.hook.byok_reserve_budget(reservation=platform) is None
    byok = reservation("r:w:1", "0", list_cost=Decimal("0.9"), source=CredentialSource.WORKSPACE)
    assert pm.hook.byok_reserve_budget(reservation=byok).budgets == ("own-keys",)
    done = settlement("r:w:1", "0", list_cost=Decimal("0.4"), source=CredentialSource.WORKSPACE)
    pm.hook.byok_settle_budget(settlement=done)
    assert app.budgets.get(WS, "own-keys").spent == Decimal("0.4")  # type: ignore[union-attr]


def test_budgets_scoped_to_a_key_or_a_workflow(app: App, pm: pluggy.PluginManager) -> None:
    keys = app.key_service(pm)
    pool = [
        keys.set_key(
            OPERATOR, WS, "openai", random_key("openai"), label=f"pool-{n}", test=False
        ).key.id
        for n in range(2)
    ]
    app.budgets.set_budget(WS, "triage", limit="1", workflow_id="triage")
    app.budgets.set_budget(WS, "pool-0", limit="1", key_id=pool[0])
    other = reservation("r:a:1", "5", workflow_id="other", key_id=pool[1])
    assert pm.hook.byok_reserve_budget(reservation=other) is None
    hold = pm.hook.byok_reserve_budget(
        reservation=reservation("r:b:1", "0.5", workflow_id="triage", key_id=pool[0])
    )
    assert set(hold.budgets) == {"triage", "pool-0"}
    with pytest.raises(BudgetExceeded, match="budget 'triage'"):
        pm.hook.byok_reserve_budget(reservation=reservation("r:c:1", "0.6", workflow_id="triage"))


def test_a_soft_budget_never_refuses_and_thresholds_are_audited_once_per_period(
    app: App, pm: pluggy.PluginManager, clock: Clock
) -> None:
    app.budgets.set_budget(WS, "daily", limit="1.00", hard=False, period="day")
    for n, amount in enumerate(["0.30", "0.30", "0.30", "0.30", "0.30"]):
        key = f"r:{n}:1"
        assert pm.hook.byok_reserve_budget(reservation=reservation(key, "0.60")) is not None
        pm.hook.byok_settle_budget(settlement=settlement(key, amount))
    status = app.budgets.get(WS, "daily")
    assert status is not None
    assert status.spent == Decimal("1.5")
    assert status.left == 0
    events = [e for e in app.audit_store.events(WS) if e.action == "budget.threshold"]
    assert sorted(e.detail.split(" reached ")[1].split("%")[0] for e in events) == [
        "100",
        "50",
        "80",
    ]
    assert all("soft budget 'daily'" in e.detail for e in events)
    # the next day starts from zero, and announces again
    clock.advance(days=1)
    assert app.budgets.get(WS, "daily").spent == 0  # type: ignore[union-attr]
    pm.hook.byok_reserve_budget(reservation=reservation("r:next:1", "0.60"))
    pm.hook.byok_settle_budget(settlement=settlement("r:next:1", "0.55"))
    events = [e for e in app.audit_store.events(WS) if e.action == "budget.threshold"]
    assert len(events) == 4
    assert app.budgets.get(WS, "daily").spent == Decimal("0.55")  # type: ignore[union-attr]


def test_budget_definitions_are_checked_and_kept(app: App) -> None:
    for bad, message in [
        ({"limit": "-1"}, "amount in USD"),
        ({"limit": "0.000"}, "more than 0"),
        ({"limit": "ten"}, "amount in USD"),
        ({"limit": "1", "metric": "tokens"}, "metric is one of charge, list_cost"),
        ({"limit": "1", "period": "week"}, "period is one of day, month, none"),
        ({"limit": "1", "thresholds": "50,abc"}, "whole percentages"),
    ]:
        with pytest.raises(BudgetError, match=message):
            app.budgets.set_budget(WS, "b", **bad)  # type: ignore[arg-type]
    with pytest.raises(BudgetError, match="budget name"):
        app.budgets.set_budget(WS, "no spaces", limit="1")
    made = app.budgets.set_budget(WS, "b", limit="2.5", period="none", thresholds="90")
    assert (made.limit, made.period.value, made.thresholds, made.hard) == (
        Decimal("2.5"),
        "none",
        (90,),
        True,
    )
    changed = app.budgets.set_budget(WS, "b", limit="3", period="none", hard=False)
    assert (changed.limit, changed.hard) == (Decimal(3), False)
    assert [b.name for b in app.budgets.list_budgets(WS)] == ["b"]
    assert app.budgets.list_budgets("other") == []
    assert app.budgets.delete(WS, "b") is True
    assert app.budgets.delete(WS, "b") is False
    assert app.budgets.list_budgets(WS) == []


def test_the_same_idempotency_key_in_two_workspaces_touches_only_its_own_holds(
    app: App, pm: pluggy.PluginManager
) -> None:
    # two tenants chose the same run id: their calls share idempotency keys
    app.budgets.set_budget(WS, "monthly", limit="1.00")
    app.budgets.set_budget("initech", "monthly", limit="1.00")
    pm.hook.byok_reserve_budget(reservation=reservation("nightly:a:1", "0.40"))
    pm.hook.byok_reserve_budget(
        reservation=reservation("nightly:a:1", "0.50", workspace_id="initech")
    )
    # settling one tenant's call leaves the other's hold as it was
    assert pm.hook.byok_settle_budget(settlement=settlement("nightly:a:1", "0.10")) is True
    other = app.budgets.get("initech", "monthly")
    assert other is not None
    assert (other.spent, other.reserved) == (0, Decimal("0.5"))
    # and a settled key in one workspace does not make the other's call "settled already"
    again = pm.hook.byok_reserve_budget(
        reservation=reservation("nightly:a:1", "0.30", workspace_id="initech")
    )
    assert again is not None
    assert again.amount == Decimal("0.3")
    assert pm.hook.byok_settle_budget(
        settlement=settlement("nightly:a:1", "0.20", workspace_id="initech")
    )
    mine, other = app.budgets.get(WS, "monthly"), app.budgets.get("initech", "monthly")
    assert mine is not None
    assert other is not None
    assert (mine.spent, mine.reserved) == (Decimal("0.1"), 0)
    assert (other.spent, other.reserved) == (Decimal("0.2"), 0)


def test_a_released_hold_is_held_again_and_a_late_completion_still_spends(
    app: App, pm: pluggy.PluginManager
) -> None:
    app.budgets.set_budget(WS, "monthly", limit="1.00")
    pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.60"))
    # the call did not complete: released, nothing spent
    assert pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "0", completed=False))
    assert not pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "0", completed=False))
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (0, 0)
    # the run is made again under the same run id: the call is held again, not skipped
    again = pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.60"))
    assert again is not None
    assert again.amount == Decimal("0.6")
    assert app.budgets.get(WS, "monthly").reserved == Decimal("0.6")  # type: ignore[union-attr]
    # released again (a cancelled run), then its record completes: what it cost is spent
    pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "0", completed=False))
    assert pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "0.25")) is True
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (Decimal("0.25"), 0)
    assert pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "0.25")) is False


def test_amounts_are_shown_without_an_exponent(app: App, pm: pluggy.PluginManager) -> None:
    budget = app.budgets.set_budget(WS, "tiny", limit="0.000000001")
    shown = budget.as_dict()
    assert (shown["limit"], shown["left"], shown["spent"]) == ("0.000000001", "0.000000001", "0")
    with pytest.raises(BudgetExceeded) as refused:
        pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.000378"))
    message = str(refused.value)
    assert "of 0.000000001 USD 0 is spent" in message
    assert "E-" not in message


def test_a_refusal_by_one_budget_holds_nothing_on_the_others(
    app: App, pm: pluggy.PluginManager
) -> None:
    app.budgets.set_budget(WS, "wide", limit="10")
    app.budgets.set_budget(WS, "narrow", limit="1", workflow_id="triage")
    hold = pm.hook.byok_reserve_budget(
        reservation=reservation("r:a:1", "0.6", workflow_id="triage")
    )
    assert set(hold.budgets) == {"wide", "narrow"}
    with pytest.raises(BudgetExceeded, match="budget 'narrow'"):
        pm.hook.byok_reserve_budget(reservation=reservation("r:b:1", "0.6", workflow_id="triage"))
    # all or nothing: the budget that had room holds nothing for the refused call either
    assert app.budgets.get(WS, "wide").reserved == Decimal("0.6")  # type: ignore[union-attr]
    assert app.budgets.get(WS, "narrow").reserved == Decimal("0.6")  # type: ignore[union-attr]
    with app.engine.connect() as conn:
        keys = conn.execute(sa.select(budget_holds.c.idempotency_key)).scalars().all()
    assert sorted(keys) == ["r:a:1", "r:a:1"]
    # a replacement hold under another key scope moves off the budget that no longer applies
    pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.2", workflow_id="other"))
    assert app.budgets.get(WS, "wide").reserved == Decimal("0.2")  # type: ignore[union-attr]
    assert app.budgets.get(WS, "narrow").reserved == 0  # type: ignore[union-attr]
    with app.engine.connect() as conn:
        rows = conn.execute(sa.select(budget_holds.c.budget_id)).all()
    assert len(rows) == 1


def test_concurrent_settlements_announce_each_threshold_once(
    app: App, pm: pluggy.PluginManager
) -> None:
    app.budgets.set_budget(WS, "soft", limit="1.00", hard=False)
    keys = [f"r:{n}:1" for n in range(24)]
    for key in keys:
        pm.hook.byok_reserve_budget(reservation=reservation(key, "0.10"))
    # settlements racing on one budget row: each crosses thresholds under the row's lock
    with ThreadPoolExecutor(max_workers=8) as pool:
        done = list(
            pool.map(lambda k: pm.hook.byok_settle_budget(settlement=settlement(k, "0.05")), keys)
        )
    assert done == [True] * len(keys)
    status = app.budgets.get(WS, "soft")
    assert status is not None
    assert (status.spent, status.reserved) == (Decimal("1.2"), 0)
    events = [e for e in app.audit_store.events(WS) if e.action == "budget.threshold"]
    announced = [int(e.detail.split(" reached ")[1].split("%")[0]) for e in events]
    # one event per settlement that crossed; together they name each threshold once at most,
    # and the last one crossed (100) is named
    assert len(announced) == len(set(announced))
    assert 100 in announced
    with app.engine.connect() as conn:
        alerted = conn.execute(sa.select(budgets.c.alerted)).scalar_one()
    assert alerted == "50,80,100"


def test_reserve_and_settle_are_one_statement_each_on_postgresql(
    app: App, pm: pluggy.PluginManager, database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite serializes writers with BEGIN IMMEDIATE on a local file instead")
    app.budgets.set_budget(WS, "monthly", limit="1.00")
    app.budgets.set_budget(WS, "triage", limit="1.00", workflow_id="triage")
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(app.engine, "before_cursor_execute", seen)
    try:
        pm.hook.byok_reserve_budget(reservation=reservation("r:a:1", "0.4", workflow_id="triage"))
        assert len(statements) == 1
        assert pm.hook.byok_settle_budget(settlement=settlement("r:a:1", "0.3")) is True
        assert len(statements) == 2
        with pytest.raises(BudgetExceeded):
            pm.hook.byok_reserve_budget(reservation=reservation("r:b:1", "0.8"))
        # the refusal is one statement too, then its audit row (budget.refused)
        assert len(statements) == 4
        assert "byok_audit_events" in statements[3]
    finally:
        sa.event.remove(app.engine, "before_cursor_execute", seen)
    # no BEGIN/COMMIT around them: each statement commits on its own
    assert not any(s.strip().upper() in ("BEGIN", "COMMIT") for s in statements)
    status = app.budgets.get(WS, "triage")
    assert status is not None
    assert (status.spent, status.reserved) == (Decimal("0.3"), 0)


def test_hook_byok_record_usage_and_settle_commits_rows_and_settlements_together(
    app: App, pm: pluggy.PluginManager, database_url: str
) -> None:
    from ledger_support import record_for

    app.budgets.set_budget(WS, "monthly", limit="1.00")
    records = [record_for(n, workspace=WS) for n in (1, 4)]  # two platform-billed calls
    keys = [r.idempotency_key for r in records]
    for key in keys:
        pm.hook.byok_reserve_budget(reservation=reservation(key, "0.30"))
    together = [settlement(key, "0.10") for key in keys]
    answer = pm.hook.byok_record_usage_and_settle(records=records, settlements=together)
    sqlite_store = not database_url.startswith("postgresql")
    if sqlite_store:
        # SQLite: a group is declined (the runner groups calls on PostgreSQL only), nothing
        # written; one call's row and its settlement commit together (the runner's calls on
        # its event loop)
        assert answer is None
        assert app.ledger.get(keys[0]) is None
        for one in zip(records, together, strict=True):
            answer = pm.hook.byok_record_usage_and_settle(records=[one[0]], settlements=[one[1]])
            assert answer is True
    assert answer is True
    assert all(app.ledger.get(key) is not None for key in keys)
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (Decimal("0.2"), 0)
    # idempotent on each key: the same group again changes nothing
    again = [([r], [s]) for r, s in zip(records, together, strict=True)]
    for group in again if sqlite_store else [(records, together)]:
        assert pm.hook.byok_record_usage_and_settle(records=group[0], settlements=group[1])
    assert app.budgets.get(WS, "monthly").spent == Decimal("0.2")  # type: ignore[union-attr]
    # one transaction: a settlement the store refuses (a trigger of the test's) leaves no row
    # of the group either
    late = [record_for(n, workspace=WS) for n in (7,)]
    pm.hook.byok_reserve_budget(reservation=reservation(late[0].idempotency_key, "0.30"))
    refused = [settlement(late[0].idempotency_key, "0.10")]
    with (
        refusing_spending(app),
        pytest.raises((sa.exc.IntegrityError, StoreUnavailable), match="refuses this settlement"),
    ):
        pm.hook.byok_record_usage_and_settle(records=late, settlements=refused)
    assert app.ledger.get(late[0].idempotency_key) is None
    assert app.budgets.get(WS, "monthly").reserved == Decimal("0.3")  # type: ignore[union-attr]


@contextmanager
def refusing_spending(app: App) -> Iterator[None]:
    """While in the block, the store refuses any statement that adds to a budget's ``spent``."""
    message = "the test refuses this settlement"
    if app.engine.dialect.name == "postgresql":
        create = [
            "CREATE FUNCTION byok_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$",
            "CREATE TRIGGER byok_test_refuse BEFORE UPDATE ON byok_budgets FOR EACH ROW "
            "WHEN (NEW.spent_units > OLD.spent_units) EXECUTE FUNCTION byok_test_refuse()",
        ]
        drop = [
            "DROP TRIGGER byok_test_refuse ON byok_budgets",
            "DROP FUNCTION byok_test_refuse()",
        ]
    else:
        create = [
            "CREATE TRIGGER byok_test_refuse BEFORE UPDATE ON byok_budgets "
            f"WHEN NEW.spent_units > OLD.spent_units BEGIN SELECT RAISE(ABORT, '{message}'); END"
        ]
        drop = ["DROP TRIGGER byok_test_refuse"]
    with app.engine.begin() as conn:
        for statement in create:
            conn.exec_driver_sql(statement)
    try:
        yield
    finally:
        with app.engine.begin() as conn:
            for statement in drop:
                conn.exec_driver_sql(statement)


def hold_rows(app: App) -> int:
    with app.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(budget_holds)).scalar_one())


def reserved_in_rows(app: App) -> tuple[int, int]:
    """The budgets' ``reserved_units`` (summed), and the sum of the holds still marked held."""
    with app.engine.connect() as conn:
        reserved = conn.execute(
            sa.select(sa.func.sum(budgets.c.reserved_units)).where(budgets.c.workspace_id == WS)
        ).scalar_one()
        held = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(budget_holds.c.amount_units), 0)).where(
                budget_holds.c.state == "held"
            )
        ).scalar_one()
    return int(reserved), int(held)


def test_settled_and_expired_holds_are_pruned_once_kept_long_enough(
    app: App, pm: pluggy.PluginManager, clock: Clock
) -> None:
    # every reservation expires and prunes, as on PostgreSQL (on SQLite a store does it every
    # ``prune_every``-th reservation: test_on_sqlite_lapsed_holds_are_expired_and_old_ones_...)
    app.budgets = BudgetStore(app.engine, clock=clock, prune_every=1)
    app.budgets.set_budget(WS, "monthly", limit="10.00")
    for n in range(90):  # settled
        pm.hook.byok_reserve_budget(reservation=reservation(f"r:s:{n}", "0.02"))
        assert pm.hook.byok_settle_budget(settlement=settlement(f"r:s:{n}", "0.01"))
    for n in range(5):  # released: the call did not complete
        pm.hook.byok_reserve_budget(reservation=reservation(f"r:x:{n}", "0.02"))
        pm.hook.byok_settle_budget(settlement=settlement(f"r:x:{n}", "0", completed=False))
    for n in range(5):  # never settled (a worker killed): the holds lapse after a minute
        pm.hook.byok_reserve_budget(reservation=reservation(f"r:k:{n}", "0.02", hold_seconds=60))
    assert hold_rows(app) == 100
    # within KEEP_HOLDS nothing is pruned: a repeated settlement still finds its call settled,
    # and a lapsed hold's late settlement still spends
    clock.advance(hours=1)
    pm.hook.byok_reserve_budget(reservation=reservation("r:late:1", "0.02"))
    assert hold_rows(app) == 101
    assert reserved_in_rows(app) == (to_units(Decimal("0.02")),) * 2  # the lapsed ones freed
    assert pm.hook.byok_settle_budget(settlement=settlement("r:s:0", "0.01")) is False
    assert pm.hook.byok_settle_budget(settlement=settlement("r:k:0", "0.01")) is True
    assert pm.hook.byok_settle_budget(settlement=settlement("r:late:1", "0.01")) is True
    spent = app.budgets.get(WS, "monthly").spent  # type: ignore[union-attr]
    assert spent == Decimal("0.92")

    # a day later: each reservation deletes at most PRUNE_BATCH old holds, never the new one
    clock.advance(seconds=KEEP_HOLDS.total_seconds() + 3600)
    pm.hook.byok_reserve_budget(reservation=reservation("r:new:1", "0.02"))
    assert hold_rows(app) == 101 + 1 - PRUNE_BATCH
    pm.hook.byok_reserve_budget(reservation=reservation("r:new:2", "0.02"))
    with app.engine.connect() as conn:
        left = conn.execute(sa.select(budget_holds.c.idempotency_key)).scalars().all()
    assert sorted(left) == ["r:new:1", "r:new:2"]
    assert reserved_in_rows(app) == (to_units(Decimal("0.04")),) * 2  # pruning freed nothing
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (spent, Decimal("0.04"))
    # a duplicate settlement of a pruned call changes nothing (nor does a late one of a pruned
    # lapsed hold: kept for a day, not forever)
    assert pm.hook.byok_settle_budget(settlement=settlement("r:s:1", "0.01")) is False
    assert pm.hook.byok_settle_budget(settlement=settlement("r:k:1", "0.01")) is False
    assert app.budgets.get(WS, "monthly").spent == spent  # type: ignore[union-attr]
    # and a duplicate of a call still kept changes nothing either
    assert pm.hook.byok_settle_budget(settlement=settlement("r:new:1", "0.01")) is True
    assert pm.hook.byok_settle_budget(settlement=settlement("r:new:1", "0.01")) is False
    status = app.budgets.get(WS, "monthly")
    assert (status.spent, status.reserved) == (spent + Decimal("0.01"), Decimal("0.02"))  # type: ignore[union-attr]


def test_under_steady_calls_the_hold_table_stays_bounded(
    app: App, pm: pluggy.PluginManager, clock: Clock
) -> None:
    app.budgets.set_budget(WS, "monthly", limit="1.00", period="none")
    app.budgets.set_budget(WS, "triage", limit="1.00", period="none", workflow_id="triage")
    every = timedelta(minutes=10)
    hold = timedelta(minutes=15)
    # a multiple of PRUNE_EVERY: on SQLite the store's next reservation is one that expires and
    # prunes (the first of a store and every PRUNE_EVERY-th after it do)
    calls = 25 * PRUNE_EVERY
    most = 0
    for n in range(calls):
        key = f"r:{n}:1"
        assert pm.hook.byok_reserve_budget(
            reservation=reservation(key, "0.002", workflow_id="triage", hold_seconds=900)
        )
        if n % 10:  # one call in ten never settles
            assert pm.hook.byok_settle_budget(settlement=settlement(key, "0.001"))
        most = max(most, hold_rows(app))
        clock.advance(seconds=every.total_seconds())
    # two holds per call (two budgets), kept while the call's expiry is within KEEP_HOLDS; on
    # SQLite, plus those of the calls made since the store's last pruning reservation
    between = 0 if app.engine.dialect.name == "postgresql" else PRUNE_EVERY
    bound = 2 * ((KEEP_HOLDS + hold) // every + 2 + between)
    assert most <= bound < 2 * calls
    assert hold_rows(app) <= bound
    # the budgets carry what was spent, and only the lapsed holds' capacity came back
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert status.spent == Decimal("0.001") * (calls - calls // 10)
    assert status.reserved == 0  # the last call settled; the holds still marked held lapsed
    reserved, held = reserved_in_rows(app)
    assert reserved == held  # each hold counted once in the budgets' rows
    # the next reservation expires the lapsed ones (on SQLite: it is a pruning one)
    clock.advance(seconds=every.total_seconds())
    assert pm.hook.byok_reserve_budget(reservation=reservation("r:last:1", "0.002"))
    assert pm.hook.byok_settle_budget(settlement=settlement("r:last:1", "0.001"))
    assert reserved_in_rows(app) == (0, 0)


def test_pruning_while_many_threads_reserve_and_settle_keeps_the_accounts(app: App) -> None:
    """Pruning in the reservation's statement while other calls reserve, settle, lapse and are
    pruned: no error, what is spent and reserved stays exact, and the table stays small."""
    ticks = itertools.count()
    # every reading of the clock is a second later: holds (2 minutes) lapse and, kept 0 seconds
    # after that, are pruned while the threads still run (a call whose hold was pruned before it
    # settled spends nothing: counted as not settled below)
    store = BudgetStore(
        app.engine,
        clock=lambda: START + timedelta(seconds=next(ticks)),
        keep_holds=timedelta(0),
    )
    try:
        store.set_budget(WS, "monthly", limit="1000", period="none")
        store.set_budget(WS, "triage", limit="1000", period="none", workflow_id="triage")
        threads, calls = 8, 40

        def work(worker: int) -> int:
            settled = 0
            for n in range(calls):
                key = f"r:{worker}-{n}:1"
                store.reserve(reservation(key, "0.002", workflow_id="triage", hold_seconds=120))
                if n % 10 == 9:
                    continue  # never settled: lapses, then is pruned
                changed, _events = store.settle(settlement(key, "0.001"))
                settled += changed
                # a duplicate settlement, before or after its holds were pruned, changes nothing
                assert store.settle(settlement(key, "0.001")) == (False, [])
            return settled

        with ThreadPoolExecutor(threads) as pool:
            settled = sum(pool.map(work, range(threads)))
        status = store.get(WS, "triage")
        assert status is not None
        assert settled > threads * calls // 2
        assert status.spent == Decimal("0.001") * settled
        store.reserve(reservation("r:last:1", "0.002", workflow_id="triage"))
        reserved, held = reserved_in_rows(app)
        assert reserved == held  # no hold freed twice, none forgotten
        assert hold_rows(app) < 2 * threads * calls // 4
    finally:
        store.close()


@pytest.mark.parametrize("prune_every", [1, 16])
def test_a_call_reserved_again_after_its_hold_lapsed_is_counted_once(
    app: App, clock: Clock, prune_every: int
) -> None:
    # the lapsed hold is freed once (by the expiry or by its replacement, not both), whether
    # the reservation that replaces it expires lapsed holds or not
    store = BudgetStore(app.engine, clock=clock, prune_every=prune_every)
    try:
        store.set_budget(WS, "monthly", limit="1.00")
        assert store.reserve(reservation("r:a:1", "0.50", hold_seconds=60))
        assert store.reserve(reservation("r:b:1", "0.20", hold_seconds=60))
        clock.advance(seconds=61)
        assert store.reserve(reservation("r:a:1", "0.30"))
        assert store.reserve(reservation("r:c:1", "0.70"))  # fits once r:b:1 is expired
        reserved, held = reserved_in_rows(app)
        assert reserved == held == to_units(Decimal("1.00"))
        status = store.get(WS, "monthly")
        assert status is not None
        assert (status.reserved, status.left) == (Decimal("1"), 0)
    finally:
        store.close()


def test_on_sqlite_lapsed_holds_are_expired_and_old_ones_pruned_every_nth_reservation(
    app: App, database_url: str, clock: Clock
) -> None:
    """On SQLite a store's first reservation and every ``prune_every``-th after it expire the
    workspace's lapsed holds and prune its old ones; a reservation that does not fit a hard
    budget expires the lapsed holds at once and is admitted if that made room."""
    if not database_url.startswith("sqlite"):
        pytest.skip("on PostgreSQL every reservation's statement expires and prunes")
    store = BudgetStore(app.engine, clock=clock, prune_every=4)

    def row_reserved() -> Decimal:
        with app.engine.connect() as conn:
            units = conn.execute(
                sa.select(budgets.c.reserved_units).where(budgets.c.workspace_id == WS)
            ).scalar_one()
        return Decimal(units) * Decimal("0.000000001")

    def states() -> dict[str, str]:
        with app.engine.connect() as conn:
            rows = conn.execute(sa.select(budget_holds.c.idempotency_key, budget_holds.c.state))
            return {str(key): str(state) for key, state in rows}

    try:
        store.set_budget(WS, "monthly", limit="1.00")
        for n in range(3):  # reservations 0-2; their workers die, the holds lapse in a minute
            assert store.reserve(reservation(f"k:{n}", "0.30", hold_seconds=60))
        clock.advance(seconds=61)
        status = store.get(WS, "monthly")
        assert status is not None
        assert status.reserved == 0  # what operators see: live holds only
        assert row_reserved() == Decimal("0.90")  # the row still counts them, marked held
        # reservation 3: fits beside them, nothing expired
        assert store.reserve(reservation("k:3", "0.05", hold_seconds=3600))
        assert row_reserved() == Decimal("0.95")
        assert set(states().values()) == {"held"}
        # reservation 4 is a pruning one: the lapsed holds expire and leave the row's reserved
        assert store.reserve(reservation("k:4", "0.05", hold_seconds=3600))
        assert row_reserved() == Decimal("0.10")
        assert [states()[f"k:{n}"] for n in range(5)] == ["expired"] * 3 + ["held"] * 2
        # reservation 5 lapses too; reservation 6 does not fit until it is expired, then does
        assert store.reserve(reservation("k:5", "0.50", hold_seconds=60))
        clock.advance(seconds=61)
        assert row_reserved() == Decimal("0.60")
        assert store.reserve(reservation("k:6", "0.80", hold_seconds=3600))
        assert row_reserved() == Decimal("0.90")
        assert states()["k:5"] == "expired"
        # reservation 7 does not fit even then: refused, naming what the live holds reserve
        with pytest.raises(BudgetExceeded) as refused:
            store.reserve(reservation("k:7", "0.20"))
        assert (refused.value.reserved, refused.value.left) == (Decimal("0.9"), Decimal("0.1"))
        assert "k:7" not in states()
        # a day later: the refusal counted (7), reservation 8 prunes, 9 does not
        for key in ("k:3", "k:4", "k:6"):
            assert store.settle(settlement(key, "0.01")) == (True, [])
        clock.advance(seconds=KEEP_HOLDS.total_seconds() + 7200)
        assert store.reserve(reservation("k:8", "0.05"))
        assert sorted(states()) == ["k:8"]
        assert store.settle(settlement("k:8", "0.01")) == (True, [])
        clock.advance(seconds=KEEP_HOLDS.total_seconds() + 7200)
        assert store.reserve(reservation("k:9", "0.05"))
        assert sorted(states()) == ["k:8", "k:9"]  # k:8 is old now, pruned by reservation 12
        status = store.get(WS, "monthly")
        assert status is not None
        assert (status.spent, status.reserved) == (Decimal("0.04"), Decimal("0.05"))
        assert row_reserved() == Decimal("0.05")
    finally:
        store.close()


def test_on_sqlite_a_calls_holds_are_found_by_their_key_not_by_reading_the_workspaces(
    app: App, database_url: str
) -> None:
    # every reservation and settlement runs these statements: found through the workspace's
    # (workspace, state, expiry) index alone they read every hold kept (a day's), and the
    # per-call cost grows with the table
    if not database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL reserves and settles with its own statements")
    app.budgets.set_budget(WS, "monthly", limit="1.00")
    direct = app.budgets._direct
    assert direct is not None
    path = sqlite_file_of(app.engine)
    assert path is not None
    conn = sqlite3.connect(str(path))
    try:
        for name in ("budgets_held", "forget", "held", "prune"):
            text, order, _, _ = direct._compiled[name]
            plan = [
                row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {text}", [None] * len(order))
            ]
            on_holds = [step for step in plan if "byok_budget_holds" in step]
            assert on_holds, (name, plan)
            for step in on_holds:
                assert "idempotency_key=?" in step or "state=?" in step, (name, plan)
    finally:
        conn.close()


def test_a_settlement_whose_key_another_workspace_recorded_settles_nothing(
    app: App, pm: pluggy.PluginManager
) -> None:
    from dataclasses import replace

    from ledger_support import record_for

    from byok_plugin.core.errors import StoreRefusedValue

    app.budgets.set_budget(WS, "monthly", limit="1.00")
    theirs = record_for(1, workspace="someone-else")
    app.ledger.record(theirs)
    key = theirs.idempotency_key
    pm.hook.byok_reserve_budget(reservation=reservation(key, "0.30"))
    ours = replace(record_for(4, workspace=WS), idempotency_key=key)
    # one transaction: the row is refused, so the settlement is not made either
    with pytest.raises(StoreRefusedValue, match="another workspace"):
        pm.hook.byok_record_usage_and_settle(records=[ours], settlements=[settlement(key, "0.10")])
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (0, Decimal("0.3"))
    assert app.ledger.get(key).workspace_id == "someone-else"  # type: ignore[union-attr]


def test_a_replayed_spool_row_settles_its_calls_budget_hold(
    app: App, pm: pluggy.PluginManager, clock: Clock
) -> None:
    # while the store was down, a call's row went to the local spool and its settlement failed
    # too: the replay that writes the row settles the hold, lapsed or not, once
    from dataclasses import replace

    from ledger_support import record_for

    app.budgets.set_budget(WS, "monthly", limit="1.00")
    calls = [replace(record_for(n, workspace=WS), occurred_at=START) for n in (1, 4)]
    for record in calls:  # two platform-billed calls, holding 0.30 each
        pm.hook.byok_reserve_budget(
            reservation=reservation(record.idempotency_key, "0.30", hold_seconds=60)
        )
        app.durable_ledger.spool.add(record, "the store did not answer")
    clock.advance(seconds=30)
    assert app.durable_ledger.replay().replayed == 1 + 1
    spent = sum((r.charge.amount for r in calls), Decimal(0))
    assert spent > 0
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (spent, 0)
    # a call whose hold lapsed before the replay still spends what it cost
    late = replace(record_for(7, workspace=WS), occurred_at=START)
    pm.hook.byok_reserve_budget(
        reservation=reservation(late.idempotency_key, "0.30", hold_seconds=60)
    )
    app.durable_ledger.spool.add(late, "the store did not answer")
    clock.advance(seconds=120)
    app.budgets.reserve(reservation("r:expiring", "0.01"))  # a reservation expires lapsed holds
    app.durable_ledger.replay()
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert status.spent == spent + late.charge.amount
    # a replay of rows already recorded settles nothing twice
    for record in [*calls, late]:
        app.durable_ledger.spool.add(record, "written twice")
    app.durable_ledger.replay()
    assert app.budgets.get(WS, "monthly").spent == spent + late.charge.amount  # type: ignore[union-attr]
