"""A provider client does not blindly retry, on the platform's key, a request the provider may
have executed (a read timeout after the body was sent, a connection reset while the answer came):
each execution is the platform's to pay. Through the real plugin, the runner and the clients,
against a loopback server that counts the requests it received (each one an execution). On a
workspace key, and before anything was sent or after a received 5xx, the client's retries stay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from byok_hookspecs import CredentialSource
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.emulator.server import BackgroundServer
from byok_plugin.host.providers import RetryPolicy, create_clients, new_http_client
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
ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hello"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 12, "output_tokens": 2},
}
ATTEMPTS = 3


class CountingProvider:
    """An Anthropic endpoint that counts each request it receives and answers as ``kind`` says:
    ``timeout`` (answers too late), ``reset`` (drops the connection mid-answer), ``server_error``
    (a 500 on all but the last attempt)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.executions = 0

    async def messages(self, request: Request) -> Response:
        await request.body()
        self.executions += 1
        if self.kind == "timeout":
            await asyncio.sleep(2)
        elif self.kind == "reset":

            async def broken() -> AsyncIterator[bytes]:
                yield b'{"id": "msg_1", "type": "mess'
                raise RuntimeError("the connection drops here")

            return StreamingResponse(broken(), media_type="application/json")
        elif self.kind == "server_error" and self.executions < ATTEMPTS:
            return JSONResponse({"type": "error", "error": {"type": "api_error"}}, status_code=500)
        return Response(json.dumps(ANSWER), media_type="application/json")


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator)
    built.store_workspace_keys(BYOK_WORKSPACE, providers=("anthropic",))
    yield built
    built.close()


def run(stack: DemoStack, workspace: str, base_url: str, waits: list[float]) -> RunResult:
    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    async def go() -> RunResult:
        async with new_http_client() as http:
            clients = create_clients(
                http,
                environ=stack.environ,
                base_urls={"anthropic": base_url},
                retry=RetryPolicy(max_attempts=ATTEMPTS, sleep=no_wait),
                timeout=0.3,
            )
            runner = WorkflowRunner(
                stack.pm, clients, environ=stack.environ, options=RunnerOptions(block_retries=0)
            )
            try:
                return await runner.run(ONE_CALL, actor=OPERATOR, workspace_id=workspace, inputs={})
            finally:
                await runner.drain()

    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["timeout", "reset"])
def test_a_maybe_executed_request_on_the_platform_key_is_sent_once(
    stack: DemoStack, kind: str
) -> None:
    provider = CountingProvider(kind)
    app = Starlette(routes=[Route("/v1/messages", provider.messages, methods=["POST"])])
    waits: list[float] = []
    with BackgroundServer(app) as server:
        result = run(stack, PLATFORM_WORKSPACE, server.url, waits)
    assert not result.ok
    assert provider.executions == 1
    assert waits == []
    (row,) = stack.app.ledger.rows()
    assert (row.status, row.source, row.amount) == ("uncertain", CredentialSource.PLATFORM, 0)


@pytest.mark.parametrize("kind", ["timeout", "reset"])
def test_on_the_workspace_key_the_client_still_retries(stack: DemoStack, kind: str) -> None:
    provider = CountingProvider(kind)
    app = Starlette(routes=[Route("/v1/messages", provider.messages, methods=["POST"])])
    waits: list[float] = []
    with BackgroundServer(app) as server:
        result = run(stack, BYOK_WORKSPACE, server.url, waits)
    assert not result.ok
    assert provider.executions == ATTEMPTS  # the workspace pays its own retries, as before
    assert len(waits) == ATTEMPTS - 1


def test_a_received_5xx_on_the_platform_key_is_still_retried(stack: DemoStack) -> None:
    provider = CountingProvider("server_error")
    app = Starlette(routes=[Route("/v1/messages", provider.messages, methods=["POST"])])
    waits: list[float] = []
    with BackgroundServer(app) as server:
        result = run(stack, PLATFORM_WORKSPACE, server.url, waits)
    assert result.ok, result.error
    assert provider.executions == ATTEMPTS
    (row,) = stack.app.ledger.rows()
    assert (row.status, row.input_tokens, row.output_tokens) == ("complete", 12, 2)


def test_a_refused_connection_on_the_platform_key_is_still_retried(stack: DemoStack) -> None:
    waits: list[float] = []
    result = run(stack, PLATFORM_WORKSPACE, "http://127.0.0.1:9", waits)
    assert not result.ok
    assert len(waits) == ATTEMPTS - 1  # nothing was sent: trying again is safe
    assert list(stack.app.ledger.rows()) == []
