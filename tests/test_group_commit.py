"""Group commit (issue 18): the ledger rows of calls that finish together are written by the
runner's one writer in one ``byok_record_usage_batch`` (one transaction on the default plugin);
third-party ``byok_record_usage`` implementations still see every record once; a group the store
refuses is spooled row by row; a worker killed mid-way loses no completed call's row and
duplicates none. Real HTTP against the emulator, real SQLite file and real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path

import sqlalchemy as sa
from byok_hookspecs import UsageRecord, hookimpl
from clock_support import ShiftedClock

from byok_plugin.billing.ledger import usage_ledger
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
from byok_plugin.host.workflow import parse_workflow
from tests.spool_support import accept_ledger_writes, refuse_ledger_writes

ROOT = Path(__file__).resolve().parents[1]
ONE_BLOCK = {
    "name": "one-block",
    "version": "1",
    "blocks": {"answer": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Say hello."}},
    "edges": [],
}
CALLS = 8


class Groups:
    """Sees each group (a wrapper: it records nothing itself)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    @hookimpl(wrapper=True)
    def byok_record_usage_batch(self, records: Sequence[UsageRecord]) -> Generator[None]:
        self.sizes.append(len(records))
        return (yield)


class Meter:
    """A third-party metering export with the single form only; its first record waits until
    every other call has finished and queued behind the writer (so the next group is all of
    them, whatever the timing)."""

    def __init__(self, groups: Groups) -> None:
        self.groups = groups
        self.seen: list[str] = []
        self.runner: WorkflowRunner | None = None
        self._lock = threading.Lock()

    @hookimpl
    def byok_record_usage(self, record: UsageRecord) -> None:
        with self._lock:
            first = not self.seen
            self.seen.append(record.idempotency_key)
        if first and self.runner is not None:
            deadline = time.monotonic() + 20  # against a hang; the test's asserts say the rest
            while self.groups.sizes[0] + len(self.runner._group) < CALLS:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)


def _stack(emulator: EmulatorServer, home: Path, database_url: str) -> DemoStack:
    # a monthly budget sums the group's calls: no month may begin between them
    stack = DemoStack(home, emulator, database_url=database_url, clock=ShiftedClock())
    stack.store_workspace_keys(BYOK_WORKSPACE, providers=("openai",))
    return stack


async def _run_together(
    stack: DemoStack, meter: Meter | None = None, workspace_id: str = BYOK_WORKSPACE
) -> list:
    workflow = parse_workflow(ONE_BLOCK)
    options = RunnerOptions(hooks_in_thread=True, max_concurrent_calls=CALLS)
    async with WorkflowRunner.open(stack.pm, environ=stack.environ, options=options) as runner:
        if meter is not None:
            meter.runner = runner
        return list(
            await asyncio.gather(
                *(
                    runner.run(workflow, actor=OPERATOR, workspace_id=workspace_id, inputs={})
                    for _ in range(CALLS)
                )
            )
        )


def test_hook_byok_record_usage_batch_calls_that_finish_together_are_one_group(
    emulator: EmulatorServer, tmp_path: Path, database_url: str
) -> None:
    stack = _stack(emulator, tmp_path / "home", database_url)
    groups = Groups()
    meter = Meter(groups)
    stack.pm.register(groups)
    stack.pm.register(meter)
    try:
        results = asyncio.run(_run_together(stack, meter))
        assert all(r.ok for r in results), [r.error for r in results]
        keys = sorted(c.idempotency_key for r in results for c in r.calls)
        assert len(keys) == CALLS
        assert all(c.recorded for r in results for c in r.calls)
        # one group for the first call(s) to finish, one for all that finished meanwhile (or
        # one group of all, when every call finished before the writer first ran)
        assert sum(groups.sizes) == CALLS
        assert len(groups.sizes) in (1, 2), groups.sizes
        assert max(groups.sizes) > 1
        # the default plugin wrote every row (in the group's transaction), and the plugin with
        # the single form only saw every record, once
        assert sorted(r.idempotency_key for r in stack.app.ledger.rows()) == keys
        assert sorted(meter.seen) == keys
    finally:
        stack.close()


def test_calls_recorded_in_one_group_each_settle_their_own_budget_hold(
    emulator: EmulatorServer, tmp_path: Path, database_url: str
) -> None:
    """Budgets (issue 16) with group commit: every call's hold is settled with its own charge
    once its group is recorded; nothing stays reserved, and what is spent is what was charged."""
    stack = _stack(emulator, tmp_path / "home", database_url)
    groups = Groups()
    meter = Meter(groups)
    stack.pm.register(groups)
    stack.pm.register(meter)
    budgets = stack.app.budgets
    budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="1000")
    try:
        results = asyncio.run(_run_together(stack, meter, PLATFORM_WORKSPACE))
        assert all(r.ok for r in results), [r.error for r in results]
        calls = [c for r in results for c in r.calls]
        assert len(calls) == CALLS
        assert all(c.recorded for c in calls)
        assert sum(groups.sizes) == CALLS, groups.sizes
        assert max(groups.sizes) > 1, groups.sizes
        charged = sum(c.charge.amount for c in calls)
        assert charged > 0
        status = budgets.get(PLATFORM_WORKSPACE, "monthly")
        assert status is not None
        assert (status.spent, status.reserved) == (charged, 0)
        rows = stack.app.ledger.rows()
        assert sorted(r.idempotency_key for r in rows) == sorted(c.idempotency_key for c in calls)
    finally:
        stack.close()


class BrokenBatch:
    """A batch implementation that fails: the host asks every plugin again, record by record."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl(tryfirst=True)
    def byok_record_usage_batch(self, records: Sequence[UsageRecord]) -> None:
        self.calls += 1
        raise RuntimeError("metering API down")


def test_hook_byok_record_usage_batch_failing_falls_back_to_every_plugin_one_by_one(
    emulator: EmulatorServer, tmp_path: Path, sqlite_url: str
) -> None:
    stack = _stack(emulator, tmp_path / "home", sqlite_url)
    broken, groups = BrokenBatch(), Groups()
    meter = Meter(groups)
    stack.pm.register(broken)
    stack.pm.register(meter)
    try:
        results = asyncio.run(_run_together(stack))
        assert all(r.ok for r in results), [r.error for r in results]
        keys = sorted(c.idempotency_key for r in results for c in r.calls)
        assert broken.calls >= 1
        assert sorted(meter.seen) == keys  # once each, though the batch failed
        assert sorted(r.idempotency_key for r in stack.app.ledger.rows()) == keys
    finally:
        stack.close()


def test_a_group_the_store_refuses_is_spooled_row_by_row_and_lands_once(
    emulator: EmulatorServer, tmp_path: Path, database_url: str
) -> None:
    stack = _stack(emulator, tmp_path / "home", database_url)
    try:
        stack.app.ledger.count()  # migrated before the trigger goes in
        refuse_ledger_writes(database_url)
        results = asyncio.run(_run_together(stack))
        assert all(r.ok for r in results), [r.error for r in results]
        keys = sorted(c.idempotency_key for r in results for c in r.calls)
        assert all(c.recorded for r in results for c in r.calls)  # in the spool
        assert stack.app.durable_ledger.spool.pending() == CALLS
        assert stack.app.ledger.count() == 0
        accept_ledger_writes(database_url)
        stack.app.durable_ledger.replay()
        assert sorted(r.idempotency_key for r in stack.app.ledger.rows()) == keys
        assert stack.app.durable_ledger.spool.pending() == 0
    finally:
        stack.close()


# a worker process: runs groups of concurrent one-call workflows for ever, printing each
# completed call's idempotency key once its run has returned
WORKER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from byok_hookspecs import Actor
    from byok_plugin.app import App
    from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
    from byok_plugin.host.workflow import parse_workflow
    from byok_plugin.manager import plugin_manager_for
    from byok_plugin.settings import Settings

    async def main():
        app = App(Settings.from_environ())
        pm = plugin_manager_for(app, load_entrypoints=False)
        workflow = parse_workflow(json.loads(os.environ["TEST_WORKFLOW"]))
        options = RunnerOptions(hooks_in_thread=True, max_concurrent_calls=8)
        async with WorkflowRunner.open(pm, environ=os.environ, options=options) as runner:
            while True:
                results = await asyncio.gather(
                    *(runner.run(workflow, workspace_id=os.environ["TEST_WORKSPACE"], inputs={},
                                 actor=Actor("worker", operator=True))
                      for _ in range(8))
                )
                for result in results:
                    for call in result.calls:
                        if call.recorded:
                            print("done", call.idempotency_key, flush=True)

    asyncio.run(main())
    """
)


def test_a_worker_killed_between_call_and_commit_loses_no_completed_row_and_doubles_none(
    emulator: EmulatorServer, tmp_path: Path, postgres_url: str
) -> None:
    import json

    stack = _stack(emulator, tmp_path / "home", postgres_url)
    stack.app.ledger.count()
    env = {
        **os.environ,
        **stack.environ,
        "TEST_WORKFLOW": json.dumps(ONE_BLOCK),
        "TEST_WORKSPACE": BYOK_WORKSPACE,
    }
    reported: list[str] = []
    for round_no in range(3):  # killed at different points of its groups
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert worker.stdout is not None
        try:
            for _ in range(20 + 7 * round_no):
                line = worker.stdout.readline()
                assert line.startswith("done "), line
                reported.append(line.split()[1])
        finally:
            worker.send_signal(signal.SIGKILL)  # no clean-up of any kind
            worker.wait(timeout=30)
    try:
        engine = stack.app.engine
        with engine.connect() as conn:
            t = usage_ledger
            stored = list(conn.execute(sa.select(t.c.idempotency_key)).scalars())
        # every call a worker reported done is in the ledger, once; and no key twice at all
        assert len(stored) == len(set(stored))
        assert set(reported) <= set(stored)
        # rows of calls the workers made but had not reported yet are complete calls too
        calls_made = len([c for c in emulator.calls() if c.method == "POST"])
        assert len(stored) <= calls_made
    finally:
        stack.close()


def test_a_group_write_skips_the_keys_already_there_and_is_idempotent(
    tmp_path: Path, database_url: str
) -> None:
    from byok_plugin.app import App
    from byok_plugin.settings import Settings
    from tests.ledger_support import record_for

    app = App(
        Settings.from_environ({"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": database_url})
    )
    try:
        records = [record_for(n) for n in range(12)]
        assert app.ledger.record(records[3])  # already there: skipped, not doubled
        assert app.durable_ledger.record_many(records) == 11
        assert app.durable_ledger.record_many(records) == 0
        assert sorted(r.idempotency_key for r in app.ledger.rows()) == sorted(
            r.idempotency_key for r in records
        )
    finally:
        app.close()


def test_a_group_of_one_lands_as_a_single_record_would_and_a_refused_one_is_spooled(
    tmp_path: Path, database_url: str
) -> None:
    """A group of one (calls that do not overlap) takes the single record's path on SQLite (its
    direct writer): the same row as ``record`` writes, the same answers, the same spooling."""
    from dataclasses import asdict, replace

    from byok_plugin.app import App
    from byok_plugin.settings import Settings
    from tests.ledger_support import record_for

    app = App(
        Settings.from_environ({"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": database_url})
    )
    try:
        single = record_for(4)
        grouped = replace(single, idempotency_key="grouped:" + single.idempotency_key)
        assert app.ledger.record(single) is True
        assert app.ledger.record_many([grouped]) == 1
        assert app.ledger.record_many([grouped]) == 0  # already there: skipped, not doubled
        assert app.durable_ledger.record_many([grouped]) == 0
        rows = {r.idempotency_key: asdict(r) for r in app.ledger.rows()}
        assert len(rows) == 2
        ignored = ("id", "idempotency_key", "recorded_at")
        assert {k: v for k, v in rows[grouped.idempotency_key].items() if k not in ignored} == {
            k: v for k, v in rows[single.idempotency_key].items() if k not in ignored
        }
        refuse_ledger_writes(database_url)
        refused = replace(single, idempotency_key="refused:" + single.idempotency_key)
        assert app.durable_ledger.record_many([refused]) == 1  # spooled
        assert app.durable_ledger.spool.pending() == 1
        assert app.ledger.count() == 2
        accept_ledger_writes(database_url)
        app.durable_ledger.replay()
        assert app.ledger.count() == 3
        assert app.durable_ledger.spool.pending() == 0
    finally:
        app.close()
