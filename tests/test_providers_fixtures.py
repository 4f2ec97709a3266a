"""Each client reads the providers' own example bodies and stream transcripts (from their API
references; sources in tests/fixtures/providers/README.md), replayed over loopback HTTP, into the
right disjoint Usage. A transcript cut before its end is a protocol error."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from pathlib import Path

import pytest
from byok_hookspecs import Usage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from byok_plugin.host.emulator.server import BackgroundServer
from byok_plugin.host.providers import (
    NO_RETRY,
    CompletionRequest,
    ProtocolError,
    SearchRequest,
    create_client,
    new_http_client,
)

FIXTURES = Path(__file__).parent / "fixtures" / "providers"


async def replay(request: Request) -> Response:
    """Answer any call under ``/fx/<provider>/<file>/<cut>/`` with that fixture file, the last
    ``cut`` events of a transcript left out."""
    provider, name, cut = (request.path_params[k] for k in ("provider", "name", "cut"))
    body = (FIXTURES / provider / name).read_bytes()
    if name.endswith(".sse"):
        separator = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n"
        events = [e for e in body.split(separator) if e.strip()]
        events = events[: len(events) - int(cut)]
        return Response(b"".join(e + separator for e in events), media_type="text/event-stream")
    return Response(body, media_type="application/json")


#: a usage field's input token count, in each provider's shape
_INPUT_COUNT = re.compile(rb'("(?:prompt_tokens|input_tokens|promptTokenCount)":\s*)\d+')


async def replay_huge(request: Request) -> Response:
    """Like :func:`replay` (nothing cut), every input token count made 10^22."""
    response = await replay(request)
    body = _INPUT_COUNT.sub(rb"\g<1>" + str(10**22).encode(), bytes(response.body))
    return Response(body, media_type=response.media_type)


@pytest.fixture(scope="module")
def fixture_server():
    app = Starlette(
        routes=[
            Route("/fx/{provider}/{name}/{cut}/{rest:path}", replay, methods=["GET", "POST"]),
            Route("/huge/{provider}/{name}/{cut}/{rest:path}", replay_huge, methods=["POST"]),
        ]
    )
    with BackgroundServer(app) as server:
        yield server


def run(
    provider: str,
    server: BackgroundServer,
    name: str,
    *,
    cut: int = 0,
    stream: bool = False,
    model: str = "m",
    route: str = "fx",
):
    async def go():
        async with new_http_client() as http:
            client = create_client(
                provider,
                http,
                base_url=f"{server.url}/{route}/{provider}/{name}/{cut}",
                retry=NO_RETRY,
            )
            if provider == "exa":
                return await client.search(SearchRequest("Latest research in LLMs"), api_key="k")
            request = CompletionRequest.simple(model, "Hello")
            if stream:
                return await client.complete_streamed(request, api_key="k")
            return await client.complete(request, api_key="k")

    return asyncio.run(go())


CASES = [
    # provider, file, streamed, expected usage (disjoint), expected content
    (
        "openai",
        "chat_completion.json",
        False,
        Usage("openai", "gpt-4o-2024-08-06", input_tokens=1117, output_tokens=46),
        "The image shows",
    ),
    (
        "openai",
        "chat_completion_cached.json",
        False,
        Usage(
            "openai", "gpt-4o-mini", input_tokens=86, cached_input_tokens=1920, output_tokens=300
        ),
        "\n\nHello there",
    ),
    (
        "openai",
        "stream_include_usage.sse",
        True,
        Usage(
            "openai", "gpt-4o-mini", input_tokens=86, cached_input_tokens=1920, output_tokens=300
        ),
        "Hello there",
    ),
    (
        "anthropic",
        "message.json",
        False,
        Usage("anthropic", "claude-3-opus-20240229", input_tokens=10, output_tokens=25),
        "Hi! My name is Claude.",
    ),
    (
        "anthropic",
        "message_cache_write.json",
        False,
        Usage(
            "anthropic",
            "claude-3-opus-20240229",
            input_tokens=21,
            cache_write_tokens=188086,
            output_tokens=393,
        ),
        "Hi!",
    ),
    (
        "anthropic",
        "message_cache_read.json",
        False,
        Usage(
            "anthropic",
            "claude-3-opus-20240229",
            input_tokens=21,
            cached_input_tokens=188086,
            output_tokens=393,
        ),
        "Hi!",
    ),
    (
        "anthropic",
        "stream.sse",
        True,
        Usage("anthropic", "claude-sonnet-4-5-20250929", input_tokens=25, output_tokens=15),
        "Hello!",
    ),
    (
        "google",
        "generate_content.json",
        False,
        Usage(
            "google",
            "gemini-2.5-flash",
            input_tokens=176,
            cached_input_tokens=1024,
            output_tokens=20,
            reasoning_tokens=98,
        ),
        "Why did the ticket for AI",
    ),
    (
        "google",
        "stream.sse",
        True,
        Usage(
            "google",
            "gemini-2.5-flash",
            input_tokens=176,
            cached_input_tokens=1024,
            output_tokens=20,
            reasoning_tokens=98,
        ),
        "Why did the ticket for AI",
    ),
    (
        "mistral",
        "chat_completion.json",
        False,
        Usage("mistral", "mistral-small-latest", input_tokens=16, output_tokens=34),
        "string",
    ),
    (
        "mistral",
        "stream.sse",
        True,
        Usage("mistral", "mistral-small-latest", input_tokens=16, output_tokens=34),
        "Hello streamed chat completion!",
    ),
]


@pytest.mark.parametrize(
    ("provider", "name", "stream", "usage", "content"), CASES, ids=[f"{c[0]}/{c[1]}" for c in CASES]
)
def test_reference_examples_give_the_right_usage(
    fixture_server, provider, name, stream, usage, content
):
    result = run(provider, fixture_server, name, stream=stream)
    assert result.usage == usage
    assert result.content.startswith(content)
    assert result.finish_reason == "stop"
    assert result.streamed is stream


def test_exa_reference_example_gives_the_reported_cost(fixture_server):
    result = run("exa", fixture_server, "search.json")
    assert result.usage == Usage(
        "exa", "exa-search", tool_requests=1, reported_cost=Decimal("0.005")
    )
    assert isinstance(result.usage.reported_cost, Decimal)
    assert result.search_type == "neural"
    assert result.request_id == "b5947044c4b78efa9552a7c89b306d95"
    (hit,) = result.hits
    assert hit.url == "https://arxiv.org/pdf/2307.06435.pdf"
    assert hit.text.startswith("Abstract Large Language Models")


def test_mistral_tool_call_arguments_as_an_object_are_read(fixture_server):
    result = run("mistral", fixture_server, "chat_completion.json")
    (call,) = result.tool_calls
    assert (call.name, call.parsed_arguments()) == ("string", {})


STREAMS = [
    ("openai", "stream_include_usage.sse"),
    ("anthropic", "stream.sse"),
    ("google", "stream.sse"),
    ("mistral", "stream.sse"),
]


@pytest.mark.parametrize(("provider", "name"), STREAMS)
@pytest.mark.parametrize("cut", [1, 2])
def test_a_transcript_cut_before_its_end_is_a_protocol_error(fixture_server, provider, name, cut):
    with pytest.raises(ProtocolError) as info:
        run(provider, fixture_server, name, stream=True, cut=cut)
    assert info.value.provider == provider
    assert "stream" in str(info.value)


@pytest.mark.parametrize(
    ("provider", "name"),
    [
        ("openai", "chat_completion.json"),
        ("anthropic", "message.json"),
        ("google", "generate_content.json"),
        ("mistral", "chat_completion.json"),
        *STREAMS,
    ],
)
def test_a_token_count_beyond_any_call_is_a_protocol_error(fixture_server, provider, name):
    # 10^22 tokens would price beyond what the ledger stores (and 10^16 dollars already failed
    # to round): the answer is refused as broken, before anything is priced or recorded
    assert _INPUT_COUNT.search((FIXTURES / provider / name).read_bytes())
    with pytest.raises(ProtocolError) as info:
        run(provider, fixture_server, name, stream=name.endswith(".sse"), route="huge")
    assert info.value.provider == provider
    assert "token count" in str(info.value), str(info.value)
