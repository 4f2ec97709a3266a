"""Hostile (or broken) provider answers, over real HTTP on loopback: a scripted server in the test's
own event loop sends exactly the bytes each test gives it.

- a 2xx answer the client cannot read (nested deeper than Python recurses, larger than the client
  reads, of an unexpected shape) is a ``ProtocolError`` marked ``maybe_executed``: the provider ran
  the call, so the runner records it ``uncertain`` rather than failing with a traceback and no row;
- an answer body, a stream line, a stream event and a whole stream are read only up to a limit;
- an error body's ``message`` and ``code`` may be any JSON (vLLM sends ``"code": 400``): the error
  is still classified by its status, with text fields, redacted and bounded.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from byok_hookspecs import CredentialSource

from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.providers import (
    MODEL_PROVIDERS,
    NO_RETRY,
    AuthError,
    CompletionRequest,
    Message,
    ProtocolError,
    ProviderClient,
    ProviderError,
    RateLimitError,
    SearchRequest,
    ServerError,
    create_client,
    create_clients,
    new_http_client,
)
from byok_plugin.host.providers.anthropic import parse_message
from byok_plugin.host.providers.base import MAX_ANSWER_BYTES, MAX_ERROR_BODY_BYTES
from byok_plugin.host.providers.errors import MAX_MESSAGE_CHARS, error_text, redact_bounded
from byok_plugin.host.providers.sse import StreamTooLarge, iter_sse
from byok_plugin.host.run_result import RunResult
from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
from byok_plugin.host.workflow import parse_workflow

MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-sonnet-4-5",
    "google": "gemini-2.5-flash",
    "mistral": "mistral-small-latest",
}
KEY = "sk-" + "k" * 8 + secrets.token_urlsafe(24)
#: 100,000 levels of nesting, as the security review sent: json.loads raises RecursionError
DEEP = "[" * 100_000 + "]" * 100_000


# --- a scripted loopback server ---------------------------------------------------------------


class Scripted:
    """Answers every request with ``status``, ``headers`` and ``body``: sent in one piece with a
    ``content-length``, or, given ``chunks``, chunked (each chunk written and drained apart)."""

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        *,
        chunks: Sequence[bytes] | None = None,
        headers: Sequence[tuple[str, str]] = (("content-type", "application/json"),),
    ) -> None:
        self.status = status
        self.body = body
        self.chunks = chunks
        self.headers = list(headers)
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            self.requests += 1
            lines = [f"HTTP/1.1 {self.status} Whatever", *(f"{k}: {v}" for k, v in self.headers)]
            names = {k.lower() for k, _ in self.headers}
            if self.chunks is None and "content-length" not in names:
                lines.append(f"content-length: {len(self.body)}")
            elif self.chunks is not None:
                lines.append("transfer-encoding: chunked")
            writer.write(("\r\n".join([*lines, "connection: close"]) + "\r\n\r\n").encode())
            if self.chunks is None:
                writer.write(self.body)
            else:
                for chunk in self.chunks:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up (on purpose: an answer too large)
        finally:
            writer.close()


async def against(scripted: Scripted, fn: Callable[[str], Awaitable[Any]]) -> Any:
    """``fn(base_url)`` while ``scripted`` serves on a free loopback port."""
    server = await asyncio.start_server(scripted.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await fn(f"http://127.0.0.1:{port}")


def request(provider: str) -> CompletionRequest:
    return CompletionRequest(model=MODELS[provider], messages=(Message("user", "Say hello"),))


def call(scripted: Scripted, provider: str, *, stream: bool = False, **client_options: Any) -> Any:
    """One call of ``provider``'s client (no retries) against ``scripted``."""

    async def go(base_url: str) -> Any:
        async with new_http_client() as http:
            client: ProviderClient = type(create_client(provider, http))(
                http, base_url=base_url, retry=NO_RETRY, **client_options
            )
            if provider == "exa":
                return await client.search(SearchRequest("q"), api_key=KEY)  # type: ignore[attr-defined]
            if stream:
                return await client.complete_streamed(request(provider), api_key=KEY)
            return await client.complete(request(provider), api_key=KEY)

    return asyncio.run(against(scripted, go))


def failure(scripted: Scripted, provider: str, **options: Any) -> ProviderError:
    """The provider error of a call (any other exception fails the test, as it is)."""
    with pytest.raises(ProviderError) as info:
        call(scripted, provider, **options)
    return info.value


def sse(*events: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


# --- (2) deep nesting: read, never a RecursionError ---------------------------------------------


@pytest.mark.parametrize("provider", [*MODEL_PROVIDERS, "exa"])
def test_a_2xx_answer_nested_too_deep_is_a_protocol_error_the_provider_executed(provider):
    body = '{"id":"x","usage":{"prompt_tokens":1},"extra":' + DEEP + "}"
    error = failure(Scripted(200, body.encode()), provider)
    assert isinstance(error, ProtocolError), repr(error)
    assert error.maybe_executed
    assert error.status == 200
    assert "nested deeper than it can be read" in str(error)


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
def test_a_stream_event_nested_too_deep_is_a_protocol_error_the_provider_executed(provider):
    chunks = [b'data: {"x":' + DEEP.encode() + b"}\n\n"]
    error = failure(
        Scripted(200, chunks=chunks, headers=[("content-type", "text/event-stream")]),
        provider,
        stream=True,
    )
    assert isinstance(error, ProtocolError), repr(error)
    assert error.maybe_executed
    assert "nested deeper than it can be read" in str(error)


@pytest.mark.parametrize("provider", [*MODEL_PROVIDERS, "exa"])
def test_an_error_body_nested_too_deep_is_still_classified_by_its_status(provider):
    error = failure(Scripted(401, b'{"error":' + DEEP.encode() + b"}"), provider)
    assert isinstance(error, AuthError), repr(error)
    assert error.status == 401
    assert len(error.message) <= 301  # the body's start, bounded (and no traceback)


def test_tool_arguments_nested_deeper_than_the_encoder_goes_are_a_protocol_error():
    deep: Any = {}
    for _ in range(5000):  # decoded already (as json.loads may still manage): encoding recurses
        deep = {"a": deep}
    payload = {
        "model": "claude-sonnet-4-5",
        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": deep}],
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    with pytest.raises(ProtocolError, match="RecursionError") as info:
        parse_message(payload)
    assert info.value.maybe_executed


# --- any other unexpected shape of a 2xx answer -------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "event"),
    [
        ("openai", {"choices": [1]}),
        ("openai", {"choices": [{"delta": {"tool_calls": [{"index": "x"}]}}]}),
        ("mistral", {"choices": [{"delta": []}]}),
        ("anthropic", {"type": "content_block_start", "index": "x"}),
        ("anthropic", {"type": "content_block_delta", "delta": [1]}),
        ("anthropic", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": 5}}),
        ("google", {"candidates": [{"content": {"parts": ["text"]}}]}),
        ("google", {"candidates": [{"content": {"parts": [{"text": 5}]}}]}),
    ],
)
def test_a_stream_event_of_an_unexpected_shape_is_a_protocol_error(provider, event):
    scripted = Scripted(200, chunks=[sse(event)], headers=[("content-type", "text/event-stream")])
    error = failure(scripted, provider, stream=True)
    assert isinstance(error, ProtocolError), repr(error)
    assert error.maybe_executed
    assert error.partial_usage is None


def test_a_stream_whose_events_do_not_add_up_is_a_protocol_error_with_what_it_billed():
    start = {
        "type": "message_start",
        "message": {"id": "m", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 7}},
    }
    end = {"type": "message_delta", "delta": {"stop_reason": ["end_turn"]}, "usage": {}}
    chunks = [sse(start, end, {"type": "message_stop"})]
    error = failure(
        Scripted(200, chunks=chunks, headers=[("content-type", "text/event-stream")]),
        "anthropic",
        stream=True,
    )
    assert isinstance(error, ProtocolError), repr(error)
    assert "unexpected shape (TypeError" in str(error)
    assert error.maybe_executed
    assert error.partial_usage is not None
    assert error.partial_usage.input_tokens == 7


def test_a_usage_of_the_wrong_shape_in_a_broken_stream_leaves_no_partial_usage():
    """OpenAI's usage chunk is a list here: what the stream billed cannot be told, and asking
    does not replace the stream's own error."""
    chunks = [sse({"choices": [{"delta": {"content": "hi"}}], "usage": [1]}), b"data: {\n\n"]
    error = failure(
        Scripted(200, chunks=chunks, headers=[("content-type", "text/event-stream")]),
        "openai",
        stream=True,
    )
    assert isinstance(error, ProtocolError), repr(error)
    assert "not valid JSON" in str(error)
    assert error.partial_usage is None


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
def test_a_2xx_answer_that_is_not_json_was_executed(provider):
    error = failure(Scripted(200, b"<html>oops</html>"), provider)
    assert isinstance(error, ProtocolError), repr(error)
    assert error.maybe_executed


@pytest.mark.parametrize("provider", [*MODEL_PROVIDERS, "exa"])
def test_a_2xx_answer_of_an_unexpected_shape_was_executed(provider):
    error = failure(Scripted(200, b'{"choices": 5, "content": 5, "results": 5}'), provider)
    assert isinstance(error, ProtocolError), repr(error)
    assert error.maybe_executed


@pytest.mark.parametrize(
    ("provider", "body", "field"),
    [
        (
            "openai",
            {"choices": [{"message": {"content": 5}}], "usage": {}, "model": "m"},
            "CompletionResult.content",
        ),
        (
            "mistral",
            {"choices": [{"message": {"content": "hi"}}], "usage": {}, "model": ["m"]},
            "CompletionResult.model",
        ),
        (
            "anthropic",
            {"content": [{"type": "tool_use", "id": 1, "name": "f"}], "usage": {}},
            "ToolCall.id",
        ),
        ("google", {"usageMetadata": {}, "responseId": {"x": 1}}, "CompletionResult.response_id"),
        ("exa", {"results": [{"url": 5}]}, "SearchHit.url"),
    ],
)
def test_a_2xx_answer_with_a_number_or_a_list_for_text_is_refused_where_it_is_read(
    provider, body, field
):
    error = failure(Scripted(200, json.dumps(body).encode()), provider)
    assert isinstance(error, ProtocolError), repr(error)
    assert f"{field} must be a string" in str(error)
    assert error.maybe_executed


def test_a_stream_with_a_number_for_text_is_a_protocol_error():
    start = {
        "type": "message_start",
        "message": {"id": 7, "model": "claude-sonnet-4-5", "usage": {"input_tokens": 3}},
    }
    chunks = [sse(start, {"type": "message_delta", "delta": {}}, {"type": "message_stop"})]
    error = failure(
        Scripted(200, chunks=chunks, headers=[("content-type", "text/event-stream")]),
        "anthropic",
        stream=True,
    )
    assert isinstance(error, ProtocolError), repr(error)
    assert "CompletionResult.response_id must be a string" in str(error)
    assert error.partial_usage is not None  # the input message_start reported is billed


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
def test_a_model_listing_of_an_unexpected_shape(provider):
    field, key = ("models", "name") if provider == "google" else ("data", "id")

    def models(body: Any) -> Any:
        async def go(base_url: str) -> Any:
            async with new_http_client() as http:
                client = create_client(provider, http, base_url=base_url, retry=NO_RETRY)
                return await client.list_models(api_key=KEY)

        return asyncio.run(against(Scripted(200, json.dumps(body).encode()), go))

    assert models({field: [{key: 5}, "x", {key: "m1"}]}) == ["m1"]
    assert models({}) == []
    for body in ([1], {field: 5}):
        with pytest.raises(ProtocolError, match=f"the listing has no '{field}' list"):
            models(body)


# --- (7) answers larger than the client reads ---------------------------------------------------


def _answer(pad: int) -> bytes:
    return json.dumps(
        {
            "id": "x",
            "model": "gpt-4o-mini",
            "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            "pad": "A" * pad,
        }
    ).encode()


def test_an_answer_within_the_limit_is_read():
    result = call(Scripted(200, chunks=[_answer(1000)]), "openai", max_answer_bytes=4096)
    assert result.content == "hi"


@pytest.mark.parametrize("chunked", [False, True])
def test_an_answer_larger_than_the_limit_is_refused_as_executed(chunked):
    body = _answer(200_000)
    scripted = (
        Scripted(200, chunks=[body[i : i + 8192] for i in range(0, len(body), 8192)])
        if chunked
        else Scripted(200, body)
    )
    error = failure(scripted, "openai", max_answer_bytes=64 * 1024)
    assert isinstance(error, ProtocolError), repr(error)
    assert error.maybe_executed
    assert error.status == 200
    assert f"larger than {64 * 1024} bytes" in str(error)


def test_the_limit_applies_to_the_decoded_answer():
    """A compressed answer is small on the wire: what counts is what it decodes to."""
    body = gzip.compress(_answer(10_000_000))
    assert len(body) < 64 * 1024
    scripted = Scripted(
        200, body, headers=[("content-type", "application/json"), ("content-encoding", "gzip")]
    )
    error = failure(scripted, "openai", max_answer_bytes=64 * 1024)
    assert isinstance(error, ProtocolError), repr(error)
    assert "larger than" in str(error)


def test_an_answer_declared_larger_than_the_default_limit_is_not_read():
    declared = MAX_ANSWER_BYTES + 1
    scripted = Scripted(
        200,
        b"{" * 1000,  # the rest never comes: the client does not wait for it
        headers=[("content-type", "application/json"), ("content-length", str(declared))],
    )
    error = failure(scripted, "anthropic")
    assert isinstance(error, ProtocolError), repr(error)
    assert f"larger than {MAX_ANSWER_BYTES} bytes" in str(error)


def test_a_large_error_body_is_read_only_in_part_and_still_classified():
    body = json.dumps({"error": {"message": "x" * (4 * MAX_ERROR_BODY_BYTES)}}).encode()
    error = failure(Scripted(401, chunks=[body]), "openai")
    assert isinstance(error, AuthError), repr(error)
    # the body was cut (so not JSON): its first characters stand for the message
    assert error.message.startswith('{"error": {"message": "xxx')
    assert len(error.message) <= 301


@pytest.mark.parametrize(
    ("what", "chunks"),
    [
        ("a line of the stream", [b"data: " + b"A" * 5000 for _ in range(20)]),
        ("an event of the stream", [b"data: " + b"A" * 5000 + b"\n" for _ in range(20)]),
        ("the stream", [sse({"choices": []}) * 100 for _ in range(300)]),
    ],
)
def test_a_stream_line_event_or_stream_larger_than_the_limit_is_refused(what, chunks):
    scripted = Scripted(200, chunks=chunks, headers=[("content-type", "text/event-stream")])
    error = failure(scripted, "openai", stream=True, max_answer_bytes=64 * 1024)
    assert isinstance(error, ProtocolError), repr(error)
    assert f"{what} is larger than" in str(error)
    assert error.maybe_executed


class Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def events(chunks: Sequence[bytes], **limits: int) -> list[tuple[str, str]]:
    async def go() -> list[tuple[str, str]]:
        response = httpx.Response(200, stream=Chunks(chunks))
        limits.setdefault("max_event", 1000)
        limits.setdefault("max_stream", 10_000)
        return [(e.event, e.data) async for e in iter_sse(response, **limits)]  # type: ignore[arg-type]

    return asyncio.run(go())


@pytest.mark.parametrize(
    "chunks",
    [
        [b"event: a\ndata: 1\ndata: 2\n\ndata: 3\n\n"],
        [b"event: a\r\ndata: 1\r\ndata: 2\r\n\r\ndata: 3\r\n\r\n"],
        [b"event: a\rdata: 1\rdata: 2\r\rdata: 3\r\r"],
        # a CR LF cut between two chunks is one line end, not two (which would end the event)
        [b"event: a\r", b"\ndata: 1\r", b"\ndata: 2\r", b"\n\r", b"\ndata: 3\r\n\r\n"],
        [b"eve", b"nt: a\ndata:", b" 1\nda", b"ta: 2\n", b"\n", b"data: 3\n", b"\n"],
        [b": comment\nevent: a\ndata: 1\ndata: 2\n\n", b"data: 3\n\ndata: 4"],  # 4: no end
    ],
)
def test_the_reader_splits_lines_at_cr_lf_crlf_wherever_the_chunks_break(chunks):
    assert events(chunks) == [("a", "1\n2"), ("message", "3")]


def test_only_cr_and_lf_end_a_line():
    text = "a\u2028b\x85c\x0bd\x1ce — é"
    assert events([b"data: " + text.encode() + b"\n\n"]) == [("message", text)]


def test_the_reader_stops_at_a_limit_without_reading_further():
    with pytest.raises(StreamTooLarge, match="a line of the stream is larger than 1000"):
        events([b"data: ", b"A" * 600, b"A" * 600])
    with pytest.raises(StreamTooLarge, match="an event of the stream is larger than 1000"):
        events([b"data: " + b"A" * 400 + b"\n"] * 3)
    with pytest.raises(StreamTooLarge, match="the stream is larger than 10000"):
        events([b"data: 1\n\n" * 100] * 20)
    assert events([b"data: " + b"A" * 990 + b"\n\n"]) == [("message", "A" * 990)]


# --- (9) error bodies whose message or code is not a string ------------------------------------


def error_body(provider: str, value: Any) -> dict[str, Any]:
    """``provider``'s error shape, with ``value`` in every field."""
    if provider in ("openai", "mistral"):
        body: dict[str, Any] = {"error": {"message": value, "code": value, "type": value}}
        if provider == "mistral":
            body = {"message": value, "type": value, "code": value, "detail": value}
        return body
    if provider == "anthropic":
        return {"type": "error", "error": {"type": value, "message": value}}
    if provider == "google":
        return {"error": {"code": value, "message": value, "status": value, "details": value}}
    return {"error": value, "tag": value}  # exa


VALUES = [400, 1.5, True, ["a", 1], {"b": {"c": [1, None]}}, None]


@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ for v in VALUES])
@pytest.mark.parametrize("provider", [*MODEL_PROVIDERS, "exa"])
@pytest.mark.parametrize(("status", "kind"), [(401, AuthError), (429, RateLimitError)])
def test_an_error_body_with_any_json_in_its_fields_is_classified_by_its_status(
    provider, value, status, kind
):
    body = json.dumps(error_body(provider, value)).encode()
    error = failure(Scripted(status, body), provider)
    assert type(error) is kind, repr(error)
    assert error.status == status
    assert isinstance(error.message, str)
    assert error.message
    assert error.code is None or isinstance(error.code, str)
    if value is not None and provider != "google":  # google: the message only (its code, a status)
        shown = json.dumps(value, separators=(",", ":"))
        assert error.message == shown
        assert error.code == shown
    str(error), repr(error)  # both render


def test_each_providers_error_details_take_only_text():
    async def go() -> None:
        async with new_http_client() as http:
            clients = create_clients(http)
            for name, client in clients.items():
                for value in VALUES:
                    message, code = client.error_details(error_body(name, value))
                    assert message is None or isinstance(message, str), (name, value)
                    assert code is None or isinstance(code, str), (name, value)

    asyncio.run(go())


def test_a_long_message_is_bounded_and_a_key_it_echoes_at_the_cut_is_still_removed():
    for at in range(MAX_MESSAGE_CHARS - 40, MAX_MESSAGE_CHARS + 10):
        text = "x" * at + KEY + "y" * 3000
        bounded = redact_bounded(text, KEY)
        assert len(bounded) <= MAX_MESSAGE_CHARS + 1
        for start in range(len(KEY) - 3):  # no 4 characters of the key survive
            assert KEY[start : start + 4] not in bounded, (at, start)


def test_error_text_renders_any_json():
    assert [error_text(v) for v in VALUES] == [
        "400",
        "1.5",
        "true",
        '["a",1]',
        '{"b":{"c":[1,null]}}',
        None,
    ]
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    assert "nested too deeply" in (error_text(deep) or "")


def test_an_error_event_with_non_text_fields_is_a_server_error_with_text():
    chunks = [sse({"error": {"message": {"why": KEY}, "code": 500}})]
    error = failure(
        Scripted(200, chunks=chunks, headers=[("content-type", "text/event-stream")]),
        "openai",
        stream=True,
    )
    assert isinstance(error, ServerError), repr(error)
    assert error.code == "500"
    assert error.message.startswith('{"why":')
    assert KEY not in error.message
    assert KEY[:12] not in error.message


# --- through the runner: recorded, not a traceback ---------------------------------------------

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
    built.store_workspace_keys(BYOK_WORKSPACE, providers=("anthropic",))
    yield built
    built.close()


def run(stack: DemoStack, workspace: str, scripted: Scripted, *, stream: bool) -> RunResult:
    async def go(base_url: str) -> RunResult:
        async with new_http_client() as http:
            clients = create_clients(
                http, environ=stack.environ, base_urls={"anthropic": base_url}, retry=NO_RETRY
            )
            runner = WorkflowRunner(
                stack.pm, clients, environ=stack.environ, options=RunnerOptions(block_retries=2)
            )
            try:
                return await runner.run(
                    ONE_CALL, actor=OPERATOR, workspace_id=workspace, inputs={}, stream=stream
                )
            finally:
                await runner.drain()

    return asyncio.run(against(scripted, go))


@pytest.mark.parametrize("stream", [False, True])
def test_a_deep_answer_on_the_platform_key_is_recorded_uncertain_and_not_run_again(
    stack: DemoStack, stream: bool
) -> None:
    deep = b'{"type":"message","extra":' + DEEP.encode() + b"}"
    scripted = (
        Scripted(
            200,
            chunks=[b"data: " + deep + b"\n\n"],
            headers=[("content-type", "text/event-stream")],
        )
        if stream
        else Scripted(200, deep)
    )
    result = run(stack, PLATFORM_WORKSPACE, scripted, stream=stream)
    assert not result.ok
    error = result.blocks["a"].error or ""
    assert "recorded 'uncertain'" in error, error
    assert "nested deeper than it can be read" in error
    assert scripted.requests == 1  # the platform paid for one execution: not another
    (row,) = stack.app.ledger.rows()
    assert (row.status, row.amount, row.source) == (
        "uncertain",
        Decimal(0),
        CredentialSource.PLATFORM,
    )
    assert row.idempotency_key == f"{result.run_id}:a:1:uncertain:0"


def test_an_oversized_answer_on_a_workspace_key_is_recorded_uncertain(stack: DemoStack) -> None:
    scripted = Scripted(
        200,
        b"{",
        headers=[
            ("content-type", "application/json"),
            ("content-length", str(MAX_ANSWER_BYTES + 1)),
        ],
    )
    result = run(stack, BYOK_WORKSPACE, scripted, stream=False)
    assert not result.ok
    assert "larger than" in (result.blocks["a"].error or "")
    rows = list(stack.app.ledger.rows())
    assert rows
    assert {(r.status, r.source, r.amount) for r in rows} == {
        ("uncertain", CredentialSource.WORKSPACE, Decimal(0))
    }


def test_a_401_with_a_numeric_code_is_an_authentication_failure_not_a_traceback(
    stack: DemoStack,
) -> None:
    body = {"type": "error", "error": {"type": 401, "message": ["invalid", "key"]}}
    scripted = Scripted(401, json.dumps(body).encode())
    result = run(stack, BYOK_WORKSPACE, scripted, stream=False)
    assert not result.ok
    error = result.blocks["a"].error or ""
    assert "authentication error" in error, error
    assert "unexpected" not in error
    assert list(stack.app.ledger.rows()) == []  # refused: nothing executed, nothing recorded


SHAPED = parse_workflow(
    {
        "name": "shaped",
        "version": "1",
        "blocks": {
            "a": {
                "type": "agent",
                "model": "claude-sonnet-4-5",
                "prompt": "Classify this",
                "response_schema": {
                    "type": "object",
                    "properties": {"x": {"type": "array", "items": {"$ref": "#/properties/x"}}},
                },
            }
        },
    }
)


@pytest.mark.parametrize("text", ['{"x":' + DEEP + "}", '{"x":' + "[" * 500 + "]" * 500 + "}"])
def test_a_structured_reply_nested_too_deep_fails_the_block_not_the_run(
    stack: DemoStack, text: str
) -> None:
    # a well-formed answer whose text, the block's structured reply, is nested deeper than
    # json.loads (100,000 levels) or the schema validator following its $ref (500 levels) goes
    answer = {
        "id": "msg_deep",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 12, "output_tokens": 7},
    }
    scripted = Scripted(200, json.dumps(answer).encode())

    async def go(base_url: str) -> RunResult:
        async with new_http_client() as http:
            clients = create_clients(
                http, environ=stack.environ, base_urls={"anthropic": base_url}, retry=NO_RETRY
            )
            runner = WorkflowRunner(
                stack.pm, clients, environ=stack.environ, options=RunnerOptions(block_retries=1)
            )
            return await runner.run(SHAPED, actor=OPERATOR, workspace_id=BYOK_WORKSPACE, inputs={})

    result = asyncio.run(against(scripted, go))
    assert not result.ok
    error = result.blocks["a"].error or ""
    assert "the reply is not the JSON its response_schema asks for" in error, error
    assert "nested too deeply" in error
    # each attempt was a completed call: recorded as such
    assert scripted.requests == 2
    rows = list(stack.app.ledger.rows())
    assert [(r.status, r.input_tokens, r.output_tokens) for r in rows] == [("complete", 12, 7)] * 2
