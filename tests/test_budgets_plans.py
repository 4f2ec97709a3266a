"""How PostgreSQL runs a reservation and a settlement: planned once per connection (their generic
plans), and reading the call's own holds, not every hold the workspace kept for a day.

PostgreSQL only (``database_url``'s SQLite case is skipped: its statements are planned once by
``sqlite3`` and :mod:`tests.test_budgets` counts them). A real database: the plans are the
server's, read from ``EXPLAIN (ANALYZE)`` and ``pg_prepared_statements``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from byok_hookspecs import BudgetReservation, BudgetSettlement
from clock_support import ShiftedClock
from test_budgets import WS, reservation

from byok_plugin.app import App
from byok_plugin.billing.budgets import _PG_RESERVE, PRUNE_BATCH
from byok_plugin.settings import Settings


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's plans: SQLite compiles each statement once per connection")
    built = App(
        Settings.from_environ(
            {
                "BYOK_HOME": str(tmp_path),
                "BYOK_DATABASE_URL": database_url,
                "BYOK_LOAD_PLUGINS": "byok_plugin",
            }
        ),
        # the statements run by hand and the store's settlements must read one month
        clock=ShiftedClock(),
    )
    yield built
    built.close()


def settlement(key: str) -> BudgetSettlement:
    return BudgetSettlement(idempotency_key=key, workspace_id=WS, amount=Decimal("0.004"))


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)


def prepared(conn: sa.Connection, like: str) -> tuple[int, int]:
    """(generic plans, custom plans) of this session's prepared statement that contains ``like``."""
    row = conn.exec_driver_sql(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE strpos(statement, %(like)s) > 0",
        {"like": like},
    ).one()
    return int(row[0]), int(row[1])


def test_a_reservation_reads_the_calls_holds_not_the_workspaces(app: App) -> None:
    budget = app.budgets.set_budget(WS, "monthly", limit="1000")
    with app.engine.begin() as conn:
        budget_id = conn.exec_driver_sql(
            "SELECT id FROM byok_budgets WHERE workspace_id = %(ws)s", {"ws": WS}
        ).scalar_one()
        # a busy day: 3000 settled holds of the workspace, kept (not yet prunable); the
        # statistics left as a fresh table has them (none), as for a workspace that just grew
        conn.exec_driver_sql("ALTER TABLE byok_budget_holds SET (autovacuum_enabled = false)")
        now = app.clock()
        conn.exec_driver_sql(
            "INSERT INTO byok_budget_holds (idempotency_key, budget_id, workspace_id, state, "
            "amount_units, spent_units, expires_at, created_at, settled_at) "
            "SELECT 'old:' || n, %(id)s, %(ws)s, 'settled', 10, 5, %(exp)s, %(now)s, %(now)s "
            "FROM generate_series(1, 3000) n",
            {"id": budget_id, "ws": WS, "exp": now + timedelta(minutes=15), "now": now},
        )
    params = app.budgets._reserve_params(held_for_ten_units("r:new:1"), now)
    with app.engine.connect() as conn, conn.begin() as transaction:
        explained = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + _PG_RESERVE, params
        ).scalar_one()
        transaction.rollback()
    plan = (json.loads(explained) if isinstance(explained, str) else explained)[0]["Plan"]
    nodes = list(plan_nodes(plan))
    # the call's holds by their key (the primary key), and the prune by its index: no node
    # reads the workspace's holds to throw them away
    assert max(n.get("Rows Removed by Filter", 0) for n in nodes) < 10, nodes
    assert all(n.get("Actual Rows", 0) < 10 for n in nodes), nodes
    # and the statement did what it does: the hold is written
    hold = app.budgets.reserve(reservation("r:new:2", "0.01"))
    assert hold is not None
    assert hold.budgets == (budget.name,)


def held_for_ten_units(key: str, **kw: object) -> BudgetReservation:
    """A platform call's reservation of 10 units of charge (no list cost), held 15 minutes."""
    return reservation(key, "0.00000001", list_cost=Decimal(0), **kw)


def test_the_prune_batch_in_the_reservation_is_prune_batch() -> None:
    # a literal in the statement (a generic plan takes a LIMIT parameter for a tenth of the rows)
    assert f"LIMIT {PRUNE_BATCH})" in _PG_RESERVE


def test_a_reservation_and_a_group_settlement_are_planned_once_per_connection(app: App) -> None:
    app.budgets.set_budget(WS, "monthly", limit="1000")
    app.budgets.set_budget("other", "monthly", limit="1000")
    with app.engine.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        for n in range(24):
            workspace = WS if n % 2 else "other"  # two workspaces: not one value's plan
            now = app.clock()  # one reading: the periods, the time and the expiry agree
            held = held_for_ten_units(f"r:{n}", workspace_id=workspace)
            rows = autocommit.exec_driver_sql(
                _PG_RESERVE, app.budgets._reserve_params(held, now)
            ).all()
            assert rows[0].fits
        generic, custom = prepared(autocommit, "WITH prev AS")
        # psycopg prepares it after its 5th run; the server plans its first 5 runs prepared,
        # then keeps the generic plan
        assert (generic, custom) == (24 - 5 - 5, 5)

    with app.engine.connect() as conn:  # (a connection of its own: not in autocommit)
        for n in range(1, 24, 2):
            with conn.begin():
                changed, _ = app.budgets.settle_in(conn, [settlement(f"r:{n}")])
            assert changed == {(WS, f"r:{n}")}
            # SET LOCAL: the rest of the transaction only
            assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one() == "auto"
            conn.commit()  # (not a rollback: psycopg forgets its prepared statements then)
        generic, custom = prepared(conn, "unnest(")
        assert (generic, custom) == (12 - 5, 0)  # prepared after the 5th, never planned again
    status = app.budgets.get(WS, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (Decimal("0.048"), Decimal(0))
