"""Every sample workflow, end to end, streamed and not, through the real plugin (key store,
resolution, billing, ledger) over real HTTP against the emulator:

- for a BYOK workspace: charged 0, source workspace, the emulator saw the workspace's keys;
- for a platform workspace: charged > 0, exactly the shipped price table's amount, the emulator saw
  platform keys;

and the failure paths with the real fallback policy and ledger: a refused BYOK key under ``never``
and ``on_error``, a retried block charged once, a failed block charged nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from byok_hookspecs import CredentialSource, Usage

from byok_plugin.cli.demo import BYOK_WORKSPACE, DEMO_INPUTS, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.run_result import BlockStatus, RunResult, RunStatus
from byok_plugin.host.workflow import load_workflow, parse_workflow

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "sample_workflows").glob("*.json"))
PRICES = json.loads(
    (ROOT / "byok_plugin" / "data" / "prices.json").read_text(), parse_float=Decimal
)
MILLION = Decimal(1_000_000)


def list_price(usage: Usage) -> Decimal:
    """The call's cost, computed here from the raw shipped price file (not through the plugin)."""
    entry = PRICES["models"][f"{usage.provider}/{usage.model}"]
    if usage.tool_requests:
        if usage.reported_cost is not None and entry.get("reported_cost"):
            return usage.reported_cost
        return entry["per_request"] * usage.tool_requests
    rate_in = entry["input"]
    total = (
        usage.input_tokens * rate_in
        + usage.cached_input_tokens * entry.get("cached_input", rate_in)
        + usage.cache_write_tokens * entry.get("cache_write", rate_in)
        + usage.output_tokens * entry["output"]
        + usage.reasoning_tokens * entry.get("reasoning", entry["output"])
    )
    return total / MILLION


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


@pytest.fixture
def db_stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    """A stack on a real SQLite file, and on a real PostgreSQL database."""
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def inputs_for(path: Path) -> dict[str, Any]:
    return dict(DEMO_INPUTS[path.stem])


def model_calls(emulator: EmulatorServer) -> list[Any]:
    return [c for c in emulator.calls() if c.method == "POST"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_a_sample_on_byok_keys_is_charged_nothing(
    stack: DemoStack, path: Path, stream: bool
) -> None:
    workflow = load_workflow(path)
    stack.store_labelled_keys(workflow)
    result = stack.run(workflow, BYOK_WORKSPACE, inputs_for(path), stream=stream)
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.calls
    for block in result.blocks.values():
        for call in block.calls:
            # the translate block names the stored key labelled "localization": a workspace key
            assert call.source is CredentialSource.WORKSPACE, block.block_id
            assert call.charge.amount == Decimal(0)
            assert call.charge.list_cost == list_price(call.usage) > 0
            assert call.streamed is (stream and call.provider != "exa")
    assert result.total_charge == Decimal(0)
    # the ledger holds exactly these calls, charged nothing
    rows = [
        r for r in stack.app.ledger.rows(workspaces=[BYOK_WORKSPACE]) if r.run_id == result.run_id
    ]
    assert sorted(r.idempotency_key for r in rows) == sorted(
        c.idempotency_key for c in result.calls
    )
    assert all(r.amount == 0 for r in rows)
    # and the providers received the workspace's own keys (the labelled one for its block)
    seen = model_calls(stack.emulator)
    assert len(seen) == len(result.calls)
    labels = {c.key_label for c in seen}
    assert all(
        label.startswith(f"{BYOK_WORKSPACE}-") or label == "block-localization" for label in labels
    ), labels
    for call in seen:
        if call.provider != "exa":
            assert call.stream is stream


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_a_sample_on_platform_keys_is_charged_the_price_table(
    stack: DemoStack, path: Path, stream: bool
) -> None:
    workflow = load_workflow(path)
    labelled = stack.store_labelled_keys(workflow)
    result = stack.run(workflow, PLATFORM_WORKSPACE, inputs_for(path), stream=stream)
    assert result.status is RunStatus.COMPLETED, result.error
    platform_calls = [c for c in result.calls if c.source is CredentialSource.PLATFORM]
    assert platform_calls
    expected_total = Decimal(0)
    for call in result.calls:
        if call.source is CredentialSource.WORKSPACE:  # the key the block names by label
            assert (call.provider, "localization") in labelled
            assert call.charge.amount == 0
            assert call.charge.list_cost == list_price(call.usage) > 0
            continue
        assert call.source is CredentialSource.PLATFORM
        assert call.charge.amount == list_price(call.usage) > 0
        assert call.charge.reason == "platform"
        expected_total += call.charge.amount
    assert result.total_charge == expected_total > 0
    rows = {r.idempotency_key: r for r in stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE])}
    assert set(rows) == {c.idempotency_key for c in result.calls}
    assert sum((r.amount for r in rows.values()), Decimal(0)) == expected_total
    seen = model_calls(stack.emulator)
    labels = {c.key_label for c in seen}
    assert labels <= {
        f"platform-{p}" for p in ("openai", "anthropic", "google", "mistral", "exa")
    } | {"block-localization"}
    assert any(label.startswith("platform-") for label in labels)
    assert not any(label.startswith(BYOK_WORKSPACE) for label in labels)


def test_the_same_run_costs_the_same_whoever_pays(stack: DemoStack) -> None:
    path = ROOT / "sample_workflows" / "multi-provider-comparison.json"
    workflow = load_workflow(path)
    byok = stack.run(workflow, BYOK_WORKSPACE, inputs_for(path))
    platform = stack.run(workflow, PLATFORM_WORKSPACE, inputs_for(path))
    assert byok.total_charge == 0
    assert byok.total_list_cost == platform.total_list_cost == platform.total_charge > 0


# --- a refused BYOK key, under the workspace's fallback policy ------------------------------------


ONE_BLOCK = {
    "name": "one-block",
    "version": "1",
    "blocks": {
        "answer": {"type": "agent", "model": "claude-haiku-4-5", "prompt": "Say hello."},
        "after": {
            "type": "agent",
            "model": "gpt-4o-mini",
            "prompt": "Rephrase: {{answer.content}}",
        },
    },
    "edges": [{"from": "answer", "to": "after"}],
}


def refuse_workspace_anthropic_key(stack: DemoStack) -> str:
    key = stack.workspace_keys["anthropic"]
    stack.emulator.state.remove_key("anthropic", key)
    return key


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_refused_byok_key_under_never_fails_the_block_and_never_touches_a_platform_key(
    db_stack: DemoStack, stream: bool
) -> None:
    key = refuse_workspace_anthropic_key(db_stack)
    result = db_stack.run(parse_workflow(ONE_BLOCK), BYOK_WORKSPACE, {}, stream=stream)
    assert result.status is RunStatus.FAILED
    answer = result.blocks["answer"]
    assert answer.status is BlockStatus.FAILED
    message = answer.error or ""
    assert f"workspace {BYOK_WORKSPACE!r}" in message
    assert "anthropic refused the workspace key" in message
    assert f"{key[:6]}...{key[-4:]}" in message
    assert "HTTP 401" in message
    assert key not in message
    assert result.blocks["after"].status is BlockStatus.SKIPPED
    # the emulator received the workspace key once, and no platform key at all
    seen = model_calls(db_stack.emulator)
    assert [c.key_label for c in seen] == [None]
    assert seen[0].used_key(key)
    assert list(db_stack.app.ledger.rows(workspaces=[BYOK_WORKSPACE])) == []


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_refused_byok_key_under_on_error_is_served_by_the_platform_and_the_ledger_says_so(
    db_stack: DemoStack, stream: bool
) -> None:
    refuse_workspace_anthropic_key(db_stack)
    db_stack.set_fallback_policy(BYOK_WORKSPACE, "on_error")
    result = db_stack.run(parse_workflow(ONE_BLOCK), BYOK_WORKSPACE, {}, stream=stream)
    assert result.ok, result.error
    (call,) = result.blocks["answer"].calls
    assert call.source is CredentialSource.PLATFORM
    assert call.fallback is True
    assert [(r.source, r.status) for r in call.rejected] == [(CredentialSource.WORKSPACE, 401)]
    assert call.charge.amount == list_price(call.usage) > 0
    row = db_stack.app.ledger.get(call.idempotency_key)
    assert row is not None
    assert row.source is CredentialSource.PLATFORM
    assert row.fallback is True
    assert row.amount == call.charge.amount
    # the next block is back on the workspace's own (OpenAI) key, charged nothing
    (after,) = result.blocks["after"].calls
    assert after.source is CredentialSource.WORKSPACE
    assert after.charge.amount == 0
    assert [c.key_label for c in model_calls(db_stack.emulator)] == [
        None,
        "platform-anthropic",
        f"{BYOK_WORKSPACE}-openai",
    ]


# --- retries and failures in the ledger -------------------------------------------------------


def test_a_retried_block_is_charged_once_in_the_ledger(db_stack: DemoStack) -> None:
    db_stack.emulator.add_fault(
        Fault.for_key(FaultKind.TRUNCATED_STREAM, db_stack.platform_keys["anthropic"], times=1)
    )
    result = db_stack.run(parse_workflow(ONE_BLOCK), PLATFORM_WORKSPACE, {}, stream=True)
    assert result.ok, result.error
    answer = result.blocks["answer"]
    assert answer.attempts == 2
    (call,) = answer.calls
    rows = [
        r
        for r in db_stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE])
        if r.block_id == "answer"
    ]
    # the completed call once; the cut first try once too, flagged, with what the provider billed
    cut, done = sorted(rows, key=lambda r: r.attempt)
    assert (done.idempotency_key, done.attempt, done.amount, done.status) == (
        call.idempotency_key,
        2,
        call.charge.amount,
        "complete",
    )
    assert (cut.attempt, cut.status) == (1, "interrupted")
    assert cut.idempotency_key == call.idempotency_key.removesuffix(":2") + ":1"
    assert 0 < cut.amount <= done.amount
    assert len(db_stack.emulator.calls("anthropic")) == 2


def test_a_rerun_under_the_same_run_id_is_refused_and_calls_nothing(db_stack: DemoStack) -> None:
    # before, the second execution called the platform's key and recorded nothing
    # (tests/test_run_ids.py covers the replay that finishes such a run)
    workflow = parse_workflow(ONE_BLOCK)

    async def twice() -> tuple[RunResult, int]:
        from byok_plugin.cli.context import OPERATOR
        from byok_plugin.host.runner import RunIdInUse, WorkflowRunner

        async with WorkflowRunner.open(db_stack.pm, environ=db_stack.environ) as runner:
            first = await runner.run(
                workflow, workspace_id=PLATFORM_WORKSPACE, run_id="run-1", actor=OPERATOR
            )
            calls = len(db_stack.emulator.calls())
            with pytest.raises(RunIdInUse, match="'run-1' already has 2 recorded calls"):
                await runner.run(
                    workflow, workspace_id=PLATFORM_WORKSPACE, run_id="run-1", actor=OPERATOR
                )
        return first, calls

    import asyncio

    first, calls = asyncio.run(twice())
    assert first.total_charge > 0
    assert len(db_stack.emulator.calls()) == calls
    rows = list(db_stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE]))
    assert len(rows) == 2
    assert sum((r.amount for r in rows), Decimal(0)) == first.total_charge


def test_a_failed_block_is_charged_nothing(db_stack: DemoStack) -> None:
    db_stack.emulator.add_fault(Fault(FaultKind.SERVER_ERROR, provider="openai", times=None))
    result = db_stack.run(parse_workflow(ONE_BLOCK), PLATFORM_WORKSPACE, {})
    assert result.status is RunStatus.FAILED
    assert result.blocks["answer"].status is BlockStatus.COMPLETED
    after = result.blocks["after"]
    assert after.status is BlockStatus.FAILED
    assert after.calls == ()
    rows = list(db_stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE]))
    assert [r.block_id for r in rows] == ["answer"]
    assert result.total_charge == rows[0].amount > 0


# --- the provider names the model differently in its reply ---------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(
    ("provider", "asked", "answered"),
    [
        # a dated snapshot the catalog does not list as an alias
        ("openai", "gpt-4o-mini", "gpt-4o-mini-2099-01-31"),
        ("anthropic", "claude-haiku-4-5", "claude-haiku-4-5-20991231"),
        # a version name no date rule maps back (Mistral answers -latest with the version)
        ("mistral", "mistral-large-latest", "mistral-large-2411"),
    ],
)
def test_a_platform_call_answered_under_another_model_name_is_charged_for_the_model_asked(
    db_stack: DemoStack, provider: str, asked: str, answered: str, stream: bool
) -> None:
    db_stack.emulator.state.answer_model_as(provider, asked, answered)
    workflow = parse_workflow(
        {
            "name": "renamed",
            "version": "1",
            "blocks": {"ask": {"type": "agent", "model": asked, "prompt": "Say hello."}},
        }
    )
    result = db_stack.run(workflow, PLATFORM_WORKSPACE, {}, stream=stream)
    assert result.status is RunStatus.COMPLETED, result.error
    block = result.blocks["ask"]
    assert block.output["model"] == answered  # the reply's name is kept for display
    (call,) = block.calls
    assert call.source is CredentialSource.PLATFORM
    assert call.usage.model == asked
    assert call.charge.reason == "platform"
    assert call.charge.amount == list_price(call.usage) > 0
    (row,) = [
        r
        for r in db_stack.app.ledger.rows(workspaces=[PLATFORM_WORKSPACE])
        if r.run_id == result.run_id
    ]
    assert (row.model, row.reason, row.amount) == (asked, "platform", call.charge.amount)
