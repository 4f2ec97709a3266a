"""The runner's per-call time with a workspace budget against without one, in the same run.

Two platform-billed workspaces in one store: ``plain`` has no budget, ``budgeted`` a hard monthly
budget large enough never to refuse. Each run is one agent block through :class:`WorkflowRunner`
and the real plugin, against the emulator in its own process. With a budget every call adds
``byok_compute_charge`` of its worst case, ``byok_reserve_budget`` (on SQLite one write
transaction: expire lapsed holds, the conditional admission, the hold's row; on PostgreSQL one
statement) and its settlement (on SQLite ``byok_settle_budget``, another transaction; on
PostgreSQL inside the group commit's transaction); without one, the reserve finds no budget (a
read on SQLite, the same one statement on PostgreSQL). The paths alternate in adjacent
chunks, as in ``bench_runner``; the verdict is the paired ratio of median per-call times.

The store is a SQLite file, or ``BENCH_BUDGET_DATABASE_URL`` (a PostgreSQL database, say). On
PostgreSQL, ``BENCH_BUDGET_BREAKDOWN=1`` first prints what a budgeted call's parts cost one by one
(:func:`breakdown`: a worker-thread trip, a pool checkout, a round trip, a commit's WAL flush, the
reservation's statement and its server time, the settlement in a group transaction).
``BENCH_BUDGET_HOLDS=N`` first writes N settled holds of the budgeted workspace, kept (as a busy
day leaves them, :data:`~byok_plugin.billing.budgets.KEEP_HOLDS`): a call's cost must not grow
with them.

Target: with a budget at most 1.15x the per-call time without.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from benchmarks.bench_runner import (
    WORKFLOW,
    Call,
    Samples,
    alternate,
    chunk,
    free_port,
    paired_ratio,
    start_emulator,
)
from byok_plugin.app import App
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import realistic_key
from byok_plugin.core.crypto import generate_master_key
from byok_plugin.host.emulator.server import describe
from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

CALLS = int(os.environ.get("BENCH_BUDGET_CALLS", "1000"))
CONCURRENCY = tuple(int(c) for c in os.environ.get("BENCH_BUDGET_CONCURRENCY", "1,16").split(","))
TARGET = 1.15
PATHS = {"no budget": "plain", "hard budget": "budgeted"}


async def measure(environ: dict[str, str], pm: object, concurrency: int) -> dict[str, Samples]:
    options = RunnerOptions(max_concurrent_calls=concurrency, block_retries=0)
    async with WorkflowRunner.open(pm, environ=environ, options=options) as runner:  # type: ignore[arg-type]

        def through(workspace: str) -> Call:
            async def run() -> None:
                result = await runner.run(WORKFLOW, workspace_id=workspace, actor=OPERATOR)
                if not result.ok:
                    raise RuntimeError(result.error)

            return run

        paths = {name: through(ws) for name, ws in PATHS.items()}
        for call in paths.values():  # warm-up
            await chunk(call, max(concurrency * 2, 20), concurrency, Samples())
        size = 1 if concurrency == 1 else min(CALLS, concurrency * 4)
        results = await alternate(paths, CALLS, size, concurrency)
    return results


def _median_us(fn: Callable[[], object], runs: int = 300) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def seed_holds(app: App, workspace: str, count: int) -> None:
    """``count`` settled holds of ``workspace``'s budgets, kept for a day (not yet prunable)."""
    import sqlalchemy as sa

    from byok_plugin.billing.budgets import budget_holds, budgets

    now = datetime.now(UTC)
    with app.engine.begin() as conn:
        ids = conn.execute(
            sa.select(budgets.c.id).where(budgets.c.workspace_id == workspace)
        ).scalars()
        for budget_id in ids.all():
            for start in range(0, count, 5000):
                conn.execute(
                    sa.insert(budget_holds),
                    [
                        {
                            "idempotency_key": f"seed:{n}",
                            "budget_id": budget_id,
                            "workspace_id": workspace,
                            "state": "settled",
                            "amount_units": 1000,
                            "spent_units": 500,
                            "expires_at": now + timedelta(minutes=15),
                            "created_at": now,
                            "settled_at": now,
                        }
                        for n in range(start, min(start + 5000, count))
                    ],
                )


def breakdown(app: App, url: str) -> None:
    """A budgeted call's parts on PostgreSQL, each alone (median of 300, microseconds), in a
    workspace of its own (``breakdown``, a hard budget that never refuses)."""
    import psycopg
    from byok_hookspecs import BudgetReservation, BudgetSettlement, CredentialSource

    from byok_plugin.billing.budgets import _PG_RESERVE

    ws = "breakdown"
    store = app.budgets
    store.set_budget(ws, "monthly", limit="1000000")
    keys = (f"bd:{n}" for n in itertools.count())

    def reservation(key: str) -> BudgetReservation:
        return BudgetReservation(
            idempotency_key=key,
            workspace_id=ws,
            provider="openai",
            model="gpt-4o-mini",
            source=CredentialSource.PLATFORM,
            amount=Decimal("0.001"),
        )

    def params() -> dict[str, Any]:
        return store._reserve_params(reservation(next(keys)), datetime.now(UTC))

    parts: dict[str, float] = {}

    async def trips() -> float:
        loop = asyncio.get_running_loop()
        times = []
        for _ in range(300):
            started = time.perf_counter()
            await loop.run_in_executor(None, lambda: None)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e6

    parts["worker-thread trip (run_in_executor, no-op)"] = asyncio.run(trips())

    def checkout() -> None:
        with app.engine.connect():
            pass

    parts["pool checkout and return (the store's engine)"] = _median_us(checkout)
    raw = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(raw, autocommit=True) as conn:
        parts["round trip: SELECT 1 (own connection)"] = _median_us(
            lambda: conn.execute("SELECT 1").fetchall()
        )
        budget_id = conn.execute(
            "SELECT id FROM byok_budgets WHERE workspace_id = %s", (ws,)
        ).fetchone()
        touch = "UPDATE byok_budgets SET updated_by = updated_by WHERE id = %s"
        synchronous = conn.execute("SHOW synchronous_commit").fetchone() or ("?",)
        parts[f"one-row UPDATE, commit (synchronous_commit={synchronous[0]})"] = _median_us(
            lambda: conn.execute(touch, budget_id)
        )
        conn.execute("SET synchronous_commit = off")  # this session only: to see the flush
        parts["  the same, synchronous_commit=off (measured, never used)"] = _median_us(
            lambda: conn.execute(touch, budget_id)
        )
        conn.execute("RESET synchronous_commit")
        parts["empty BEGIN; COMMIT (no WAL to flush)"] = _median_us(
            lambda: (conn.execute("BEGIN"), conn.execute("COMMIT"))
        )
        parts["reservation statement, own connection (prepared)"] = _median_us(
            lambda: conn.execute(_PG_RESERVE, params()).fetchall()
        )
        conn.execute("SET plan_cache_mode = force_custom_plan")
        parts["  the same, planned per call (plan_cache_mode=force_custom_plan)"] = _median_us(
            lambda: conn.execute(_PG_RESERVE, params()).fetchall()
        )
        conn.execute("SET plan_cache_mode = force_generic_plan")
        parts["  the same, its generic plan (plan_cache_mode=force_generic_plan)"] = _median_us(
            lambda: conn.execute(_PG_RESERVE, params()).fetchall()
        )
        conn.execute("RESET plan_cache_mode")

        def in_transaction() -> None:
            with conn.transaction():
                conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                conn.execute(_PG_RESERVE, params()).fetchall()

        parts["  BEGIN, SET LOCAL generic plan, the statement, COMMIT"] = _median_us(in_transaction)
        planning, execution = [], []
        for _ in range(100):
            with conn.transaction(force_rollback=True):
                row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + _PG_RESERVE, params())
                plan = row.fetchone()[0][0]  # type: ignore[index]
            planning.append(plan["Planning Time"] * 1e3)
            execution.append(plan["Execution Time"] * 1e3)
        parts["  its planning when planned per call (EXPLAIN ANALYZE)"] = statistics.median(
            planning
        )
        parts["  its execution (EXPLAIN ANALYZE, before the commit)"] = statistics.median(execution)
    parts["store.reserve (pool, the statement, autocommit)"] = _median_us(
        lambda: store.reserve(reservation(next(keys)))
    )

    def settle_group() -> float:
        key = next(keys)
        store.reserve(reservation(key))
        with app.engine.connect() as conn, conn.begin():
            started = time.perf_counter()
            store.settle_in(conn, [BudgetSettlement(key, ws, amount=Decimal("0.0005"))])
            return time.perf_counter() - started

    times = [settle_group() for _ in range(300)]
    parts["settle_in in a transaction (SET LOCAL + the statement)"] = (
        statistics.median(times[20:]) * 1e6
    )
    print("\nparts of a budgeted call on PostgreSQL, each alone (median, us)")
    for name, value in parts.items():
        print(f"  {name:<58} {value:8.1f}")


def main() -> None:
    port = free_port()
    emulator = start_emulator(port)
    try:
        with tempfile.TemporaryDirectory(prefix="byok-bench-") as tmp:
            master = generate_master_key()
            environ = {
                "BYOK_HOME": str(Path(tmp) / "home"),
                "BYOK_ENCRYPTION_KEYS": f"{master.id}:{base64.b64encode(master.secret).decode()}",
                "BYOK_VALIDATE_KEYS": "0",
                "BYOK_LOAD_PLUGINS": "byok_plugin",
                "BYOK_PLATFORM_KEYS_OPENAI": realistic_key("openai"),
                **describe(f"http://127.0.0.1:{port}"),
            }
            store_url = os.environ.get("BENCH_BUDGET_DATABASE_URL", "")
            if store_url:
                environ["BYOK_DATABASE_URL"] = store_url
            app = App(Settings.from_environ(environ))
            app.budgets.set_budget(PATHS["hard budget"], "monthly", limit="1000000")
            seeded = int(os.environ.get("BENCH_BUDGET_HOLDS", "0"))
            if seeded:
                seed_holds(app, PATHS["hard budget"], seeded)
            if store_url.startswith("postgresql") and os.environ.get("BENCH_BUDGET_BREAKDOWN"):
                breakdown(app, store_url)
            pm = plugin_manager_for(app)
            store = app.engine.dialect.name
            threaded = WorkflowRunner(pm, {}).hooks_in_thread()
            print(
                f"{CALLS} one-agent-block platform-billed runs per path and concurrency, with and "
                f"without a hard budget ({seeded} settled holds kept), {store} store, hooks "
                f"{'in a worker thread' if threaded else 'on the event loop'}; emulator in its "
                f"own process; {os.cpu_count()} CPUs"
            )
            worst = 0.0
            for concurrency in CONCURRENCY:
                results = asyncio.run(measure(environ, pm, concurrency))
                base = results["no budget"]
                print(f"\nconcurrency {concurrency}")
                for name, sample in results.items():
                    median = statistics.median(sample.times)
                    failed = f"   {sample.failures} failed" if sample.failures else ""
                    print(
                        f"  {name:<12} median {median * 1e3:8.3f} ms   "
                        f"{sample.calls / sample.wall:8.1f} blocks/s   "
                        f"CPU {sample.cpu / max(sample.calls, 1) * 1e3:6.3f} ms/call{failed}"
                    )
                ratio = paired_ratio(results["hard budget"], base)
                worst = max(worst, ratio)
                print(
                    f"  budget / no budget median per-call time, paired: {ratio:.3f}x "
                    f"(target <= {TARGET}x) {'OK' if ratio <= TARGET else 'OVER TARGET'}"
                )
            spent = app.budgets.get(PATHS["hard budget"], "monthly")
            app.close()
            print(f"\nbudget after the runs: {spent.as_dict() if spent else None}")
            print(f"worst ratio: {worst:.3f}x ({'OK' if worst <= TARGET else 'OVER TARGET'})")
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)


if __name__ == "__main__":
    main()
