"""A run id its caller chose is claimed across the store's workers while its run is in flight.

Two workers given the same run id at once would both make the run's calls under the same
idempotency keys; the ledger keeps the first record of a key, so the other worker's calls would
be made and never recorded nor charged (a security review reproduced it with three ``byok run
--run-id nightly`` at once: 3 provider calls, 1 row). Each "worker" here is its own App, engine
and runner on the same store, a real SQLite file or a real PostgreSQL database, calling the
emulator over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pluggy
import pytest
import sqlalchemy as sa
from byok_hookspecs import hookimpl
from click.testing import CliRunner
from migration_support import model_differences

from byok_plugin.app import App
from byok_plugin.billing.run_claims import RunClaims, run_claims
from byok_plugin.cli import main
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.cli.run import run_workflow
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.run_result import RunResult
from byok_plugin.host.runner import RunIdInUse, RunnerOptions
from byok_plugin.host.workflow import parse_workflow
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings
from byok_plugin.store import create_store_engine, ensure_migrated

DOCUMENT: dict[str, Any] = {
    "name": "one-call",
    "version": "1",
    "blocks": {"answer": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Say hello."}},
}
WORKFLOW = parse_workflow(DOCUMENT, source="one-call.json")


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def another_worker(stack: DemoStack) -> tuple[App, pluggy.PluginManager]:
    """A second worker on the stack's store: its own app, engine and plugin manager."""
    app = App(Settings.from_environ(stack.environ))
    return app, plugin_manager_for(app, load_entrypoints=False)


def run(
    pm: pluggy.PluginManager,
    stack: DemoStack,
    workspace: str,
    run_id: str,
    options: RunnerOptions | None = None,
) -> RunResult:
    return asyncio.run(
        run_workflow(
            pm,
            WORKFLOW,
            workspace_id=workspace,
            inputs={},
            environ=stack.environ,
            actor=OPERATOR,
            run_id=run_id,
            options=options,
        )
    )


def model_calls(emulator: EmulatorServer) -> int:
    return len([c for c in emulator.calls() if c.method == "POST"])


def claims(stack: DemoStack) -> list[Any]:
    with stack.app.engine.connect() as conn:
        return list(conn.execute(sa.select(run_claims)))


class InFlight:
    """A run of the stack's worker in a thread, its one provider call held ``delay`` seconds by
    the emulator; ``with``: started, and in flight (its run id claimed)."""

    def __init__(
        self,
        stack: DemoStack,
        run_id: str,
        *,
        delay: float = 3.0,
        options: RunnerOptions | None = None,
    ) -> None:
        self.stack = stack
        self.run_id = run_id
        self.options = options
        stack.emulator.add_fault(Fault(FaultKind.SLOW, provider="openai", delay=delay))
        self.result: RunResult | None = None
        self.started = 0.0
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        self.result = run(self.stack.pm, self.stack, BYOK_WORKSPACE, self.run_id, self.options)

    def __enter__(self) -> InFlight:
        self.started = time.monotonic()
        self._thread.start()
        deadline = time.monotonic() + 30
        while not any(c.run_id == self.run_id for c in claims(self.stack)):
            assert time.monotonic() < deadline, "the run never claimed its id"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()


def test_the_run_claims_table_matches_its_migration(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        ensure_migrated(engine)
        with engine.connect() as conn:
            assert model_differences(conn, {run_claims.name}) == []
    finally:
        engine.dispose()


def test_hook_byok_claim_run_claims_extends_refuses_and_takes_over_a_lapsed_claim(
    stack: DemoStack,
) -> None:
    now = [datetime.now(UTC)]  # the hook below claims on the app's (real) clock
    store = RunClaims(stack.app.engine, clock=lambda: now[0])
    hook = stack.pm.hook.byok_claim_run
    assert hook(run_id="nightly", workspace_id="acme", claimant="a" * 32, seconds=60) is True
    # another claimant, of the same workspace or another, is refused while the claim holds
    assert store.claim("nightly", "acme", "b" * 32, 60) is False
    assert store.claim("nightly", "globex", "c" * 32, 60) is False
    # the holder extends it
    assert store.claim("nightly", "acme", "a" * 32, 60) is True
    # lapsed (the holder's worker died): the next claimant takes it over
    now[0] += timedelta(hours=1)
    assert store.claim("nightly", "globex", "c" * 32, 60) is True
    assert store.claim("nightly", "acme", "a" * 32, 60) is False
    assert [(c.run_id, c.workspace_id, c.claimant) for c in claims(stack)] == [
        ("nightly", "globex", "c" * 32)
    ]


def test_hook_byok_release_run_gives_back_the_holders_claim_only(stack: DemoStack) -> None:
    hook = stack.pm.hook
    assert hook.byok_claim_run(run_id="r-1", workspace_id="acme", claimant="a" * 32, seconds=60)
    hook.byok_release_run(run_id="r-1", claimant="b" * 32)  # not the holder: nothing changes
    assert [c.claimant for c in claims(stack)] == ["a" * 32]
    hook.byok_release_run(run_id="r-1", claimant="a" * 32)
    assert claims(stack) == []
    assert hook.byok_claim_run(run_id="r-1", workspace_id="acme", claimant="b" * 32, seconds=60)


def test_a_run_id_in_flight_in_another_worker_is_refused_before_any_call(
    stack: DemoStack,
) -> None:
    app, pm = another_worker(stack)
    try:
        with InFlight(stack, "nightly") as first:
            sent = model_calls(stack.emulator)
            with pytest.raises(RunIdInUse, match="in use by a run in flight in another worker"):
                run(pm, stack, BYOK_WORKSPACE, "nightly")
            # another workspace choosing the same id is refused alike, and not told whose it is
            with pytest.raises(RunIdInUse) as refused:
                run(pm, stack, PLATFORM_WORKSPACE, "nightly")
            assert BYOK_WORKSPACE not in str(refused.value)
            # so is `byok run --run-id` (a message, no traceback)
            workflow = stack.home.parent / "one-call.json"
            workflow.write_text(json.dumps(DOCUMENT))
            answer = CliRunner().invoke(
                main,
                ["run", str(workflow), "-w", BYOK_WORKSPACE, "--run-id", "nightly"],
                env=stack.environ,
            )
            assert answer.exit_code != 0
            assert "in use by a run in flight in another worker" in answer.output
            assert "Traceback" not in answer.output
            assert model_calls(stack.emulator) == sent  # none of them was sent
        assert first.result is not None
        assert first.result.ok, first.result.error
    finally:
        app.close()
    rows = [r for r in stack.app.ledger.rows() if r.run_id == "nightly"]
    assert len(rows) == model_calls(stack.emulator) == 1  # every call made is recorded
    assert claims(stack) == []  # given back when the run ended


def test_a_claim_left_by_a_dead_worker_refuses_until_it_lapses(stack: DemoStack) -> None:
    now = datetime.now(UTC)
    with stack.app.engine.begin() as conn:
        conn.execute(
            sa.insert(run_claims),
            [
                {
                    "run_id": "held",
                    "workspace_id": BYOK_WORKSPACE,
                    "claimant": "d" * 32,
                    "expires_at": now + timedelta(minutes=5),
                },
                {
                    "run_id": "lapsed",
                    "workspace_id": BYOK_WORKSPACE,
                    "claimant": "d" * 32,
                    "expires_at": now - timedelta(seconds=1),
                },
            ],
        )
    sent = model_calls(stack.emulator)
    with pytest.raises(RunIdInUse, match="lapses within 300 s"):
        run(stack.pm, stack, BYOK_WORKSPACE, "held")
    assert model_calls(stack.emulator) == sent
    taken = run(stack.pm, stack, BYOK_WORKSPACE, "lapsed")
    assert taken.ok, taken.error
    assert [c.run_id for c in claims(stack)] == ["held"]


def test_a_long_run_keeps_its_claim_past_run_claim_seconds(stack: DemoStack) -> None:
    """The runner extends the claim every third of ``run_claim_seconds`` while the run goes on:
    another worker cannot take the id over during a call longer than the claim itself."""
    app, _pm = another_worker(stack)
    options = RunnerOptions(run_claim_seconds=1.2)
    try:
        with InFlight(stack, "long", delay=2.5, options=options) as first:
            tries = 0
            while time.monotonic() - first.started < 2.2:  # past the claim's first 1.2 s
                assert app.run_claims.claim("long", BYOK_WORKSPACE, "e" * 32, 60) is False
                tries += 1
                time.sleep(0.1)
            assert tries >= 5
        assert first.result is not None
        assert first.result.ok, first.result.error
    finally:
        app.close()
    assert claims(stack) == []


class SlowExtension:
    """Holds the run's extensions of its claim (every byok_claim_run after the first) in their
    worker thread until ``go`` is set, then lets the default answer."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.calls = 0

    @hookimpl(tryfirst=True)
    def byok_claim_run(
        self, run_id: str, workspace_id: str, claimant: str, seconds: float
    ) -> bool | None:
        self.calls += 1
        if self.calls > 1:
            assert self.go.wait(10)
        return None


def test_a_claim_extended_while_its_run_ends_is_released_after_the_extension(
    stack: DemoStack,
) -> None:
    """The run ends while an extension of its claim is still in a worker thread: the release
    waits for it, else the extension would write the claim back and it would outlive the run."""
    slow = SlowExtension()
    stack.pm.register(slow, name="slow-extension")
    stack.emulator.add_fault(Fault(FaultKind.SLOW, provider="openai", delay=0.8))
    threading.Timer(1.5, slow.go.set).start()  # after the run's call has ended
    result = run(stack.pm, stack, BYOK_WORKSPACE, "ending", RunnerOptions(run_claim_seconds=1.5))
    assert result.ok, result.error
    assert slow.calls >= 2  # an extension was on its way when the run ended
    assert claims(stack) == []
