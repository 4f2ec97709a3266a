"""Where the runner calls the hooks: on the event loop when every implementation of the hooks a
call goes through declares it never waits on the network (``byok_nonblocking_hooks``), else in a
worker thread. Shown with the thread each hook really ran on, over real HTTP to the emulator, with
the real default plugin on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sqlite3
import threading
import time
import types
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pluggy
import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    NONBLOCKING_ATTRIBUTE,
    PROJECT_NAME,
    AuditEvent,
    Charge,
    Credential,
    CredentialRequest,
    CredentialSource,
    FailureReason,
    Usage,
    UsageRecord,
    add_to,
    blocking_implementations,
    called_inline,
    calling_inline,
    declared_nonblocking,
    hookimpl,
)

from byok_plugin.app import App
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import BYOK_WORKSPACE, DemoStack, realistic_key
from byok_plugin.defaults import DefaultPlugin
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.run_result import RunStatus
from byok_plugin.host.runner import RUN_HOOKS, RunnerOptions, WorkflowRunner
from byok_plugin.host.workflow import Workflow, parse_workflow
from byok_plugin.resolution.background_writes import BackgroundWrites
from byok_plugin.resolution.resolver import _PendingCooldown
from byok_plugin.settings import Settings
from byok_plugin.store.engine import lock_backoff, write_transaction

STORE_HOOKS = {
    "byok_resolve_credential",
    "byok_record_usage",
    "byok_recorded_calls",
    "byok_audit",
    "byok_reserve_budget",
    "byok_settle_budget",
}
WORKFLOW = parse_workflow(
    {
        "name": "one",
        "version": "1",
        "blocks": {"answer": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Say hi."}},
    }
)


class ThreadSpy:
    """Notes the thread of every hook call it sees; implements ``byok_record_usage`` (all
    implementations run), so it sits beside the default plugin without changing any answer."""

    def __init__(self, declared: frozenset[str] = frozenset()) -> None:
        self.threads: dict[str, set[int]] = {}
        if declared:
            setattr(self, NONBLOCKING_ATTRIBUTE, declared)

    def saw(self, hook: str) -> None:
        self.threads.setdefault(hook, set()).add(threading.get_ident())

    @hookimpl
    def byok_record_usage(self, record: UsageRecord) -> None:
        self.saw("byok_record_usage")


class AuditSpy(ThreadSpy):
    """A :class:`ThreadSpy` that also implements ``byok_audit`` (a hook resolution asks)."""

    @hookimpl
    def byok_audit(self, event: AuditEvent) -> None:
        self.saw("byok_audit")


class Answers(ThreadSpy):
    """A whole stand-in for the run hooks: the emulator key as a workspace key, charged 0."""

    def __init__(self, key: str, declared: frozenset[str] = frozenset()) -> None:
        super().__init__(declared)
        self.key = key

    @hookimpl
    def byok_is_hosted(self, provider: str, model: str) -> bool | None:
        return True

    @hookimpl
    def byok_resolve_credential(self, request: CredentialRequest) -> Credential | None:
        self.saw("byok_resolve_credential")
        return Credential(
            self.key, request.provider, CredentialSource.WORKSPACE, key_id="k1", hint="sk-...k1"
        )

    @hookimpl
    def byok_compute_charge(self, usage: Usage, credential: Credential) -> Charge | None:
        self.saw("byok_compute_charge")
        return Charge(Decimal(0), reason="byok")


async def cancel_once(
    work: Coroutine[Any, Any, object], ready: Callable[[], bool], *, delay: float = 0.0
) -> None:
    """Run ``work`` as a task, cancel it once ``ready()`` (and ``delay`` more seconds), and check
    that it ends cancelled."""
    task = asyncio.ensure_future(work)
    while not ready():
        await asyncio.sleep(0.005)
    await asyncio.sleep(delay)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def new_manager(*plugins: object) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    add_to(pm, load_entrypoints=False)
    for plugin in plugins:
        pm.register(plugin)
    return pm


def run_once(pm: pluggy.PluginManager, environ: dict[str, str], **options: object) -> int:
    """Run the one-block workflow; the event loop's thread."""

    async def main() -> int:
        async with WorkflowRunner.open(
            pm,
            environ=environ,
            options=RunnerOptions(**options),  # type: ignore[arg-type]
        ) as runner:
            result = await runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE)
        assert result.status is RunStatus.COMPLETED, result.error
        return threading.get_ident()

    return asyncio.run(main())


@pytest.fixture
def key(emulator: EmulatorServer) -> str:
    return emulator.new_key("openai", label="spy")


# --- the contract's helper ------------------------------------------------------------------------


def test_blocking_implementations_names_each_undeclared_implementation() -> None:
    class Declared:
        byok_nonblocking_hooks = frozenset({"byok_compute_charge", "byok_record_usage"})

        @hookimpl
        def byok_compute_charge(self, usage: Usage, credential: Credential) -> Charge | None:
            return None

        @hookimpl
        def byok_record_usage(self, record: UsageRecord) -> None:
            return None

    class PartlyDeclared:
        byok_nonblocking_hooks = frozenset({"byok_compute_charge"})  # its audit hook may block

        @hookimpl
        def byok_audit(self, event: AuditEvent) -> None:
            return None

    module = types.ModuleType("metering_export")
    module.byok_record_usage = hookimpl(lambda record: None)  # type: ignore[attr-defined]

    pm = new_manager()
    pm.register(Declared(), name="declared")
    pm.register(PartlyDeclared(), name="partly")
    pm.register(module, name="metering_export")
    assert blocking_implementations(pm, ["byok_compute_charge"]) == []
    assert blocking_implementations(pm, RUN_HOOKS) == [
        ("byok_audit", "partly"),
        ("byok_record_usage", "metering_export"),
    ]
    # a module declares at module level, as any plugin
    module.byok_nonblocking_hooks = {"byok_record_usage"}  # type: ignore[attr-defined]
    assert blocking_implementations(pm, RUN_HOOKS) == [("byok_audit", "partly")]
    # a hook the manager does not have is no obstacle
    assert blocking_implementations(pm, ["byok_no_such_hook"]) == []


def test_the_default_plugin_declares_its_store_hooks_only_on_a_local_sqlite_file(
    tmp_path: Path,
) -> None:
    home = {"BYOK_HOME": str(tmp_path)}
    local = DefaultPlugin(App(Settings.from_environ(home)))
    remote = DefaultPlugin(
        App(
            Settings.from_environ(
                {**home, "BYOK_DATABASE_URL": "postgresql+psycopg://byok@db.internal:5432/byok"}
            )
        )
    )
    assert set(RUN_HOOKS) <= local.byok_nonblocking_hooks
    assert "byok_validate_key" not in local.byok_nonblocking_hooks  # it calls the provider
    assert STORE_HOOKS.isdisjoint(remote.byok_nonblocking_hooks)
    assert "byok_compute_charge" in remote.byok_nonblocking_hooks  # in memory on any store
    assert blocking_implementations(new_manager(local), RUN_HOOKS) == []
    assert {h for h, _ in blocking_implementations(new_manager(remote), RUN_HOOKS)} == STORE_HOOKS


def test_a_default_plugin_that_cannot_read_its_configuration_counts_as_blocking() -> None:
    def broken() -> App:
        raise RuntimeError("BYOK_DATABASE_URL is not a URL")

    plugin = DefaultPlugin(app_factory=broken)
    assert STORE_HOOKS.isdisjoint(plugin.byok_nonblocking_hooks)


# --- the runner -----------------------------------------------------------------------------------


def test_declared_hooks_run_on_the_event_loop(emulator: EmulatorServer, key: str) -> None:
    answers = Answers(key, declared=frozenset(RUN_HOOKS))
    loop_thread = run_once(new_manager(answers), emulator.environ())
    assert answers.threads == {
        hook: {loop_thread}
        for hook in ("byok_resolve_credential", "byok_compute_charge", "byok_record_usage")
    }


def test_undeclared_hooks_run_in_a_worker_thread(emulator: EmulatorServer, key: str) -> None:
    answers = Answers(key)
    loop_thread = run_once(new_manager(answers), emulator.environ())
    assert set(answers.threads) == {
        "byok_resolve_credential",
        "byok_compute_charge",
        "byok_record_usage",
    }
    assert all(loop_thread not in threads for threads in answers.threads.values())


def test_one_undeclared_plugin_sends_every_hook_to_a_thread(
    emulator: EmulatorServer, key: str
) -> None:
    answers = Answers(key, declared=frozenset(RUN_HOOKS))
    exporter = AuditSpy()  # an audit export that may block, beside a declared plugin
    loop_thread = run_once(new_manager(answers, exporter), emulator.environ())
    assert loop_thread not in answers.threads["byok_resolve_credential"]
    assert loop_thread not in answers.threads["byok_record_usage"]


def test_an_undeclared_recording_plugin_leaves_a_declared_resolution_on_the_loop(
    emulator: EmulatorServer, key: str
) -> None:
    """Resolution goes to a thread only when one of :data:`RESOLVE_HOOKS` may block (issue 18:
    PostgreSQL's recording blocks while its resolution is served from memory)."""
    answers = Answers(key, declared=frozenset(RUN_HOOKS))
    exporter = ThreadSpy()  # a metering export that may block, beside a declared plugin
    loop_thread = run_once(new_manager(answers, exporter), emulator.environ())
    assert answers.threads["byok_resolve_credential"] == {loop_thread}
    assert loop_thread not in exporter.threads["byok_record_usage"]


def test_the_option_overrides_the_declarations(emulator: EmulatorServer, key: str) -> None:
    answers = Answers(key, declared=frozenset(RUN_HOOKS))
    loop_thread = run_once(new_manager(answers), emulator.environ(), hooks_in_thread=True)
    assert loop_thread not in answers.threads["byok_resolve_credential"]
    undeclared = Answers(key)
    loop_thread = run_once(new_manager(undeclared), emulator.environ(), hooks_in_thread=False)
    assert undeclared.threads["byok_resolve_credential"] == {loop_thread}


def test_the_decision_follows_plugins_registered_later(key: str) -> None:
    pm = new_manager(Answers(key, declared=frozenset(RUN_HOOKS)))
    runner = WorkflowRunner(pm, {})
    assert runner.hooks_in_thread() is False
    late = ThreadSpy()
    pm.register(late)
    assert runner.hooks_in_thread() is True
    pm.unregister(late)
    assert runner.hooks_in_thread() is False


def test_a_plugin_swapped_for_an_undeclared_one_is_seen(key: str) -> None:
    """The decision is not keyed on ids a freed plugin could hand to its successor."""
    pm = new_manager()
    runner = WorkflowRunner(pm, {})
    for _ in range(50):
        declared = Answers(key, declared=frozenset(RUN_HOOKS))
        pm.register(declared)
        assert runner.hooks_in_thread() is False
        pm.unregister(declared)
        del declared
        undeclared = Answers(key)
        pm.register(undeclared)
        assert runner.hooks_in_thread() is True
        pm.unregister(undeclared)
        del undeclared


def test_a_declaration_that_is_not_a_collection_of_names_counts_as_blocking() -> None:
    class Raising:
        @property
        def byok_nonblocking_hooks(self) -> frozenset[str]:
            raise RuntimeError("the configuration is broken")

        @hookimpl
        def byok_record_usage(self, record: UsageRecord) -> None:
            return None

    class Spelled(Raising):
        # a string: "byok_record_usage" in it would match a substring of another name
        byok_nonblocking_hooks = "byok_record_usage_export byok_audit"  # type: ignore[assignment]

    class Listed(Raising):
        byok_nonblocking_hooks = ("byok_record_usage",)  # type: ignore[assignment]

    assert declared_nonblocking(Raising()) == frozenset()
    assert declared_nonblocking(Spelled()) == frozenset()
    assert declared_nonblocking(Listed()) == {"byok_record_usage"}
    for plugin, blocking in ((Raising(), True), (Spelled(), True), (Listed(), False)):
        found = blocking_implementations(new_manager(plugin), ["byok_record_usage"])
        assert bool(found) is blocking, type(plugin).__name__
        assert WorkflowRunner(new_manager(plugin), {}).hooks_in_thread() is blocking


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url)
    built.store_workspace_keys(BYOK_WORKSPACE, providers=("openai",))
    yield built
    built.close()


def test_the_default_plugin_runs_on_the_loop_on_sqlite_and_in_a_thread_on_postgresql(
    stack: DemoStack,
) -> None:
    spy = ThreadSpy(declared=frozenset({"byok_record_usage"}))
    stack.pm.register(spy)
    loop_thread = run_once(stack.pm, stack.environ)
    on_loop = spy.threads["byok_record_usage"] == {loop_thread}
    assert on_loop is stack.app.store_is_local
    assert on_loop is stack.settings.database_url.startswith("sqlite")
    assert stack.app.ledger.count() == 1


# --- a SQLite store locked by another writer while the hooks run on the event loop -------------


class LoopWatch:
    """The longest the event loop went without running a 10 ms heartbeat."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        """Let the heartbeat run once more (it notes a stall when it wakes after it), then stop."""
        assert self._task is not None
        await asyncio.sleep(0.05)
        self._task.cancel()


class WriteLock:
    """Another process's writer: holds the SQLite write lock for ``seconds``."""

    def __init__(self, database: str, seconds: float, *, then: str | None = None) -> None:
        self.held = threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(database, seconds, then))

    def _hold(self, database: str, seconds: float, then: str | None) -> None:
        conn = sqlite3.connect(database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        self.held.set()
        time.sleep(seconds)
        if then is not None:  # a write of its own, committed with the lock's release
            conn.execute(then)
        conn.execute("COMMIT")
        conn.close()

    def __enter__(self) -> WriteLock:
        self._thread.start()
        assert self.held.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()


@pytest.fixture
def sqlite_stack(emulator: EmulatorServer, tmp_path: Path) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator)
    built.store_workspace_keys(BYOK_WORKSPACE, providers=("openai",))
    yield built
    built.close()


def _database(stack: DemoStack) -> str:
    return stack.settings.database_url.split("///", 1)[1]


def test_a_locked_store_does_not_stall_the_loop_and_the_record_lands_after(
    sqlite_stack: DemoStack,
) -> None:
    stack = sqlite_stack

    async def main() -> tuple[float, float, RunStatus]:
        async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
            await runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE)  # warm
            assert runner.hooks_in_thread() is False
            watch = LoopWatch()
            watch.start()
            with WriteLock(_database(stack), seconds=1.5):
                started = time.perf_counter()
                result = await runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE)
                took = time.perf_counter() - started
                await watch.stop()
        return watch.longest, took, result.status

    longest, took, status = asyncio.run(main())
    assert status is RunStatus.COMPLETED
    assert took > 1.0  # the record waited for the lock (in a worker thread)...
    assert longest < 0.5  # ...and the event loop did not
    assert stack.app.ledger.count() == 2


def test_audit_and_cooldown_on_a_locked_store_are_written_once_it_is_released(
    sqlite_stack: DemoStack, emulator: EmulatorServer
) -> None:
    """A refused workspace key under on_error: its cooldown and the audit events of the
    fallback cannot be written while another writer holds the lock; the loop goes on."""
    stack = sqlite_stack
    refused = realistic_key("openai")  # the emulator does not know it: 401
    stack.app.key_service(stack.pm).set_key(OPERATOR, "refused-ws", "openai", refused, test=False)
    stack.set_fallback_policy("refused-ws", "on_error")

    async def main() -> tuple[float, RunStatus, str | None]:
        async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
            await runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE)  # warm
            watch = LoopWatch()
            watch.start()
            with WriteLock(_database(stack), seconds=1.5):
                result = await runner.run(WORKFLOW, actor=OPERATOR, workspace_id="refused-ws")
                await watch.stop()
        source = result.blocks["answer"].calls[0].source.value
        return watch.longest, result.status, source

    longest, status, source = asyncio.run(main())
    assert status is RunStatus.COMPLETED
    assert source == "platform"  # the fallback served it
    assert longest < 0.5
    stack.app.close()  # waits for the background writes
    actions = {e.action for e in stack.app.audit_store.events("refused-ws")}
    assert {"key.cooldown", "fallback.used"} <= actions
    (key,) = stack.app.key_store.list_keys("refused-ws")
    assert key.cooldown_until is not None
    assert key.cooldown_reason == "auth"


# --- cancellation ----------------------------------------------------------------------------------

PARALLEL = parse_workflow(
    {
        "name": "two",
        "version": "1",
        "blocks": {
            "a": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Say hi."},
            "b": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Say bye."},
        },
    }
)


@pytest.mark.parametrize(
    "workflow", [WORKFLOW, PARALLEL], ids=["one block, awaited inline", "two blocks, tasks"]
)
def test_a_cancelled_run_stops_its_calls_and_records_nothing(
    emulator: EmulatorServer, key: str, workflow: Workflow
) -> None:
    emulator.add_fault(Fault(FaultKind.SLOW, provider="openai", delay=5.0, times=None))
    answers = Answers(key, declared=frozenset(RUN_HOOKS))
    pm = new_manager(answers)

    async def main() -> tuple[float, set[asyncio.Task[object]]]:
        async with WorkflowRunner.open(pm, environ=emulator.environ()) as runner:
            run = asyncio.create_task(
                runner.run(workflow, actor=OPERATOR, workspace_id=BYOK_WORKSPACE)
            )
            await asyncio.sleep(0.3)  # the calls are in flight, waiting on the slow provider
            assert answers.threads["byok_resolve_credential"]
            started = time.perf_counter()
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            took = time.perf_counter() - started
            left = asyncio.all_tasks() - {asyncio.current_task()}
        return took, left  # type: ignore[return-value]

    took, left = asyncio.run(main())
    assert took < 3.0  # not the 5 s the provider would have taken (a wide margin: load)
    assert left == set()  # no block task outlives its run
    assert "byok_record_usage" not in answers.threads  # nothing completed, nothing recorded
    assert "byok_compute_charge" not in answers.threads


def test_only_hooks_called_inline_give_up_on_a_locked_store(tmp_path: Path) -> None:
    """The 25 ms wait is for hooks a host calls on its event loop; other writes on the loop's
    thread (an async host managing keys, a migration started by the first hook) wait."""
    app = App(Settings.from_environ({"BYOK_HOME": str(tmp_path)}))
    engine = app.engine
    database = app.settings.database_url.split("///", 1)[1]

    def write(**options: bool) -> None:
        with write_transaction(engine, **options) as conn:
            conn.exec_driver_sql("SELECT 1")

    async def main() -> None:
        with WriteLock(database, seconds=0.3):
            write()  # on the loop's thread, not in a hook: waits for the lock
        with WriteLock(database, seconds=0.3), calling_inline():
            with pytest.raises(sa.exc.OperationalError, match="database is locked"):
                write()  # in a hook called inline: gives up after 25 ms
            write(prompt=False)  # asked to wait (a migration): waits

    try:
        asyncio.run(main())
    finally:
        app.close()


def test_a_run_cancelled_while_its_record_waits_for_the_lock_still_records_it(
    sqlite_stack: DemoStack, emulator: EmulatorServer
) -> None:
    stack = sqlite_stack

    async def main() -> None:
        async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
            await runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE)  # warm
            with WriteLock(_database(stack), seconds=1.0):
                run = asyncio.create_task(
                    runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE)
                )
                while len([c for c in emulator.calls() if c.method == "POST"]) < 2:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # the call is done; its record waits for the lock
                run.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await run

    asyncio.run(main())  # its end waits for the worker thread that holds the record
    assert stack.app.ledger.count() == 2


def test_one_record_attempt_still_gets_its_try_off_the_loop(sqlite_stack: DemoStack) -> None:
    stack = sqlite_stack

    async def main() -> RunStatus:
        options = RunnerOptions(record_attempts=1)
        async with WorkflowRunner.open(stack.pm, environ=stack.environ, options=options) as runner:
            await runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE)  # warm
            with WriteLock(_database(stack), seconds=0.3):
                result = await runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE)
        return result.status

    assert asyncio.run(main()) is RunStatus.COMPLETED
    assert stack.app.ledger.count() == 2


def test_a_cooldown_waiting_for_the_lock_is_applied_meanwhile(
    sqlite_stack: DemoStack, emulator: EmulatorServer
) -> None:
    """While the store is locked the refused key's cooldown cannot be written, but this worker
    does not hand the refused key to the provider again."""
    stack = sqlite_stack
    refused = realistic_key("openai")
    stack.app.key_service(stack.pm).set_key(OPERATOR, "refused-ws", "openai", refused, test=False)
    stack.set_fallback_policy("refused-ws", "on_error")
    seen_before = len(emulator.calls())

    def posts() -> int:
        return len([c for c in emulator.calls()[seen_before:] if c.method == "POST"])

    async def main() -> list[str]:
        async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
            with WriteLock(_database(stack), seconds=1.5):
                first = asyncio.create_task(
                    runner.run(WORKFLOW, actor=OPERATOR, workspace_id="refused-ws")
                )
                while posts() < 2:  # refused, then served by the platform; its cooldown waits
                    await asyncio.sleep(0.01)
                # these resolve while the store is still locked (their records wait for it)
                later = [
                    runner.run(WORKFLOW, actor=OPERATOR, workspace_id="refused-ws")
                    for _ in range(3)
                ]
                results = await asyncio.gather(first, *later)
        return [r.blocks["answer"].calls[-1].source.value for r in results]

    sources = asyncio.run(main())
    assert sources == ["platform"] * 4
    calls = emulator.calls()[seen_before:]
    refused_calls = [c for c in calls if c.method == "POST" and c.key_label is None]
    assert len(refused_calls) == 1  # only the first run tried the refused key
    stack.app.close()
    (key,) = stack.app.key_store.list_keys("refused-ws")
    assert key.cooldown_reason == "auth"
    cooldowns = [
        e for e in stack.app.audit_store.events("refused-ws") if e.action == "key.cooldown"
    ]
    assert len(cooldowns) == 1


def test_called_inline_is_true_only_in_the_call_itself() -> None:
    seen: dict[str, bool] = {}

    async def main() -> None:
        seen["before"] = called_inline()
        with calling_inline():
            seen["in the call"] = called_inline()
            task = asyncio.get_running_loop().create_task(_ask())  # copies the context
            thread = asyncio.get_running_loop().run_in_executor(
                None,
                contextvars.copy_context().run,
                called_inline,  # as to_thread does
            )
            with calling_inline(False):
                seen["asked to wait"] = called_inline()
        seen["task started in the call"] = await task
        seen["thread started in the call"] = await thread
        seen["after"] = called_inline()

    async def _ask() -> bool:
        return called_inline()

    asyncio.run(main())
    assert seen == {
        "before": False,
        "in the call": True,
        "asked to wait": False,
        "task started in the call": False,
        "thread started in the call": False,
        "after": False,
    }


def test_a_record_that_never_lands_is_logged_even_if_its_run_was_cancelled(
    emulator: EmulatorServer, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing(Answers):
        @hookimpl
        def byok_record_usage(self, record: UsageRecord) -> None:
            raise RuntimeError("the ledger is gone")

    plugin = Failing(key, declared=frozenset(RUN_HOOKS))
    pm = new_manager(plugin)

    async def main() -> None:
        options = RunnerOptions(record_attempts=3)
        async with WorkflowRunner.open(pm, environ=emulator.environ(), options=options) as runner:
            await cancel_once(  # once the call is done and the retries are sleeping
                runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE),
                lambda: any(c.method == "POST" for c in emulator.calls()),
                delay=0.03,
            )
        # leaving open() waited for the retries: their last error is already logged
        assert [r for r in caplog.records if r.levelno == logging.ERROR]

    with caplog.at_level(logging.WARNING, logger="byok.host.runner"):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "is not recorded after 3 tries: RuntimeError: the ledger is gone" in errors[0].message
    assert key not in caplog.text


def test_a_deferred_cooldown_written_late_drops_the_cached_list(
    sqlite_stack: DemoStack, emulator: EmulatorServer
) -> None:
    """Two keys, one refused while the store is locked: once the cooldown lands, the list cached
    meanwhile (without it) is dropped, and the refused key is not handed out again."""
    stack = sqlite_stack
    service = stack.app.key_service(stack.pm)
    service.set_key(OPERATOR, "two-keys", "openai", realistic_key("openai"), label="a", test=False)
    good = emulator.new_key("openai", label="good")
    service.set_key(OPERATOR, "two-keys", "openai", good, label="b", test=False)

    seen_before = len(emulator.calls())

    def posts() -> int:
        return len([c for c in emulator.calls()[seen_before:] if c.method == "POST"])

    async def main() -> list[str | None]:
        async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
            with WriteLock(_database(stack), seconds=0.8):
                first = asyncio.create_task(
                    runner.run(WORKFLOW, actor=OPERATOR, workspace_id="two-keys")
                )
                while posts() < 2:  # a refused (its cooldown waits for the lock), b served
                    await asyncio.sleep(0.01)
                # resolved while locked: caches the list as the store has it, without the cooldown
                await asyncio.gather(
                    first, runner.run(WORKFLOW, actor=OPERATOR, workspace_id="two-keys")
                )
            while stack.app.background_writes.pending:
                await asyncio.sleep(0.01)
            after_lock = len(emulator.calls())
            results = [
                await runner.run(WORKFLOW, actor=OPERATOR, workspace_id="two-keys")
                for _ in range(4)
            ]
        refused_again = [
            c for c in emulator.calls()[after_lock:] if c.method == "POST" and c.key_label is None
        ]
        assert refused_again == []  # key a is not handed to the provider again
        return [r.blocks["answer"].calls[-1].hint for r in results]

    hints = asyncio.run(main())
    assert set(hints) == {f"{good[:6]}...{good[-4:]}"}  # key b served every run


def test_a_deferred_cooldown_does_not_undo_an_enable_committed_first(
    sqlite_stack: DemoStack,
) -> None:
    stack = sqlite_stack
    refused = realistic_key("openai")
    stack.app.key_service(stack.pm).set_key(OPERATOR, "refused-ws", "openai", refused, test=False)
    stack.set_fallback_policy("refused-ws", "on_error")
    (key,) = stack.app.key_store.list_keys("refused-ws")
    # the lock holder is an operator's `keys enable`: it commits before any waiting writer
    enable = (
        "UPDATE byok_workspace_keys SET updated_at = '2031-01-01 00:00:00.000000', "
        f"cooldown_until = NULL, cooldown_reason = NULL WHERE id = '{key.id}'"
    )

    async def main() -> None:
        async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
            with WriteLock(_database(stack), seconds=0.5, then=enable):
                result = await runner.run(WORKFLOW, actor=OPERATOR, workspace_id="refused-ws")
            assert result.status is RunStatus.COMPLETED

    asyncio.run(main())
    stack.app.close()  # the deferred cooldown has been tried
    (after,) = stack.app.key_store.list_keys("refused-ws")
    assert after.cooldown_until is None  # the enable stands


def test_only_a_change_of_the_key_itself_forgets_its_waiting_cooldown(
    sqlite_stack: DemoStack,
) -> None:
    stack = sqlite_stack
    service = stack.app.key_service(stack.pm)
    service.set_key(OPERATOR, "refused-ws", "openai", realistic_key("openai"), test=False)
    stack.set_fallback_policy("refused-ws", "on_error")
    (refused,) = stack.app.key_store.list_keys("refused-ws")

    def cooling() -> bool:
        (key,) = stack.app.resolver.enabled_keys("refused-ws", "openai")
        return key.cooldown_until is not None

    def audit(action: str, key_id: str | None) -> None:
        with calling_inline():  # as the runner calls it: a locked store does not hold it up
            stack.pm.hook.byok_audit(
                event=AuditEvent(action, "refused-ws", None, provider="openai", key_id=key_id)
            )

    async def main() -> list[bool]:
        seen = []
        async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
            with WriteLock(_database(stack), seconds=0.8):
                run = asyncio.create_task(
                    runner.run(WORKFLOW, actor=OPERATOR, workspace_id="refused-ws")
                )
                while not stack.app.background_writes.pending:  # the cooldown waits
                    await asyncio.sleep(0.005)
                seen.append(cooling())
                audit("key.tested", refused.id)  # changes nothing
                seen.append(cooling())
                audit("key.enabled", "key_someotherkey000")  # another key
                seen.append(cooling())
                audit("key.enabled", refused.id)  # this key: an operator re-enabled it
                seen.append(cooling())
                await run
        return seen

    assert asyncio.run(main()) == [True, True, True, False]


def test_a_run_cancelled_while_its_hooks_run_in_a_thread_still_records(
    emulator: EmulatorServer, key: str
) -> None:
    """Hooks in a worker thread (an undeclared plugin): the run is cancelled while the first
    record fails slowly; the retry still happens, and leaving open() waits for it."""
    entered = threading.Event()

    class SlowFirstRecord(Answers):
        def __init__(self) -> None:
            super().__init__(key)
            self.records: list[str] = []
            self.failed = False

        @hookimpl
        def byok_record_usage(self, record: UsageRecord) -> None:
            if not self.failed:
                self.failed = True
                entered.set()
                time.sleep(0.2)
                raise RuntimeError("the ledger blinked")
            self.records.append(record.idempotency_key)

    plugin = SlowFirstRecord()
    pm = new_manager(plugin)

    async def main() -> None:
        async with WorkflowRunner.open(pm, environ=emulator.environ()) as runner:
            assert runner.hooks_in_thread() is True
            await cancel_once(
                runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE), entered.is_set
            )
        assert len(plugin.records) == 1  # tried again, in the same job, before open() let go

    asyncio.run(main())


def test_inline_writes_give_up_at_once_for_a_moment_after_finding_the_store_locked(
    sqlite_stack: DemoStack,
) -> None:
    stack = sqlite_stack
    stack.app.ledger.count()  # the store is open

    def audit() -> float:
        started = time.perf_counter()
        with calling_inline():
            stack.pm.hook.byok_audit(
                event=AuditEvent("fallback.used", BYOK_WORKSPACE, None, provider="openai")
            )
        return time.perf_counter() - started

    took: list[float] = []
    backoff = lock_backoff(stack.app.engine)
    assert backoff is not None
    hits: list[int] = []  # which audit found the store locked (after waiting for it)
    found_locked = backoff.hit

    def counted() -> None:
        hits.append(len(took))
        found_locked()

    backoff.hit = counted  # type: ignore[method-assign]

    async def main() -> None:
        with WriteLock(_database(stack), seconds=0.6):
            for _ in range(5):
                took.append(audit())

    asyncio.run(main())
    assert took[0] >= 0.02  # the first waited its 25 ms for the lock
    # the others did not wait again: only the first found the store locked (counted, not timed:
    # on a loaded machine a call that waits for nothing may still take 15 ms)
    assert hits == [0]
    stack.app.close()  # the background writer wrote all five once the lock went
    used = [e for e in stack.app.audit_store.events(BYOK_WORKSPACE) if e.action == "fallback.used"]
    assert len(used) == 5


def test_closing_waits_for_background_writes_only_so_long(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writes = BackgroundWrites()
    release = threading.Event()
    done: list[int] = []
    writes.submit(lambda: release.wait(5), "a write stuck on a lock")
    for n in range(3):
        writes.submit(lambda n=n: done.append(n), f"queued write {n}")
    started = time.perf_counter()
    with caplog.at_level(logging.ERROR, logger="byok.store"):
        writes.close(timeout=0.2)
    assert time.perf_counter() - started < 1.0
    assert "3 queued store writes (audit events, key cooldowns) were still waiting" in caplog.text
    assert "one is still running" in caplog.text
    release.set()
    time.sleep(0.1)
    assert done == []  # the queued ones were dropped, not run after close


def test_a_late_cooldown_that_could_not_be_written_still_applies_until_it_ends(
    sqlite_stack: DemoStack, tmp_path: Path
) -> None:
    stack = sqlite_stack
    resolver = stack.app.resolver
    (key,) = stack.app.resolver.enabled_keys(BYOK_WORKSPACE, "openai")
    until = datetime.now(UTC) + timedelta(seconds=60)
    resolver._pending_cooldowns[key.id] = _PendingCooldown(
        BYOK_WORKSPACE, "openai", until, FailureReason.AUTH
    )
    stack.app.close()  # the store goes away: the late write fails
    database = Path(_database(stack))
    database.rename(tmp_path / "moved.db")
    with pytest.raises(Exception, match="no such table"):
        resolver._write_cooldown(key, until, FailureReason.AUTH)
    (applied,) = resolver._with_pending((key,))
    assert applied.cooldown_until == until  # not forgotten because the write failed


def test_a_late_cooldown_once_written_is_still_applied_for_one_cache_interval(
    sqlite_stack: DemoStack,
) -> None:
    """A key list read before the late write (without the cooldown) may still be cached: the
    cooldown is applied from memory for one cache interval more, then forgotten."""
    stack = sqlite_stack
    resolver = stack.app.resolver
    (key,) = resolver.enabled_keys(BYOK_WORKSPACE, "openai")
    until = datetime.now(UTC) + timedelta(seconds=60)
    resolver._pending_cooldowns[key.id] = _PendingCooldown(
        BYOK_WORKSPACE, "openai", until, FailureReason.AUTH
    )
    tick = [1000.0]
    resolver._monotonic = lambda: tick[0]
    resolver._write_cooldown(key, until, FailureReason.AUTH)  # lands
    (stored,) = stack.app.key_store.list_keys(BYOK_WORKSPACE)
    assert stored.cooldown_until is not None
    (applied,) = resolver._with_pending((key,))  # a list read before the write
    assert applied.cooldown_until == until
    tick[0] += resolver.cache.ttl + 1.5
    (after,) = resolver._with_pending((key,))
    assert after.cooldown_until is None  # forgotten: the store has it now
    assert key.id not in resolver._pending_cooldowns


def test_one_record_attempt_in_a_thread_that_fails_after_a_cancel_is_logged(
    emulator: EmulatorServer, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    entered = threading.Event()

    class SlowFailingRecord(Answers):
        @hookimpl
        def byok_record_usage(self, record: UsageRecord) -> None:
            entered.set()
            time.sleep(0.2)
            raise RuntimeError("the ledger is gone")

    pm = new_manager(SlowFailingRecord(key))

    async def main() -> None:
        options = RunnerOptions(record_attempts=1)
        async with WorkflowRunner.open(pm, environ=emulator.environ(), options=options) as runner:
            assert runner.hooks_in_thread() is True
            await cancel_once(
                runner.run(WORKFLOW, actor=OPERATOR, workspace_id=BYOK_WORKSPACE), entered.is_set
            )
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert (
            "is not recorded after 1 tries: RuntimeError: the ledger is gone" in errors[0].message
        )

    with caplog.at_level(logging.WARNING, logger="byok.host.runner"):
        asyncio.run(main())
