"""Budgets that hold under concurrency, shown with real processes.

- 8 processes x 32 runs in flight each, one shared store (a SQLite file, a PostgreSQL database),
  platform-billed calls against the emulator, a hard limit of N worst-case calls: the settled total
  never exceeds the limit, a call was refused only when what was left could not hold its worst case,
  and every ledger row has exactly one settlement (and nothing stays held).
- A worker killed with SIGKILL between reserve and settle leaves holds that lapse at their expiry:
  the capacity comes back.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from budget_support import WORKSPACE, name_of, one_call, run_calls
from byok_hookspecs import BudgetExceeded, BudgetReservation, CredentialSource
from clock_support import ShiftedClock

from byok_plugin.app import App
from byok_plugin.billing.budgets import UNIT, budget_holds, budgets, to_units
from byok_plugin.cli.demo import PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.manager import plugin_manager_for

assert WORKSPACE == PLATFORM_WORKSPACE
PROCESSES = 8
CONCURRENCY = 32
#: the hard limit, in worst-case calls: fewer than the 256 calls made, so some are refused
N_CALLS = 48
REFUSAL = re.compile(
    r"may cost up to (?P<needed>[\d.E+-]+) USD, and of (?P<limit>[\d.E+-]+) USD "
    r"(?P<spent>[\d.E+-]+) is spent, (?P<reserved>[\d.E+-]+) reserved by calls in flight, "
    r"(?P<left>[\d.E+-]+) left"
)


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    # the workers spend a monthly budget over many calls: no month may begin between them
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url, clock=ShiftedClock())
    yield built
    built.close()


def one_hold(stack: DemoStack) -> Decimal:
    """One call's worst case as the runner holds it: measured on a call run here, then cleared."""
    stack.app.budgets.set_budget(WORKSPACE, "probe", limit="1000")
    result = stack.run(one_call(), WORKSPACE, {"name": name_of(0, 0)})
    assert result.ok, result.error
    with stack.app.engine.connect() as conn:
        (units,) = conn.execute(sa.select(budget_holds.c.amount_units)).one()
    stack.app.budgets.delete(WORKSPACE, "probe")
    return Decimal(units) * UNIT


def ledger_and_holds(app: App) -> tuple[dict[str, Decimal], list[sa.Row]]:
    rows = {r.idempotency_key: r.amount for r in app.ledger.rows(workspaces=[WORKSPACE])}
    with app.engine.connect() as conn:
        holds = conn.execute(sa.select(budget_holds)).all()
    return rows, holds


def test_eight_processes_never_overshoot_a_hard_limit(stack: DemoStack) -> None:
    hold = one_hold(stack)
    before = {r.idempotency_key for r in stack.app.ledger.rows(workspaces=[WORKSPACE])}
    limit = N_CALLS * hold
    stack.app.budgets.set_budget(WORKSPACE, "hard", limit=limit, period="month")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(PROCESSES)
    with ctx.Pool(PROCESSES) as pool:
        pending = [
            pool.apply_async(
                run_calls,
                (stack.environ, worker, CONCURRENCY, CONCURRENCY, barrier),
                {"clock": stack.clock},
            )
            for worker in range(1, PROCESSES + 1)
        ]
        results = [p.get(timeout=600) for p in pending]
    completed = sum(r["completed"] for r in results)
    errors = [e for r in results for e in r["errors"]]
    assert completed + len(errors) == PROCESSES * CONCURRENCY
    # every run that did not complete was refused by the budget, and only when what was left
    # (beyond what the calls in flight held) could not hold its worst case
    assert errors, "the limit is meant to refuse some of the calls"
    for error in errors:
        assert "budget 'hard' refuses the call" in error, error
        found = REFUSAL.search(error)
        assert found is not None, error
        numbers = {k: Decimal(v) for k, v in found.groupdict().items()}
        assert numbers["needed"] == hold
        assert numbers["limit"] == limit
        assert numbers["left"] < numbers["needed"]
        assert numbers["spent"] + numbers["reserved"] + numbers["needed"] > numbers["limit"]
    assert completed >= N_CALLS  # every worst case that fitted was admitted
    status = stack.app.budgets.get(WORKSPACE, "hard")
    assert status is not None
    ledger, holds = ledger_and_holds(stack.app)
    calls = {k: v for k, v in ledger.items() if k not in before}
    assert len(calls) == completed
    # 0 overshoot: neither the budget's count nor the ledger's charges pass the limit
    assert status.spent <= limit
    assert sum(calls.values(), Decimal(0)) <= limit
    # every ledger row has exactly one settlement, of its charge rounded up; nothing stays held
    settled = [h for h in holds if h.state == "settled"]
    assert sorted(h.idempotency_key for h in settled) == sorted(calls)
    assert all(h.spent_units == to_units(calls[h.idempotency_key]) for h in settled)
    assert [h for h in holds if h.state != "settled"] == []
    assert status.reserved == 0
    with stack.app.engine.connect() as conn:
        row = conn.execute(sa.select(budgets).where(budgets.c.name == "hard")).one()
    assert row.reserved_units == 0
    assert row.spent_units == sum(h.spent_units for h in settled)


def test_a_worker_killed_between_reserve_and_settle_leaves_no_permanent_hold(
    stack: DemoStack,
) -> None:
    hold = one_hold(stack)
    stack.app.budgets.set_budget(WORKSPACE, "hard", limit=4 * hold)
    # the provider answers slowly: the worker's calls are in flight, held, when it is killed
    stack.emulator.add_fault(Fault(FaultKind.SLOW, provider="openai", delay=5.0, times=None))
    ctx = multiprocessing.get_context("spawn")
    worker = ctx.Process(
        target=run_calls, args=(stack.environ, 1, 3, 3), kwargs={"clock": stack.clock}
    )
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while stack.app.budgets.get(WORKSPACE, "hard").reserved < 3 * hold:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the worker never reserved"
            assert worker.is_alive()
            time.sleep(0.05)
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.join(timeout=30)
    assert worker.exitcode == -signal.SIGKILL
    stack.emulator.state.reset()
    pm = stack.pm

    def reservation(key: str) -> BudgetReservation:
        return BudgetReservation(
            key, WORKSPACE, "openai", "gpt-4o-mini", CredentialSource.PLATFORM, hold, hold
        )

    # the dead worker's holds still count: room for one worst case, not two
    assert pm.hook.byok_reserve_budget(reservation=reservation("after:1")) is not None
    with pytest.raises(BudgetExceeded, match="budget 'hard'"):
        pm.hook.byok_reserve_budget(reservation=reservation("after:2"))
    # once they expire, the capacity is back (an app whose clock is past the holds' expiry)
    later = App(stack.settings, clock=lambda: stack.clock() + timedelta(seconds=901))
    try:
        later_pm = plugin_manager_for(later)
        status = later.budgets.get(WORKSPACE, "hard")
        assert status is not None
        assert status.reserved == 0  # after:1's hold lapsed too, by this clock
        for n in range(4):
            assert later_pm.hook.byok_reserve_budget(reservation=reservation(f"later:{n}"))
        with pytest.raises(BudgetExceeded):
            later_pm.hook.byok_reserve_budget(reservation=reservation("later:4"))
        with later.engine.connect() as conn:
            row = conn.execute(sa.select(budgets).where(budgets.c.name == "hard")).one()
            states = conn.execute(
                sa.select(budget_holds.c.state, sa.func.count())
                .group_by(budget_holds.c.state)
                .order_by(budget_holds.c.state)
            ).all()
        assert row.reserved_units == 4 * to_units(hold)  # the lapsed holds left the count
        assert [tuple(s) for s in states] == [("expired", 4), ("held", 4)]
    finally:
        later.close()
