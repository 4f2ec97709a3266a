"""Calls that did not finish but that the provider may bill, through the real plugin (its ledger on
a SQLite file), the runner and the emulator over loopback HTTP:

- a stream cut after it started leaves one row, under the key the completed call would have had,
  flagged ``interrupted``, with what the provider is known to bill: charged on a platform key,
  $0 on the workspace's own key with its list cost kept;
- a request sent and never answered (a read timeout) leaves an ``uncertain`` row, not charged,
  and a platform-key call is not tried again blindly;
- a refused connection (the provider never saw the request) leaves no row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from byok_hookspecs import CredentialSource
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from byok_plugin.cli.demo import BYOK_WORKSPACE, OPERATOR, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.emulator.server import BackgroundServer
from byok_plugin.host.providers import NO_RETRY, create_clients, new_http_client
from byok_plugin.host.run_result import RunResult
from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
from byok_plugin.host.workflow import parse_workflow

ONE_CALL = parse_workflow(
    {
        "name": "one",
        "version": "1",
        "blocks": {"a": {"type": "agent", "model": "claude-sonnet-4-5", "prompt": "Say hello"}},
    }
)


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def run(
    stack: DemoStack,
    workspace: str,
    *,
    stream: bool,
    retries: int = 1,
    timeout: float | None = None,
    base_urls: dict[str, str] | None = None,
) -> RunResult:
    async def go() -> RunResult:
        async with new_http_client() as http:
            clients = create_clients(
                http,
                environ=stack.environ,
                base_urls=base_urls,
                retry=NO_RETRY,
                timeout=timeout,
            )
            runner = WorkflowRunner(
                stack.pm,
                clients,
                environ=stack.environ,
                options=RunnerOptions(block_retries=retries),
            )
            try:
                return await runner.run(
                    ONE_CALL, actor=OPERATOR, workspace_id=workspace, inputs={}, stream=stream
                )
            finally:
                await runner.drain()

    return asyncio.run(go())


def rows(stack: DemoStack):
    return sorted(stack.app.ledger.rows(), key=lambda r: r.idempotency_key)


def test_a_cut_platform_stream_is_recorded_once_interrupted_and_charged(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    emulator.add_fault(Fault(FaultKind.TRUNCATED_STREAM, provider="anthropic", times=1))
    result = run(stack, PLATFORM_WORKSPACE, stream=True)
    assert result.ok, result.error
    assert result.blocks["a"].attempts == 2
    cut, done = rows(stack)
    assert cut.idempotency_key == f"{result.run_id}:a:1"
    assert done.idempotency_key == f"{result.run_id}:a:2"
    assert (cut.status, done.status) == ("interrupted", "complete")
    assert cut.source is CredentialSource.PLATFORM
    # message_start reported the input before the cut: the same prompt, the same input
    assert cut.input_tokens == done.input_tokens > 0
    assert 0 < cut.output_tokens <= done.output_tokens
    # charged like any platform call: 3 and 15 USD per 1M tokens (claude-sonnet-4-5)
    expected = (Decimal(3) * cut.input_tokens + Decimal(15) * cut.output_tokens) / 1_000_000
    assert cut.amount == cut.list_cost == expected > 0
    assert cut.reason == "platform"


def test_a_cut_stream_on_the_workspace_key_costs_nothing_and_keeps_its_list_cost(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    emulator.add_fault(Fault(FaultKind.TRUNCATED_STREAM, provider="anthropic", times=None))
    result = run(stack, BYOK_WORKSPACE, stream=True, retries=0)
    assert not result.ok
    (cut,) = rows(stack)
    assert cut.status == "interrupted"
    assert cut.source is CredentialSource.WORKSPACE
    assert cut.amount == 0
    assert cut.list_cost is not None
    assert cut.list_cost > 0
    assert cut.reason == "byok"


def test_a_read_timeout_on_the_platform_key_is_uncertain_and_not_retried(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    emulator.add_fault(Fault(FaultKind.SLOW, provider="anthropic", delay=1.0, times=None))
    result = run(stack, PLATFORM_WORKSPACE, stream=False, retries=2, timeout=0.2)
    assert not result.ok
    block = result.blocks["a"]
    assert block.attempts == 1  # not tried again on the platform's key
    assert "recorded 'uncertain'" in (block.error or "")
    (row,) = rows(stack)
    assert (row.status, row.amount, row.reason) == ("uncertain", Decimal(0), "uncertain")
    assert row.source is CredentialSource.PLATFORM
    assert row.idempotency_key == f"{result.run_id}:a:1:uncertain:0"


def test_a_refused_connection_leaves_no_row(stack: DemoStack, emulator: EmulatorServer) -> None:
    result = run(
        stack,
        PLATFORM_WORKSPACE,
        stream=False,
        retries=1,
        base_urls={"anthropic": "http://127.0.0.1:9"},
    )
    assert not result.ok
    assert result.blocks["a"].attempts == 2  # nothing was sent: trying again is safe
    assert rows(stack) == []


# --- on_error: a workspace key that fails after the client's own retries -------------------------


@pytest.mark.parametrize("kind", ["server_error", "timeout"])
@pytest.mark.parametrize("policy", ["never", "on_rate_limit", "on_error"])
def test_the_fallback_policy_decides_after_a_5xx_or_a_timeout_on_the_workspace_key(
    stack: DemoStack, emulator: EmulatorServer, policy: str, kind: str
) -> None:
    workspace_key = stack.workspace_keys["anthropic"]
    if kind == "server_error":
        emulator.add_fault(Fault.for_key(FaultKind.SERVER_ERROR, workspace_key, times=None))
    else:
        emulator.add_fault(Fault.for_key(FaultKind.SLOW, workspace_key, delay=1.0, times=None))
    stack.set_fallback_policy(BYOK_WORKSPACE, policy)
    result = run(stack, BYOK_WORKSPACE, stream=False, retries=0, timeout=0.3)
    recorded = rows(stack)
    # a timeout may have been executed by the provider: its row says so, uncharged
    uncertain = [r for r in recorded if r.status == "uncertain"]
    assert [(r.source, r.amount) for r in uncertain] == (
        [(CredentialSource.WORKSPACE, Decimal(0))] if kind == "timeout" else []
    )
    completed = [r for r in recorded if r.status == "complete"]
    if policy == "on_error":
        assert result.ok, result.error
        (call,) = result.calls
        assert (call.source, call.fallback) == (CredentialSource.PLATFORM, True)
        (row,) = completed
        assert row.idempotency_key == f"{result.run_id}:a:1"
        assert (row.source, row.fallback) == (CredentialSource.PLATFORM, True)
        assert row.amount > 0
        served = [c.key_label for c in emulator.calls("anthropic")]
        assert "platform-anthropic" in served
    else:
        assert not result.ok
        error = result.blocks["a"].error or ""
        assert ("server error" if kind == "server_error" else "timeout") in error, error
        assert completed == []
        assert all(c.key_label != "platform-anthropic" for c in emulator.calls("anthropic"))


# --- a run cancelled while the provider streams ---------------------------------------------------


async def _stalling_stream(request: Request) -> StreamingResponse:
    """An Anthropic stream that starts (input reported, two deltas) and then stalls."""

    async def events():
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "model": "claude-sonnet-4-5",
                "usage": {"input_tokens": 120, "output_tokens": 1},
            },
        }
        yield f"event: message_start\ndata: {json.dumps(start)}\n\n".encode()
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}
        yield f"event: content_block_start\ndata: {json.dumps(block)}\n\n".encode()
        for text in ("Hello", " there"):
            delta = {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": text},
            }
            yield f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n".encode()
        await asyncio.sleep(30)  # the run is cancelled meanwhile; the client disconnects

    return StreamingResponse(events(), media_type="text/event-stream")


def test_a_run_cancelled_mid_stream_records_what_was_streamed(stack: DemoStack) -> None:
    app = Starlette(routes=[Route("/v1/messages", _stalling_stream, methods=["POST"])])
    with BackgroundServer(app) as server:

        async def go() -> None:
            async with new_http_client() as http:
                clients = create_clients(
                    http,
                    environ=stack.environ,
                    base_urls={"anthropic": server.url},
                    retry=NO_RETRY,
                )
                runner = WorkflowRunner(
                    stack.pm,
                    clients,
                    environ=stack.environ,
                    options=RunnerOptions(block_retries=0),
                )
                streaming = asyncio.Event()
                texts: list[object] = []

                def on_event(event) -> None:
                    # cancelled once both deltas are in (after the first only, the count the
                    # row is checked against would depend on the scheduler)
                    if event.kind == "text":
                        texts.append(event)
                        if len(texts) == 2:
                            streaming.set()

                task = asyncio.create_task(
                    runner.run(
                        ONE_CALL,
                        actor=OPERATOR,
                        workspace_id=PLATFORM_WORKSPACE,
                        inputs={},
                        stream=True,
                        on_event=on_event,
                    )
                )
                await streaming.wait()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await runner.drain()

        asyncio.run(go())
    (row,) = rows(stack)
    assert row.status == "interrupted"
    assert row.source is CredentialSource.PLATFORM
    assert (row.input_tokens, row.output_tokens) == (120, 2)  # two deltas received
    assert row.amount == (Decimal(3) * 120 + Decimal(15) * 2) / 1_000_000
