"""Budgets around real provider calls: the reference runner, the real plugin (store, billing,
ledger) on a SQLite file and on PostgreSQL, over real HTTP against the emulator."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from byok_hookspecs import BudgetSettlement, CredentialSource, Usage, UsageRecord, hookimpl
from clock_support import ShiftedClock

from byok_plugin.billing.budgets import UNIT, budget_holds
from byok_plugin.cli.demo import BYOK_WORKSPACE, OPERATOR, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.cli.run import run_workflow
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.run_result import BlockStatus, RunResult, RunStatus
from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
from byok_plugin.host.workflow import Workflow, parse_workflow

ONE_CALL: Workflow = parse_workflow(
    {
        "name": "one-call",
        "version": "1",
        "blocks": {
            "answer": {
                "type": "agent",
                "model": "gpt-4o-mini",
                "prompt": "Say hello to {{inputs.name}}.",
                "max_tokens": 64,
            }
        },
        "inputs": {"name": {"type": "string"}},
    }
)


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    # monthly budgets that spend over several calls: no month may begin between them
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url, clock=ShiftedClock())
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def model_calls(emulator: EmulatorServer) -> int:
    return len([c for c in emulator.calls() if c.method == "POST"])


def worst_case(stack: DemoStack) -> Decimal:
    """The hold of one call of ONE_CALL, as the store recorded it."""
    with stack.app.engine.connect() as conn:
        amounts = {r.amount_units for r in conn.execute(sa.select(budget_holds.c.amount_units))}
    assert len(amounts) == 1, amounts
    return Decimal(amounts.pop()) * UNIT


def test_a_hard_budget_refuses_the_call_that_does_not_fit_before_it_is_sent(
    stack: DemoStack,
) -> None:
    budgets = stack.app.budgets
    budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="1000")
    first = stack.run(ONE_CALL, PLATFORM_WORKSPACE, {"name": "Ada"})
    assert first.ok, first.error
    hold = worst_case(stack)
    (call,) = first.calls
    assert 0 < call.charge.amount <= hold  # the worst case covers what the call cost
    # room for two and a half worst cases: calls go until what is left is less than one
    spent = budgets.get(PLATFORM_WORKSPACE, "monthly").spent  # type: ignore[union-attr]
    assert spent >= call.charge.amount
    budgets.set_budget(
        PLATFORM_WORKSPACE, "monthly", limit=spent + 2 * hold + (hold / 2).quantize(UNIT)
    )
    completed = 0
    for n in range(40):
        sent = model_calls(stack.emulator)
        refused = stack.run(ONE_CALL, PLATFORM_WORKSPACE, {"name": f"user {n}"})
        if not refused.ok:
            break
        completed += 1
    assert completed >= 2  # every call that fitted went
    assert refused.status is RunStatus.FAILED
    answer = refused.blocks["answer"]
    assert answer.status is BlockStatus.FAILED
    assert answer.calls == ()
    message = answer.error or ""
    assert f"workspace {PLATFORM_WORKSPACE!r}" in message
    assert "budget 'monthly'" in message
    for word in ("spent", "reserved", "left"):
        assert word in message
    assert model_calls(stack.emulator) == sent  # never sent
    status = budgets.get(PLATFORM_WORKSPACE, "monthly")
    assert status is not None
    assert status.reserved == 0
    assert status.left < hold
    # spent is the ledger's charges, each rounded up to the unit
    rows = list(stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE]))
    assert len(rows) == completed + 1
    charged = sum((r.amount for r in rows), Decimal(0))
    assert charged <= status.spent < charged + len(rows) * UNIT
    assert status.spent <= status.limit


def test_on_sqlite_a_call_holds_records_and_settles_through_one_connection(
    stack: DemoStack,
) -> None:
    """The ledger and the budgets share their ``sqlite3`` connections: SQLite empties a
    connection's page cache whenever another one wrote the file, which a reservation on one
    connection and the ledger row with its settlement on another did on every call."""
    writers = stack.app.sqlite_writers
    if writers is None:
        pytest.skip("PostgreSQL: no direct sqlite3 writers")
    stack.app.budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="1000")
    assert stack.run(ONE_CALL, PLATFORM_WORKSPACE, {"name": "Ada"}).ok  # opens what it needs
    assert (len(writers.prompt), len(writers.waiting)) == (1, 0)

    def data_version() -> int:
        # what this connection says of the file: it changes when ANOTHER connection commits
        conn = writers.prompt.acquire()
        try:
            return int(conn.execute("PRAGMA data_version").fetchone()[0])
        finally:
            writers.prompt.release(conn)

    before = data_version()
    assert stack.run(ONE_CALL, PLATFORM_WORKSPACE, {"name": "Grace"}).ok
    assert data_version() == before  # held, recorded and settled: all through that one
    assert (len(writers.prompt), len(writers.waiting)) == (1, 0)
    assert len(list(stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE]))) == 2
    status = stack.app.budgets.get(PLATFORM_WORKSPACE, "monthly")
    assert status is not None
    assert (status.reserved, status.spent > 0) == (0, True)


def test_a_call_that_fails_releases_its_hold(stack: DemoStack) -> None:
    budgets = stack.app.budgets
    budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="10")
    stack.emulator.add_fault(Fault(FaultKind.SERVER_ERROR, provider="openai", times=None))
    result = stack.run(ONE_CALL, PLATFORM_WORKSPACE, {"name": "Ada"})
    assert result.status is RunStatus.FAILED
    assert result.blocks["answer"].calls == ()
    # the block's two attempts were held and released (the runner waits for that on exit)
    status = budgets.get(PLATFORM_WORKSPACE, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (0, 0)
    with stack.app.engine.connect() as conn:
        states = [r.state for r in conn.execute(sa.select(budget_holds.c.state))]
    # released, not settled: a run made again under the same run id holds its calls again
    assert states == ["expired", "expired"]


def test_a_byok_shadow_budget_counts_the_list_cost_of_the_workspace_keys(
    stack: DemoStack,
) -> None:
    budgets = stack.app.budgets
    budgets.set_budget(BYOK_WORKSPACE, "own-keys", limit="1000", metric="list_cost")
    result = stack.run(ONE_CALL, BYOK_WORKSPACE, {"name": "Ada"})
    assert result.ok, result.error
    (call,) = result.calls
    assert call.charge.amount == 0
    assert call.charge.list_cost is not None
    status = budgets.get(BYOK_WORKSPACE, "own-keys")
    assert status is not None
    assert call.charge.list_cost <= status.spent < call.charge.list_cost + UNIT
    assert status.reserved == 0


def test_the_worst_case_covers_max_tokens_at_the_output_price(stack: DemoStack) -> None:
    stack.app.budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="1000")
    assert stack.run(ONE_CALL, PLATFORM_WORKSPACE, {"name": "Ada"}).ok
    output_only = stack.app.billing.list_cost(Usage("openai", "gpt-4o-mini", output_tokens=64))[0]
    assert output_only is not None
    assert worst_case(stack) > output_only


ANTHROPIC_CALL: Workflow = parse_workflow(
    {
        "name": "one-anthropic-call",
        "version": "1",
        "blocks": {
            "answer": {
                "type": "agent",
                "model": "claude-haiku-4-5",
                "prompt": "Say hello.",
                "max_tokens": 64,
            }
        },
    }
)


def test_a_fallback_to_the_platform_key_replaces_the_hold_and_settles_once(
    stack: DemoStack,
) -> None:
    budgets = stack.app.budgets
    budgets.set_budget(BYOK_WORKSPACE, "charges", limit="1000")
    # the workspace's own key is refused; on_error lets the platform serve (and bill) the call
    stack.emulator.state.remove_key("anthropic", stack.workspace_keys["anthropic"])
    stack.set_fallback_policy(BYOK_WORKSPACE, "on_error")
    result = stack.run(ANTHROPIC_CALL, BYOK_WORKSPACE, {})
    assert result.ok, result.error
    (call,) = result.calls
    assert call.fallback is True
    assert call.charge.amount > 0
    status = budgets.get(BYOK_WORKSPACE, "charges")
    assert status is not None
    assert status.reserved == 0
    assert call.charge.amount <= status.spent < call.charge.amount + UNIT
    with stack.app.engine.connect() as conn:
        holds = conn.execute(sa.select(budget_holds.c.idempotency_key, budget_holds.c.state)).all()
    assert [tuple(h) for h in holds] == [(call.idempotency_key, "settled")]


def test_a_fallback_refused_by_a_budget_is_audited_after_the_fallback(stack: DemoStack) -> None:
    # the workspace's own key is refused; on_error would let the platform serve the call, but the
    # workspace's platform-charge budget has no room for it
    stack.app.budgets.set_budget(BYOK_WORKSPACE, "charges", limit="0.000001")
    stack.emulator.state.remove_key("anthropic", stack.workspace_keys["anthropic"])
    stack.set_fallback_policy(BYOK_WORKSPACE, "on_error")
    sent = model_calls(stack.emulator)

    result = stack.run(ANTHROPIC_CALL, BYOK_WORKSPACE, {})

    assert result.status is RunStatus.FAILED
    assert "budget 'charges'" in (result.blocks["answer"].error or "")
    # the refused workspace-key attempt went out; the platform call never did
    assert model_calls(stack.emulator) == sent + 1
    events = stack.app.audit_store.events(BYOK_WORKSPACE)  # newest first
    actions = [e.action for e in events]
    assert "fallback.used" in actions
    assert "budget.refused" in actions
    assert actions.index("budget.refused") < actions.index("fallback.used")  # written after it
    refused = events[actions.index("budget.refused")]
    assert refused.outcome == "denied"
    assert refused.provider == "anthropic"
    assert "budget 'charges'" in refused.detail
    assert CredentialSource.PLATFORM.value in refused.detail
    assert f"run {result.run_id}" in refused.detail
    assert "block answer" in refused.detail


def test_a_cancelled_run_releases_the_hold_of_its_call_in_flight(stack: DemoStack) -> None:
    budgets = stack.app.budgets
    budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="1000")
    stack.emulator.add_fault(Fault(FaultKind.SLOW, provider="openai", delay=3.0, times=1))

    async def go() -> None:
        async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
            task = asyncio.create_task(
                runner.run(
                    ONE_CALL,
                    actor=OPERATOR,
                    workspace_id=PLATFORM_WORKSPACE,
                    inputs={"name": "Ada"},
                )
            )
            for _ in range(200):
                await asyncio.sleep(0.01)
                held = budgets.get(PLATFORM_WORKSPACE, "monthly")
                if held is not None and held.reserved > 0:
                    break
            else:
                pytest.fail("the call was never held")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    status = budgets.get(PLATFORM_WORKSPACE, "monthly")
    assert status is not None
    assert (status.spent, status.reserved) == (0, 0)
    assert list(stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE])) == []


def run_with_id(stack: DemoStack, run_id: str) -> RunResult:
    return asyncio.run(
        run_workflow(
            stack.pm,
            ONE_CALL,
            workspace_id=PLATFORM_WORKSPACE,
            inputs={"name": "Ada"},
            environ=stack.environ,
            actor=OPERATOR,
            run_id=run_id,
        )
    )


def test_a_run_id_made_again_after_a_call_that_left_no_row_is_held_and_spent_again(
    stack: DemoStack,
) -> None:
    budgets = stack.app.budgets
    budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="100")
    stack.emulator.add_fault(Fault(FaultKind.SERVER_ERROR, provider="openai", times=None))
    first = run_with_id(stack, "run-fixed-1")
    assert not first.ok
    assert list(stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE])) == []
    stack.emulator.state.clear_faults()
    # no call recorded: the run id may be used again, and its calls count in the budget again
    second = run_with_id(stack, "run-fixed-1")
    assert second.ok, second.error
    charged = sum(
        (r.amount for r in stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE])), Decimal(0)
    )
    status = budgets.get(PLATFORM_WORKSPACE, "monthly")
    assert status is not None
    assert status.spent >= charged > 0
    assert status.reserved == 0


CLAUDE_CALL: Workflow = parse_workflow(
    {
        "name": "claude-call",
        "version": "1",
        "blocks": {"answer": {"type": "agent", "model": "claude-sonnet-4-5", "prompt": "Hello."}},
    }
)


@pytest.mark.parametrize(
    ("workspace", "metric"), [(PLATFORM_WORKSPACE, "charge"), (BYOK_WORKSPACE, "list_cost")]
)
def test_an_interrupted_stream_spends_its_charge_in_the_budget(
    stack: DemoStack, workspace: str, metric: str
) -> None:
    budgets = stack.app.budgets
    budgets.set_budget(workspace, "monthly", limit="100", metric=metric)
    stack.emulator.add_fault(Fault(FaultKind.TRUNCATED_STREAM, provider="anthropic", times=1))

    async def go() -> RunResult:
        options = RunnerOptions(block_retries=1)
        async with WorkflowRunner.open(stack.pm, environ=stack.environ, options=options) as runner:
            return await runner.run(
                CLAUDE_CALL, actor=OPERATOR, workspace_id=workspace, inputs={}, stream=True
            )

    result = asyncio.run(go())
    assert result.ok, result.error
    rows = list(stack.app.ledger.rows(workspaces=[workspace]))
    assert sorted(r.status for r in rows) == ["complete", "interrupted"]
    counted = sum(
        ((r.amount if metric == "charge" else r.list_cost or Decimal(0)) for r in rows), Decimal(0)
    )
    interrupted = next(r for r in rows if r.status == "interrupted")
    assert (interrupted.amount if metric == "charge" else interrupted.list_cost or 0) > 0
    status = budgets.get(workspace, "monthly")
    assert status is not None
    assert status.spent >= counted
    assert status.reserved == 0


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-writer", "one-job"])
def test_a_run_cancelled_while_its_completed_call_is_recorded_spends_its_charge(
    stack: DemoStack, group_commit: bool
) -> None:
    # group_commit=True: the runner's group writer (_settle_group) settles the hold;
    # False: the call's own recording job (_settle_and_retry) does
    budgets = stack.app.budgets
    budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="100")
    recording, go_on = threading.Event(), threading.Event()

    class SlowRecorder:
        @hookimpl(tryfirst=True)
        def byok_record_usage(self, record: UsageRecord) -> None:
            recording.set()
            go_on.wait(10)

    stack.pm.register(SlowRecorder(), name="slow-recorder")

    async def go() -> None:
        options = RunnerOptions(block_retries=0, hooks_in_thread=True, group_commit=group_commit)
        async with WorkflowRunner.open(stack.pm, environ=stack.environ, options=options) as runner:
            task = asyncio.create_task(
                runner.run(
                    ONE_CALL,
                    actor=OPERATOR,
                    workspace_id=PLATFORM_WORKSPACE,
                    inputs={"name": "Ada"},
                )
            )
            # the call completed: its record is being written (a recorder never called fails
            # here, after a minute, rather than hanging the suite)
            assert await asyncio.to_thread(recording.wait, 60), "the recorder was never called"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            go_on.set()
            await runner.drain()

    asyncio.run(go())
    rows = list(stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE]))
    assert len(rows) == 1
    assert rows[0].amount > 0
    status = budgets.get(PLATFORM_WORKSPACE, "monthly")
    assert status is not None
    assert status.spent >= rows[0].amount
    assert status.reserved == 0


def test_a_key_rotated_to_after_a_429_is_held_even_when_the_first_key_was_not(
    stack: DemoStack,
) -> None:
    # two keys of the workspace; a hard budget on one only
    service = stack.app.key_service(stack.pm)
    second_key = stack.emulator.new_key("anthropic")
    second = service.set_key(
        OPERATOR, BYOK_WORKSPACE, "anthropic", second_key, label="second", test=False
    )
    first = stack.run(ANTHROPIC_CALL, BYOK_WORKSPACE, {})
    assert first.ok, first.error
    guarded = first.calls[0].key_id
    other_key = second_key if guarded != second.key.id else stack.workspace_keys["anthropic"]
    stack.app.budgets.set_budget(
        BYOK_WORKSPACE, "guard", limit="0.000000001", metric="list_cost", key_id=guarded
    )
    # the next call goes to the other key first (it holds nothing there), which is rate limited:
    # the call rotates to the guarded key, which must be held, and so refused
    stack.emulator.add_fault(
        Fault.for_key(FaultKind.RATE_LIMIT, other_key, provider="anthropic", times=None)
    )
    sent, rows = model_calls(stack.emulator), len(list(stack.app.ledger.rows()))
    refused = stack.run(ANTHROPIC_CALL, BYOK_WORKSPACE, {})
    assert model_calls(stack.emulator) > sent  # the other key was tried first (its 429s)
    assert not refused.ok
    assert "budget 'guard' refuses the call" in (refused.error or "")
    assert len(list(stack.app.ledger.rows())) == rows
    status = stack.app.budgets.get(BYOK_WORKSPACE, "guard")
    assert status is not None
    assert (status.spent, status.reserved) == (0, 0)


def test_a_plugin_settling_budgets_beside_the_default_gets_every_settlement(
    stack: DemoStack,
) -> None:
    # on PostgreSQL the runner's writer records and settles a group in one transaction only
    # when the default plugin is the sole byok_settle_budget implementation: here it is not
    seen: list[str] = []

    class Credits:
        @hookimpl(tryfirst=True)
        def byok_settle_budget(self, settlement: BudgetSettlement) -> bool | None:
            seen.append(settlement.idempotency_key)
            return None  # let the default settle the store's budget too

    stack.pm.register(Credits())
    stack.app.budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="1000")
    results = [stack.run(ONE_CALL, PLATFORM_WORKSPACE, {"name": f"user {n}"}) for n in range(3)]
    assert all(r.ok for r in results), [r.error for r in results]
    keys = [call.idempotency_key for r in results for call in r.calls]
    assert sorted(seen) == sorted(keys)
    spent = stack.app.budgets.get(PLATFORM_WORKSPACE, "monthly")
    assert spent is not None
    assert spent.spent == sum((call.charge.amount for r in results for call in r.calls), Decimal(0))
    assert spent.reserved == 0


def test_a_reservation_the_store_refuses_for_its_values_is_not_tried_again(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    # a refused value (StoreRefusedValue: a ValueError) fails again whatever thread tries it; a
    # store that did not answer (StoreUnavailable) is worth one more try off the event loop
    from byok_plugin.core.errors import StoreRefusedValue

    tries: list[str] = []

    class Refusing:
        byok_nonblocking_hooks = frozenset({"byok_reserve_budget"})

        @hookimpl(tryfirst=True)
        def byok_reserve_budget(self, reservation: object) -> None:
            tries.append(threading.current_thread().name)
            raise StoreRefusedValue(
                "reserving budget", workspace_id=PLATFORM_WORKSPACE, field="key_id"
            )

    stack.pm.register(Refusing())
    before = model_calls(emulator)
    result = stack.run(ONE_CALL, PLATFORM_WORKSPACE, {"name": "x"})
    assert not result.ok
    assert "refused a value while reserving budget" in (result.blocks["answer"].error or "")
    assert len(tries) == 1, tries
    assert model_calls(emulator) == before  # refused before the call was sent
