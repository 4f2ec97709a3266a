"""Resolution on PostgreSQL served from memory and declared non-blocking (issue 18): while the
key-change listener is connected, resolving a credential on the event loop does no database round
trip (its cooldown and audit writes go to the background writer), a miss is one read, and the
moment the listener drops the hooks are declared blocking again. Statements are counted with a
SQLAlchemy event listener on the real PostgreSQL engine."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    CredentialRequest,
    CredentialSource,
    FailureReason,
    ProviderFailure,
    blocking_implementations,
    calling_inline,
    declared_nonblocking,
)
from keys_support import OPERATOR, make_app, master_key, random_key, service_for
from sqlalchemy import event

from byok_plugin.cli.demo import BYOK_WORKSPACE, DemoStack, realistic_key
from byok_plugin.defaults import DefaultPlugin
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.runner import RESOLVE_HOOKS, RunnerOptions, WorkflowRunner
from byok_plugin.host.workflow import parse_workflow
from byok_plugin.keys.service import KeyService

ONE_BLOCK = {
    "name": "one-block",
    "version": "1",
    "blocks": {"answer": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Say hello."}},
    "edges": [],
}


@contextmanager
def statements(engine: sa.Engine) -> Iterator[list[tuple[int, str]]]:
    """Every statement the engine sends meanwhile, with the thread that sent it."""
    seen: list[tuple[int, str]] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append((threading.get_ident(), statement))

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for ``condition()`` (a deadline against a hung test, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


def _default(pm: Any) -> DefaultPlugin:
    return next(p for p in pm.get_plugins() if isinstance(p, DefaultPlugin))


def test_resolution_on_the_event_loop_does_no_database_round_trip_while_listening(
    postgres_url: str, tmp_path: Path
) -> None:
    app = make_app(postgres_url, tmp_path, keys=[master_key()])
    service, pm = service_for(app)
    try:
        ids = [
            service.set_key(
                OPERATOR, "acme", "openai", random_key("openai"), label=label, test=False
            ).key.id
            for label in ("first", "second")
        ]
        pm.hook.byok_prepare()
        resolver = app.resolver
        assert resolver.listener.wait_listening()
        assert resolver.served_from_memory
        assert "byok_resolve_credential" in declared_nonblocking(_default(pm))
        assert blocking_implementations(pm, RESOLVE_HOOKS) == []
        # recording still blocks on PostgreSQL: it goes to the group writer's thread
        assert "byok_record_usage" not in declared_nonblocking(_default(pm))

        request = CredentialRequest("acme", "openai", "gpt-4o", actor=OPERATOR)
        refused = replace_failure(request, ids[0])

        async def on_the_loop() -> tuple[int, list[str | None], str | None]:
            with calling_inline():
                served = [
                    pm.hook.byok_resolve_credential(request=request).key_id for _ in range(20)
                ]
                # a refusal: the key cools down and it is audited, both written off the loop
                after = pm.hook.byok_resolve_credential(request=refused).key_id
            return threading.get_ident(), served, after

        assert pm.hook.byok_resolve_credential(request=request) is not None  # the list, cached
        with statements(app.engine) as seen:
            loop_thread, served, after = asyncio.run(on_the_loop())
            _wait(lambda: app.background_writes.pending == 0, "the background writes")
        assert set(served) == set(ids)  # round robin over both keys, from memory
        assert after == ids[1]
        on_loop = [s for thread, s in seen if thread == loop_thread]
        assert on_loop == []
        # the writes did land, from the background writer's thread
        assert any("byok_audit_events" in s for _, s in seen)
        cooled = {k.id: k.cooldown_until for k in app.key_access.enabled_keys("acme", "openai")}
        assert cooled[ids[0]] is not None
        assert cooled[ids[1]] is None
        events = app.audit_store.events("acme", action="key.cooldown")
        assert [e.key_id for e in events] == [ids[0]]

        # a miss on the loop (the list dropped by a change) is one read: the key list
        resolver.cache.invalidate("acme", "openai")

        async def miss() -> int:
            with calling_inline():
                assert pm.hook.byok_resolve_credential(request=request).key_id == ids[1]
            return threading.get_ident()

        with statements(app.engine) as seen:
            loop_thread = asyncio.run(miss())
        on_loop = [s for thread, s in seen if thread == loop_thread]
        assert len(on_loop) == 1, on_loop
        assert "byok_workspace_keys" in on_loop[0]
    finally:
        app.close()


def replace_failure(request: CredentialRequest, key_id: str) -> CredentialRequest:
    from dataclasses import replace

    failure = ProviderFailure(
        reason=FailureReason.RATE_LIMIT, source=CredentialSource.WORKSPACE, key_id=key_id
    )
    return replace(request, failure=failure)


def test_the_hooks_are_declared_blocking_again_when_the_listener_drops(
    postgres_url: str, tmp_path: Path
) -> None:
    app = make_app(postgres_url, tmp_path, keys=[master_key()])
    _, pm = service_for(app)
    admin = sa.create_engine(postgres_url)
    try:
        pm.hook.byok_prepare()
        listener = app.resolver.listener
        assert listener.wait_listening()
        plugin = _default(pm)
        assert {"byok_resolve_credential", "byok_audit"} <= declared_nonblocking(plugin)
        with admin.connect() as conn:  # an administrator (or a restart) ends the connection
            conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": listener.backend_pid})
        _wait(lambda: listener.losses == 1, "the lost connection")
        assert not app.resolver.served_from_memory
        assert "byok_resolve_credential" not in declared_nonblocking(plugin)
        assert "byok_audit" not in declared_nonblocking(plugin)
        blocking = blocking_implementations(pm, RESOLVE_HOOKS)
        assert ("byok_resolve_credential", blocking[0][1]) in blocking
        # listening again (it reconnects by itself): declared non-blocking again
        assert listener.wait_listening(timeout=20)
        assert "byok_resolve_credential" in declared_nonblocking(plugin)
    finally:
        admin.dispose()
        app.close()


def test_sqlite_is_declared_as_before(sqlite_url: str, tmp_path: Path) -> None:
    """On SQLite the store hooks are non-blocking as before, and no listener is involved."""
    app = make_app(sqlite_url, tmp_path, keys=[master_key()])
    _, pm = service_for(app)
    try:
        pm.hook.byok_prepare()
        assert app.resolver.listener is None
        assert not app.resolver.served_from_memory
        assert {"byok_resolve_credential", "byok_record_usage"} <= declared_nonblocking(
            _default(pm)
        )
    finally:
        app.close()


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to it (a thread trip each)."""

    def __init__(self) -> None:
        super().__init__(max_workers=8)
        self.jobs: list[str] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.jobs.append(repr(fn)[:300])
        return super().submit(fn, *args, **kwargs)


def test_a_run_on_postgresql_sends_no_statement_from_the_loop_and_asks_again_on_it(
    emulator: EmulatorServer, tmp_path: Path, postgres_url: str
) -> None:
    """The runner with default options on PostgreSQL: no statement from the event loop's thread;
    the resolution asked again after a 429 runs on the loop (its cooldown and audit written in
    the background), and the thread trips per call are counted: the budget reservation (with the
    first resolution) and the group writer's job."""
    stack = DemoStack(tmp_path / "home", emulator, database_url=postgres_url)
    stack.store_workspace_keys(BYOK_WORKSPACE, providers=("openai",))
    refused = stack.workspace_keys["openai"]
    other = realistic_key("openai")
    emulator.add_key("openai", other, label="second")
    KeyService.for_app(stack.app, stack.pm).set_key(
        OPERATOR, BYOK_WORKSPACE, "openai", other, label="second", test=False
    )
    calls = 8
    workflow = parse_workflow(ONE_BLOCK)

    async def runs() -> tuple[list[Any], list[str], int, list[str]]:
        loop = asyncio.get_running_loop()
        executor = CountingExecutor()
        loop.set_default_executor(executor)
        options = RunnerOptions(max_concurrent_calls=calls)
        async with WorkflowRunner.open(stack.pm, environ=stack.environ, options=options) as runner:
            assert stack.app.resolver.listener.wait_listening()
            assert runner.hooks_in_thread()  # recording and budgets block on PostgreSQL
            await runner.run(
                workflow, actor=OPERATOR, workspace_id=BYOK_WORKSPACE, inputs={}
            )  # warm
            emulator.add_fault(
                Fault.for_key(FaultKind.RATE_LIMIT, refused, times=None, retry_after=0)
            )
            executor.jobs.clear()
            cache = stack.app.resolver.cache
            drops = cache.generation
            with statements(stack.app.engine) as seen:
                results = await asyncio.gather(
                    *(
                        runner.run(workflow, actor=OPERATOR, workspace_id=BYOK_WORKSPACE, inputs={})
                        for _ in range(calls)
                    )
                )
                loop_thread = threading.get_ident()
                on_loop = [s for thread, s in seen if thread == loop_thread]
                drops = cache.generation - drops
        return list(results), on_loop, drops, executor.jobs

    try:
        results, on_loop, drops, jobs = asyncio.run(runs())
        assert all(r.ok for r in results), [r.error for r in results]
        made = [c for r in results for c in r.calls]
        assert len(made) == calls
        assert all(c.recorded for c in made)
        # from the loop's thread: only the misses after the cooldown writes dropped the list (as
        # they landed, and as they were announced), one read of the key list per drop at most;
        # no write, no other read
        assert all(s.startswith("SELECT byok_workspace_keys.") for s in on_loop), on_loop
        assert len(on_loop) <= drops, (on_loop, drops)
        print(f"\nreads on the loop: {len(on_loop)} for {calls} calls ({drops} list drops)")
        # the refused key cooled down (written by the background writer) and was audited
        stack.app.background_writes.close()
        cooled = {
            k.id: k.cooldown_until
            for k in stack.app.key_access.enabled_keys(BYOK_WORKSPACE, "openai")
        }
        assert sum(1 for until in cooled.values() if until is not None) == 1
        assert stack.app.audit_store.events(BYOK_WORKSPACE, action="key.cooldown")
        # no resolution handed to a thread on its own: asked again on the loop
        alone = [j for j in jobs if "byok_resolve_credential" in j]
        assert alone == [], alone
        per_call = len(jobs) / calls
        print(f"\nthread trips: {len(jobs)} for {calls} calls ({per_call:.2f} per call)")
        assert len(jobs) <= 3 * calls, jobs
    finally:
        stack.close()


@pytest.mark.parametrize("budgeted", [False, True], ids=["no budget", "budget"])
def test_thread_trips_per_call(
    emulator: EmulatorServer, tmp_path: Path, database_url: str, budgeted: bool
) -> None:
    """Counted, not timed (issue 18's async question): one call at a time, on PostgreSQL a call
    of a workspace without budgets takes one thread trip, its group's write (resolution and the
    reservation answered from memory on the loop); with a budget one more, the reservation; on
    SQLite none. ``-s`` prints the counts."""
    stack = DemoStack(tmp_path / "home", emulator, database_url=database_url)
    stack.store_workspace_keys(BYOK_WORKSPACE, providers=("openai",))
    if budgeted:
        stack.app.budgets.set_budget(BYOK_WORKSPACE, "monthly", limit="100", metric="list_cost")
    workflow = parse_workflow(ONE_BLOCK)
    runs = 10

    async def sequential() -> tuple[list[Any], list[str]]:
        executor = CountingExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
            listener = stack.app.resolver.listener
            assert listener is None or listener.wait_listening()
            await runner.run(
                workflow, actor=OPERATOR, workspace_id=BYOK_WORKSPACE, inputs={}
            )  # warm
            executor.jobs.clear()
            results = [
                await runner.run(workflow, actor=OPERATOR, workspace_id=BYOK_WORKSPACE, inputs={})
                for _ in range(runs)
            ]
        return results, list(executor.jobs)

    try:
        results, jobs = asyncio.run(sequential())
        assert all(r.ok for r in results), [r.error for r in results]
        print(f"\n{stack.app.engine.dialect.name}: {len(jobs) / runs:.2f} thread trips per call")
        if stack.app.store_is_local:
            assert jobs == []
        else:
            assert sum("_settle_group" in j for j in jobs) == runs
            reserved = sum("_reserve_now" in j for j in jobs)
            assert reserved == (runs if budgeted else 0), jobs
            assert len(jobs) == runs + reserved, jobs
            assert not any("byok_resolve_credential" in j for j in jobs), jobs
        if budgeted:
            status = stack.app.budgets.get(BYOK_WORKSPACE, "monthly")
            assert status is not None
            assert status.spent > 0
    finally:
        stack.close()
