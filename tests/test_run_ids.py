"""A run id the caller gives: refused when the ledger already holds calls under it (a call made
again under the same idempotency key would be deduplicated: made on a key, recorded and charged
never), unless the caller replays that run, which makes no completed call again.

Through the real plugin (``byok_recorded_calls`` reads the ledger), a real SQLite file and a real
PostgreSQL database, and the provider emulator over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from byok_hookspecs import Charge, CredentialSource, RecordedCall, Usage, UsageRecord
from click.testing import CliRunner
from clock_support import ShiftedClock

from byok_plugin.cli import main
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.cli.run import run_workflow
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.run_result import BlockResult, BlockStatus, RunResult
from byok_plugin.host.runner import RunIdInUse
from byok_plugin.host.workflow import Workflow, parse_workflow

#: two agent blocks in a chain, on two providers, then an output
DOCUMENT: dict[str, Any] = {
    "name": "two-steps",
    "version": "1.0.0",
    "inputs": {"topic": {"type": "string"}},
    "blocks": {
        "first": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Notes on {{inputs.topic}}"},
        "second": {
            "type": "agent",
            "model": "claude-haiku-4-5",
            "prompt": "Summarise: {{first.content}}",
        },
        "result": {"type": "output", "value": "{{second.content}}"},
    },
    "edges": [{"from": "first", "to": "second"}, {"from": "second", "to": "result"}],
}
INPUTS = {"topic": "heat pumps"}


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    # a monthly budget sums a run's calls: no month may begin between them
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url, clock=ShiftedClock())
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def _workflow() -> Workflow:
    return parse_workflow(DOCUMENT, source="two-steps.json")


def _run(
    stack: DemoStack,
    *,
    run_id: str | None,
    workspace: str = BYOK_WORKSPACE,
    replay: RunResult | None = None,
) -> RunResult:
    return asyncio.run(
        run_workflow(
            stack.pm,
            _workflow(),
            workspace_id=workspace,
            inputs=INPUTS,
            environ=stack.environ,
            actor=OPERATOR,
            run_id=run_id,
            replay=replay,
        )
    )


def _model_calls(emulator: EmulatorServer) -> list[Any]:
    return [c for c in emulator.calls() if c.method == "POST"]


def _ledger_keys(stack: DemoStack, run_id: str) -> list[str]:
    return [r.idempotency_key for r in stack.app.ledger.rows() if r.run_id == run_id]


def _record(key: str, workspace: str, run_id: str, block: str, attempt: int) -> UsageRecord:
    return UsageRecord(
        idempotency_key=key,
        workspace_id=workspace,
        usage=Usage("openai", "gpt-4o-mini", input_tokens=1, output_tokens=1),
        charge=Charge(amount=Decimal(0), reason="byok", list_cost=Decimal("0.000001")),
        source=CredentialSource.WORKSPACE,
        run_id=run_id,
        block_id=block,
        attempt=attempt,
        occurred_at=datetime(2026, 11, 3, tzinfo=UTC),
    )


def test_hook_byok_recorded_calls_reads_the_ledger_by_run_id(stack: DemoStack) -> None:
    ledger = stack.app.ledger
    ledger.record(_record("r-1:a:1", "acme", "r-1", "a", 1))
    ledger.record(_record("r-1:a:2", "acme", "r-1", "a", 2))
    ledger.record(_record("r-1:b:1", "beta", "r-1", "b", 1))
    ledger.record(_record("r-1:x:a:1", "acme", "r-1:x", "a", 1))  # another run, same prefix
    calls = stack.pm.hook.byok_recorded_calls(run_id="r-1")
    assert calls == (
        RecordedCall("r-1:a:1", "acme", "a", 1),
        RecordedCall("r-1:a:2", "acme", "a", 2),
        RecordedCall("r-1:b:1", "beta", "b", 1),
    )
    assert stack.pm.hook.byok_recorded_calls(run_id="r-2") == ()


def test_a_generated_or_new_run_id_runs(stack: DemoStack) -> None:
    assert _run(stack, run_id=None).ok
    fresh = _run(stack, run_id="order-1042")
    assert fresh.ok, fresh.error
    assert fresh.run_id == "order-1042"
    assert len(_ledger_keys(stack, "order-1042")) == 2


def test_a_reused_run_id_is_refused_before_any_call(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    first = _run(stack, run_id="order-1042")
    assert first.ok, first.error
    calls_before = len(_model_calls(emulator))
    with pytest.raises(RunIdInUse) as refused:
        _run(stack, run_id="order-1042")
    message = str(refused.value)
    assert "'order-1042'" in message
    assert f"{BYOK_WORKSPACE!r}" in message
    assert "2 recorded calls" in message
    assert "replay" in message
    assert len(_model_calls(emulator)) == calls_before  # no key was used
    assert len(_ledger_keys(stack, "order-1042")) == 2


def test_a_run_id_of_another_workspace_is_refused_even_to_replay(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    first = _run(stack, run_id="shared-id")
    assert first.ok, first.error
    calls_before = len(_model_calls(emulator))
    foreign = dataclasses.replace(first, workspace_id=PLATFORM_WORKSPACE)
    for replay in (None, foreign):
        with pytest.raises(RunIdInUse) as refused:
            _run(stack, run_id="shared-id", workspace=PLATFORM_WORKSPACE, replay=replay)
        assert "another workspace" in str(refused.value)
        assert BYOK_WORKSPACE not in str(refused.value)  # never names the other tenant
    assert len(_model_calls(emulator)) == calls_before


def test_a_replay_makes_no_completed_call_again_and_finishes_the_run(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    # the second block's provider answers garbage until the fault is cleared: the run fails
    # after the first block's call completed (and was recorded)
    emulator.add_fault(Fault(FaultKind.MALFORMED_JSON, provider="anthropic", times=None))
    first = _run(stack, run_id="order-7")
    assert not first.ok
    assert first.blocks["first"].status is BlockStatus.COMPLETED
    assert first.blocks["second"].status is BlockStatus.FAILED
    # the garbage came with a 200: the provider executed each try, recorded uncertain (uncharged)
    uncertain = ["order-7:second:1:uncertain:0", "order-7:second:2:uncertain:0"]
    assert _ledger_keys(stack, "order-7") == ["order-7:first:1", *uncertain]
    emulator.state.clear_faults()
    openai_before = len([c for c in _model_calls(emulator) if c.provider == "openai"])

    replayed = _run(stack, run_id="order-7", replay=first)
    assert replayed.ok, replayed.error
    openai_after = len([c for c in _model_calls(emulator) if c.provider == "openai"])
    assert openai_after == openai_before  # the completed call was not made again
    assert replayed.blocks["first"] == first.blocks["first"]
    assert replayed.outputs["result"]
    # the second block runs under the attempt after those recorded
    assert sorted(_ledger_keys(stack, "order-7")) == sorted(
        ["order-7:first:1", *uncertain, "order-7:second:3"]
    )
    # the table of the run adds up to what the ledger holds for it
    rows = [r for r in stack.app.ledger.rows() if r.run_id == "order-7"]
    assert replayed.total_charge == sum((r.amount for r in rows), Decimal(0))


def test_a_replayed_block_without_its_result_is_called_under_a_new_attempt(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    first = _run(stack, run_id="order-8")
    assert first.ok, first.error
    # a host that lost the second block's result (it crashed while saving it, say)
    lost = BlockResult("second", "agent", BlockStatus.FAILED, error="lost")
    partial = dataclasses.replace(first, blocks={**first.blocks, "second": lost})
    calls_before = len(_model_calls(emulator))
    replayed = _run(stack, run_id="order-8", replay=partial)
    assert replayed.ok, replayed.error
    assert len(_model_calls(emulator)) == calls_before + 1  # only the second block again
    assert replayed.blocks["second"].calls[0].attempt == 2
    # every call made is in the ledger: none was swallowed as a duplicate
    assert sorted(_ledger_keys(stack, "order-8")) == [
        "order-8:first:1",
        "order-8:second:1",
        "order-8:second:2",
    ]


def test_a_replay_of_another_run_or_without_a_run_id_is_a_mistake(stack: DemoStack) -> None:
    first = _run(stack, run_id="order-9")
    with pytest.raises(ValueError, match="same run id"):
        _run(stack, run_id="order-10", replay=first)
    with pytest.raises(ValueError, match="needs the run_id"):
        _run(stack, run_id=None, replay=first)


def test_byok_run_refuses_a_reused_run_id_and_replays_from_its_json(
    stack: DemoStack, tmp_path: Path, emulator: EmulatorServer
) -> None:
    flow = tmp_path / "two-steps.json"
    flow.write_text(json.dumps(DOCUMENT), encoding="utf-8")
    args = ["run", str(flow), "-w", BYOK_WORKSPACE, "-i", "topic=x", "--run-id", "cli-1"]
    runner = CliRunner()
    emulator.add_fault(Fault(FaultKind.MALFORMED_JSON, provider="anthropic", times=None))
    failed = runner.invoke(main, [*args, "--json"], env=stack.environ)
    assert failed.exit_code == 1, failed.output
    earlier = tmp_path / "earlier.json"
    earlier.write_text(failed.stdout, encoding="utf-8")
    emulator.state.clear_faults()

    again = runner.invoke(main, args, env=stack.environ)
    assert again.exit_code == 2, again.output
    # the first block's call, and the second's two tries answered with garbage (uncertain)
    assert "'cli-1' already has 3 recorded calls" in again.output
    assert "Traceback" not in again.output

    openai_before = len([c for c in _model_calls(emulator) if c.provider == "openai"])
    replayed = runner.invoke(main, [*args, "--replay", str(earlier), "--json"], env=stack.environ)
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout)["status"] == "completed"
    assert len([c for c in _model_calls(emulator) if c.provider == "openai"]) == openai_before
    assert sorted(_ledger_keys(stack, "cli-1")) == [
        "cli-1:first:1",
        "cli-1:second:1:uncertain:0",
        "cli-1:second:2:uncertain:0",
        "cli-1:second:3",
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json", "$: not valid JSON"),
        ('{"blocks": [{"block": "first", "calls": []}]}', "$.blocks[0]: 'type' is missing"),
        (
            '{"blocks": [{"block": "a", "calls": [], "type": "agent", "status": "done"}]}',
            "$.blocks[0]: not what",
        ),
        ("[]", "$: not what `byok run --json` writes"),
    ],
)
def test_byok_run_names_what_is_wrong_in_a_replay_file(
    tmp_path: Path, content: str, expected: str
) -> None:
    flow = tmp_path / "two-steps.json"
    flow.write_text(json.dumps(DOCUMENT), encoding="utf-8")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(content, encoding="utf-8")
    env = {"BYOK_HOME": str(tmp_path / "home")}
    base = ["run", str(flow), "-w", "acme", "-i", "topic=x", "--replay", str(earlier)]
    result = CliRunner().invoke(main, [*base, "--run-id", "r-1"], env=env)
    assert result.exit_code == 2, result.output
    assert f"{earlier}: {expected}" in result.output
    assert "Traceback" not in result.output
    without_id = CliRunner().invoke(main, base, env=env)
    assert without_id.exit_code == 2
    assert "give the --run-id of the run to replay" in without_id.output


def test_a_replayed_block_whose_calls_the_ledger_lacks_is_called_again(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    # the result of another run, passed off as this one's: its calls are not in this ledger
    other = _run(stack, run_id="elsewhere")
    assert other.ok, other.error
    _run(stack, run_id="order-11")
    forged = dataclasses.replace(other, run_id="order-11")
    calls_before = len(_model_calls(emulator))
    replayed = _run(stack, run_id="order-11", replay=forged)
    assert replayed.ok, replayed.error
    assert len(_model_calls(emulator)) == calls_before + 2  # both blocks called again
    assert {c.idempotency_key for c in replayed.calls} == {
        "order-11:first:2",
        "order-11:second:2",
    }
    assert len(_ledger_keys(stack, "order-11")) == 4


def test_a_run_id_in_flight_is_refused_to_another_run_in_any_workspace(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    # two tenants chose the same run id: while the first run is in flight, the second is refused
    # before any call (its calls would share the first's idempotency keys, ledger and holds)
    from byok_plugin.host.providers import NO_RETRY, create_clients, new_http_client
    from byok_plugin.host.runner import RunnerOptions, WorkflowRunner

    stack.app.budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="100")
    emulator.add_fault(Fault(FaultKind.SLOW, provider="openai", delay=1.0, times=1))

    def held() -> bool:
        budget = stack.app.budgets.get(PLATFORM_WORKSPACE, "monthly")
        return budget is not None and budget.reserved > 0

    async def go() -> tuple[RunResult, BaseException | RunResult]:
        async with new_http_client() as http:
            clients = create_clients(http, environ=stack.environ, retry=NO_RETRY)
            runner = WorkflowRunner(
                stack.pm, clients, environ=stack.environ, options=RunnerOptions(block_retries=0)
            )
            try:
                first = asyncio.create_task(
                    runner.run(
                        _workflow(),
                        actor=OPERATOR,
                        workspace_id=PLATFORM_WORKSPACE,
                        inputs=INPUTS,
                        run_id="nightly",
                    )
                )
                while not held():  # the first run's first call is in flight, nothing recorded
                    await asyncio.sleep(0.01)
                assert _ledger_keys(stack, "nightly") == []
                try:
                    second: BaseException | RunResult = await runner.run(
                        _workflow(),
                        actor=OPERATOR,
                        workspace_id="initech",
                        inputs=INPUTS,
                        run_id="nightly",
                    )
                except RunIdInUse as exc:
                    second = exc
                return await first, second
            finally:
                await runner.drain()

    first, second = asyncio.run(go())
    assert isinstance(second, RunIdInUse), second
    assert "'nightly' is in use by a run still in flight" in str(second)
    assert first.ok, first.error
    assert len(_model_calls(emulator)) == 2  # the first run's two calls, none of the second's
    rows = [r for r in stack.app.ledger.rows() if r.run_id == "nightly"]
    assert {r.workspace_id for r in rows} == {PLATFORM_WORKSPACE}
    budget = stack.app.budgets.get(PLATFORM_WORKSPACE, "monthly")
    assert budget is not None
    assert budget.spent >= sum((r.amount for r in rows), Decimal(0)) > 0
    assert budget.reserved == 0
    # once it has finished, the id is the first workspace's: still refused to the other
    with pytest.raises(RunIdInUse, match="another workspace"):
        _run(stack, run_id="nightly", workspace="initech")


def test_a_run_id_too_long_for_the_ledger_is_refused_before_any_call(
    stack: DemoStack, emulator: EmulatorServer, tmp_path: Path
) -> None:
    from byok_plugin.host.runner import RunIdInvalid

    for bad in ("r" * 260, "r" * 151, "bad\nid", ""):
        with pytest.raises(RunIdInvalid):
            _run(stack, run_id=bad)
    assert _model_calls(emulator) == []
    # the longest accepted id records every call under it
    longest = "r" * 150
    done = _run(stack, run_id=longest)
    assert done.ok, done.error
    assert len(_ledger_keys(stack, longest)) == 2
    flow = tmp_path / "two-steps.json"
    flow.write_text(json.dumps(DOCUMENT), encoding="utf-8")
    refused = CliRunner().invoke(
        main,
        ["run", str(flow), "-w", BYOK_WORKSPACE, "-i", "topic=x", "--run-id", "r" * 260],
        env=stack.environ,
    )
    assert refused.exit_code == 2, refused.output
    assert "--run-id: a run id has at most 150 characters" in refused.output
    assert "Traceback" not in refused.output
    assert len(_model_calls(emulator)) == 2
