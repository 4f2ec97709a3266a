"""Every real recorded provider response in ``../shared/fixtures/provider-recordings/`` (sources in
its ``SOURCES.json``), replayed over loopback HTTP through the project's clients: the exact
disjoint usage, and the exact platform charge computed here by hand from the list prices written
below (the shipped table's, and a test price file for the models it does not list). Every stream
is also cut before its end, at every event: the error carries what the provider is known to bill.

The recordings are read where they are, relative to the repository root; never copied in.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import pytest
from byok_hookspecs import Credential, CredentialSource, Usage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from byok_plugin.billing.catalog import shipped_catalog
from byok_plugin.billing.charges import Billing
from byok_plugin.billing.pricing import load_price_file, shipped_prices
from byok_plugin.host.emulator.server import BackgroundServer
from byok_plugin.host.providers import (
    NO_RETRY,
    CompletionRequest,
    ProviderError,
    SearchRequest,
    create_client,
    new_http_client,
)

ROOT = Path(__file__).resolve().parents[1]
RECORDINGS = ROOT / ".." / "shared" / "fixtures" / "provider-recordings"

pytestmark = pytest.mark.skipif(
    not RECORDINGS.is_dir(), reason=f"the provider recordings are not at {RECORDINGS}"
)

D = Decimal
M = D(1_000_000)

#: list prices, USD per 1M tokens: (input, cached_input, cache_write, cache_write_1h, output);
#: the shipped table's (byok_plugin/data/prices.json, 2026-12-05) written out again by hand
SHIPPED_RATES = {
    ("openai", "gpt-4o"): ("2.50", "1.25", None, None, "10.00"),
    ("openai", "gpt-4o-mini"): ("0.15", "0.075", None, None, "0.60"),
    ("openai", "gpt-5"): ("1.25", "0.125", None, None, "10.00"),
    ("openai", "o4-mini"): ("1.10", "0.275", None, None, "4.40"),
    ("anthropic", "claude-sonnet-4-5"): ("3.00", "0.30", "3.75", "6.00", "15.00"),
    ("google", "gemini-2.5-pro"): ("1.25", "0.125", None, None, "10.00"),
    ("google", "gemini-2.5-flash"): ("0.30", "0.03", None, None, "2.50"),
    ("mistral", "magistral-medium-latest"): ("2.00", "0.20", None, None, "5.00"),
    ("mistral", "mistral-large-latest"): ("0.50", "0.05", None, None, "1.50"),
}
#: models the recordings name that the shipped table does not list: a test price file
EXTRA_RATES = {
    ("openai", "gpt-5.6-sol"): ("2.00", "0.20", "2.50", None, "16.00"),
    ("openai", "o3-mini"): ("1.10", "0.55", None, None, "4.40"),
    ("anthropic", "claude-3-opus-latest"): ("15.00", "1.50", "18.75", "30.00", "75.00"),
    ("anthropic", "claude-opus-4-7"): ("5.00", "0.50", "6.25", "10.00", "25.00"),
    ("anthropic", "claude-opus-4-8"): ("5.00", "0.50", "6.25", "10.00", "25.00"),
    ("anthropic", "claude-sonnet-4"): ("3.00", "0.30", "3.75", "6.00", "15.00"),
    ("google", "gemini-3-pro-preview"): ("2.00", "0.20", None, None, "12.00"),
    ("google", "gemini-2.0-flash-exp"): ("0.10", "0.025", None, None, "0.40"),
    ("mistral", "pixtral-12b-latest"): ("0.15", "0.15", None, None, "0.15"),
}
#: USD per request of the providers' own tools (the shipped table's ``tools``)
#: fresh audio input tokens of a recording (``input_audio``), and the shipped audio prices
AUDIO_IN = {"google/cached_and_thoughts.json": 36}
AUDIO_RATES = {("google", "gemini-2.5-flash"): D("1.00")}
TOOL_PRICES = {
    ("anthropic", "web_search"): D("0.01"),
    ("anthropic", "web_fetch"): D("0"),
    ("google", "google_search"): D("0.035"),
}

# (file, priced as, input, cached_input, cache_write, cache_write_1h, output, reasoning, tools)
CASES: list[tuple[str, str, int, int, int, int, int, int, dict[str, int]]] = [
    ("openai/gpt56_cache_read.json", "gpt-5.6-sol", 8, 4012, 0, 0, 4, 0, {}),
    ("openai/gpt56_cache_write.json", "gpt-5.6-sol", 8, 0, 4012, 0, 4, 0, {}),
    ("openai/logged_usage_cached_and_reasoning.json", "o4-mini", 5074, 1152, 0, 0, 643, 768, {}),
    ("openai/o3mini_reasoning_1792.json", "o3-mini", 577, 0, 0, 0, 528, 1792, {}),
    ("openai/o3mini_reasoning_64.json", "o3-mini", 7, 0, 0, 0, 23, 64, {}),
    ("openai/gpt4omini_stream_tool_call.sse", "gpt-4o-mini", 53, 0, 0, 0, 15, 0, {}),
    ("openai/gpt5_stream_moderation_trailer.sse", "gpt-5", 13, 0, 0, 0, 11, 0, {}),
    ("openai/sdk_snapshot_173417d55340.sse", "gpt-4o", 79, 0, 0, 0, 11, 0, {}),
    ("openai/sdk_snapshot_2018feb66ae1.sse", "gpt-4o", 44, 0, 0, 0, 16, 0, {}),
    ("openai/sdk_snapshot_4cc50a6135d2.sse", "gpt-4o", 79, 0, 0, 0, 1, 0, {}),
    ("openai/sdk_snapshot_569c877e6942.sse", "gpt-4o", 79, 0, 0, 0, 12, 0, {}),
    ("openai/sdk_snapshot_7e5ea4d12e7c.sse", "gpt-4o", 79, 0, 0, 0, 14, 0, {}),
    ("openai/sdk_snapshot_83b060bae42e.sse", "gpt-4o", 9, 0, 0, 0, 2, 0, {}),
    ("openai/sdk_snapshot_a247c49c5fcd.sse", "gpt-4o", 48, 0, 0, 0, 19, 0, {}),
    ("openai/sdk_snapshot_a491adda08c3.sse", "gpt-4o", 79, 0, 0, 0, 42, 0, {}),
    ("openai/sdk_snapshot_c6aa7e397b71.sse", "gpt-4o", 76, 0, 0, 0, 24, 0, {}),
    ("openai/sdk_snapshot_d61558011839.sse", "gpt-4o", 19, 0, 0, 0, 177, 0, {}),
    ("openai/sdk_snapshot_e2aad469b71d.sse", "gpt-4o", 14, 0, 0, 0, 30, 0, {}),
    ("openai/sdk_snapshot_f82268f2fefd.sse", "gpt-4o", 149, 0, 0, 0, 60, 0, {}),
    ("anthropic/cache_read_only.json", "claude-sonnet-4-5", 3, 1111, 0, 0, 406, 0, {}),
    ("anthropic/cache_write_and_read.json", "claude-sonnet-4-5", 3, 1111, 418, 0, 33, 0, {}),
    ("anthropic/output_tokens_details.json", "claude-opus-4-8", 920, 0, 0, 0, 72, 0, {}),
    ("anthropic/thinking.json", "claude-sonnet-4-5", 43, 0, 0, 0, 321, 0, {}),
    ("anthropic/sdk_basic_response.sse", "claude-3-opus-latest", 11, 0, 0, 0, 6, 0, {}),
    # message_delta's final counts override message_start's; its thinking tokens are reasoning
    (
        "anthropic/sdk_message_delta_fields_response.sse",
        "claude-sonnet-4-5",
        40,
        7,
        12,
        0,
        5,
        3,
        {"web_search": 1},
    ),
    (
        "anthropic/sdk_message_delta_omitted_usage_response.sse",
        "claude-sonnet-4-5",
        25,
        5,
        10,
        0,
        8,
        0,
        {},
    ),
    ("anthropic/sdk_refusal_response.sse", "claude-opus-4-7", 20, 0, 0, 0, 0, 0, {}),
    (
        "anthropic/sdk_server_tool_use_response.sse",
        "claude-sonnet-4-5",
        9281,
        0,
        0,
        0,
        97,
        0,
        {"web_search": 1},
    ),
    ("anthropic/sdk_tool_use_response.sse", "claude-sonnet-4", 377, 0, 0, 0, 65, 0, {}),
    # events of unknown types (with usage of their own) are ignored
    ("anthropic/sdk_unknown_events_response.sse", "claude-3-opus-latest", 11, 0, 0, 0, 6, 0, {}),
    ("anthropic/thinking_stream.sse", "claude-sonnet-4", 43, 0, 0, 0, 282, 0, {}),
    (
        "anthropic/web_search_stream.sse",
        "claude-sonnet-4",
        22397,
        0,
        0,
        0,
        637,
        0,
        {"web_search": 2},
    ),
    # promptTokenCount includes the cache; toolUsePromptTokenCount is input on top of it
    # its prompt is 16 text, 15,780 video and 1,917 audio tokens, 17,379 of them cached (1,881
    # of the audio): 36 fresh audio tokens at the audio price, the other 298 at the text price
    ("google/cached_and_thoughts.json", "gemini-2.5-flash", 298, 17379, 0, 0, 68, 821, {}),
    ("google/gemini3_thinking.json", "gemini-3-pro-preview", 29, 0, 0, 0, 736, 1001, {}),
    (
        "google/grounded_search.json",
        "gemini-2.5-pro",
        17 + 119,
        0,
        0,
        0,
        201,
        213,
        {"google_search": 1},
    ),
    ("google/max_tokens.json", "gemini-2.5-flash", 15, 0, 0, 0, 5, 0, {}),
    ("google/no_candidates_token_count.json", "gemini-2.5-pro", 15, 0, 0, 0, 0, 2, {}),
    (
        "google/grounded_search_stream.sse",
        "gemini-2.5-pro",
        17 + 102,
        0,
        0,
        0,
        241,
        412,
        {"google_search": 1},
    ),
    # the last chunk's counts are the call's, even when the prompt count changes on the way
    ("google/stream_prompt_count_changes.sse", "gemini-2.0-flash-exp", 13, 0, 0, 0, 8, 0, {}),
    ("google/thinking_stream.sse", "gemini-2.5-pro", 34, 0, 0, 0, 469, 787, {}),
    ("google/usage_mid_stream.sse", "gemini-2.5-flash", 18, 0, 0, 0, 80, 35, {}),
    ("mistral/magistral_thinking.json", "magistral-medium-latest", 664, 0, 0, 0, 747, 0, {}),
    ("mistral/pixtral.json", "pixtral-12b-latest", 65, 0, 0, 0, 16, 0, {}),
    ("mistral/prompt_cache_hit.json", "mistral-large-latest", 44, 224, 0, 0, 5, 0, {}),
    (
        "mistral/magistral_stream_thinking_chunks.sse",
        "magistral-medium-latest",
        10,
        0,
        0,
        0,
        232,
        0,
        {},
    ),
]
EXA_CASE = "exa/recorded_search.json"


def hand_charge(
    provider: str, model: str, counts: tuple[int, ...], tools: dict[str, int], audio: int = 0
) -> D:
    """The list cost, by hand: each count at its rate (reasoning at the output rate, fresh audio
    input at the audio rate), plus the tools at their per-request price."""
    rates = {**SHIPPED_RATES, **EXTRA_RATES}[(provider, model)]
    inp, cached, write, write_1h, out = (D(r) if r is not None else None for r in rates)
    n_in, n_cached, n_write, n_write_1h, n_out, n_reasoning = counts
    total = n_in * inp + n_cached * cached + n_out * out + n_reasoning * out
    if audio:
        total += audio * AUDIO_RATES[(provider, model)]
    if n_write:
        total += n_write * write
    if n_write_1h:
        total += n_write_1h * write_1h
    total /= M
    for name, count in tools.items():
        total += TOOL_PRICES[(provider, name)] * count
    return total


async def replay(request: Request) -> Response:
    """Answer any call under ``/rec/<provider>/<file>/<keep>/`` with that recording; a stream is
    cut to its first ``keep`` events (``-1``: all of them)."""
    provider, name, keep = (request.path_params[k] for k in ("provider", "name", "keep"))
    body = (RECORDINGS / provider / name).read_bytes()
    if name.endswith(".sse"):
        events = _events(body)
        if int(keep) >= 0:
            events = events[: int(keep)]
        return Response(b"".join(e + b"\n\n" for e in events), media_type="text/event-stream")
    return Response(body, media_type="application/json")


def _events(body: bytes) -> list[bytes]:
    body = body.replace(b"\r\n", b"\n")
    return [
        e for e in body.split(b"\n\n") if any(line.startswith(b"data") for line in e.split(b"\n"))
    ]


@pytest.fixture(scope="module")
def server():
    app = Starlette(
        routes=[Route("/rec/{provider}/{name}/{keep}/{rest:path}", replay, methods=["GET", "POST"])]
    )
    with BackgroundServer(app) as running:
        yield running


def call(server: BackgroundServer, file: str, *, keep: int = -1):
    provider, name = file.split("/")

    async def go():
        async with new_http_client() as http:
            client = create_client(
                provider,
                http,
                base_url=f"{server.url}/rec/{provider}/{name}/{keep}",
                retry=NO_RETRY,
            )
            if provider == "exa":
                return await client.search(SearchRequest("agent client protocol"), api_key="k")
            request = CompletionRequest.simple("m", "Hello")
            if name.endswith(".sse"):
                return await client.complete_streamed(request, api_key="k")
            return await client.complete(request, api_key="k")

    return asyncio.run(go())


@pytest.fixture(scope="module")
def billing(tmp_path_factory) -> Billing:
    extra = {
        "version": "recordings-test",
        "models": {
            f"{p}/{m}": {
                name: value
                for name, value in zip(
                    ("input", "cached_input", "cache_write", "cache_write_1h", "output"),
                    rates,
                    strict=True,
                )
                if value is not None
            }
            for (p, m), rates in EXTRA_RATES.items()
        },
    }
    path = tmp_path_factory.mktemp("prices") / "extra.json"
    path.write_text(json.dumps(extra))
    table = shipped_prices().overlaid(load_price_file(path))
    return Billing(prices=table, catalog=shipped_catalog())


def platform(provider: str) -> Credential:
    return Credential(api_key="k", provider=provider, source=CredentialSource.PLATFORM)


def test_the_cases_cover_every_recording() -> None:
    files = {
        str(p.relative_to(RECORDINGS))
        for p in RECORDINGS.rglob("*")
        if p.is_file() and p.name != "SOURCES.json"
    }
    covered = {case[0] for case in CASES} | {EXA_CASE}
    assert files == covered
    sources = json.loads((RECORDINGS / "SOURCES.json").read_text())
    assert set(sources) == files


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_recording_gives_the_exact_usage_and_platform_charge(server, billing, case) -> None:
    file, priced_as, *counts_list, tools = case
    counts = tuple(counts_list)
    provider = file.split("/")[0]
    result = call(server, file)
    usage = result.usage
    assert (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.cache_write_1h_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
    ) == counts
    assert usage.input_audio_tokens == AUDIO_IN.get(file, 0)
    assert dict(usage.tool_uses) == tools
    assert usage.tool_requests == 0
    # charged under the model the call was made for (the runner's rule), as a platform call
    charge = billing.charge(Usage(**{**_fields(usage), "model": priced_as}), platform(provider))
    expected = hand_charge(provider, priced_as, counts, tools, AUDIO_IN.get(file, 0))
    assert charge.unpriced == ()
    assert charge.reason == "platform"
    assert charge.amount == expected
    assert charge.list_cost == expected
    assert sum(amount for _, amount in charge.breakdown) == expected
    assert expected > 0
    # the workspace's own key: nothing charged, the same list cost kept
    byok = billing.charge(
        Usage(**{**_fields(usage), "model": priced_as}),
        Credential(api_key="k", provider=provider, source=CredentialSource.WORKSPACE),
    )
    assert byok.amount == 0
    assert byok.list_cost == expected


def _fields(usage: Usage) -> dict:
    return {name: getattr(usage, name) for name in Usage.__dataclass_fields__}


def test_the_two_calls_once_charged_zero_now_charge_tokens_plus_searches(server, billing) -> None:
    """An Anthropic call with a web search and a grounded Gemini call, on priced models, were
    recorded 'unpriced' with charge 0; each now costs its tokens plus its searches."""
    anthropic = call(server, "anthropic/sdk_server_tool_use_response.sse").usage
    charge = billing.charge(
        Usage(**{**_fields(anthropic), "model": "claude-sonnet-4-5"}), platform("anthropic")
    )
    # 9281 input x $3/M + 97 output x $15/M + 1 search x $0.01
    assert charge.amount == D("0.027843") + D("0.001455") + D("0.01") == D("0.039298")
    assert ("tool:web_search", D("0.01")) in charge.breakdown
    gemini = call(server, "google/grounded_search.json").usage
    charge = billing.charge(gemini, platform("google"))
    # (17 prompt + 119 tool-use prompt) x $1.25/M + (201 + 213 thinking) x $10/M + $0.035
    assert charge.amount == D("0.00017") + D("0.00414") + D("0.035") == D("0.03931")


def test_anthropic_1h_cache_writes_are_priced_at_the_1h_rate(billing) -> None:
    from byok_plugin.host.providers.anthropic import anthropic_usage

    usage = anthropic_usage(
        "claude-sonnet-4-5",
        {
            "input_tokens": 10,
            "cache_creation_input_tokens": 3000,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 1000,
                "ephemeral_1h_input_tokens": 2000,
            },
            "output_tokens": 20,
        },
    )
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (1000, 2000)
    charge = billing.charge(usage, platform("anthropic"))
    # 10 x 3 + 1000 x 3.75 + 2000 x 6 + 20 x 15, per 1M
    assert charge.amount == D("0.01608")


def test_exa_is_charged_the_cost_it_reported(server, billing) -> None:
    result = call(server, EXA_CASE)
    assert result.usage.tool_requests == 1
    assert result.usage.reported_cost == D("0.007")
    charge = billing.charge(result.usage, platform("exa"))
    assert charge.amount == D("0.007")
    assert charge.breakdown == (("reported_cost", D("0.007")),)


STREAMS = [c for c in CASES if c[0].endswith(".sse")]


@pytest.mark.parametrize("case", STREAMS, ids=[c[0] for c in STREAMS])
def test_every_stream_cut_before_its_end_carries_what_is_billed_so_far(server, case) -> None:
    """Cut after each event but the last: the client fails, and the error carries the usage
    known so far: never more output than the whole call's (Anthropic's ``message_start`` counts
    a placeholder output token), and, once the provider reported its input, that input. Anthropic
    and Gemini report their input as the stream starts; OpenAI and Mistral only at its end, so
    their partial usage is the output counted from the deltas."""
    file, _, n_in, n_cached, _write, _write_1h, n_out, n_reasoning, _tools = case
    provider, name = file.split("/")
    events = _events((RECORDINGS / provider / name).read_bytes())
    known = []
    for keep in range(len(events)):
        try:
            result = call(server, file, keep=keep)
        except ProviderError as exc:
            partial = exc.partial_usage
        else:  # only a cut after the end marker (a trailing event) may still complete
            assert result.usage.input_tokens == n_in, f"{file} cut at {keep}"
            continue
        if partial is None:
            assert not known, f"{file} cut at {keep}: usage lost after it was known"
            continue
        known.append(partial)
        where = f"{file} cut at {keep}: {partial}"
        assert partial.total_tokens > 0, where
        assert partial.output_tokens + partial.reasoning_tokens <= max(n_out + n_reasoning, 1), (
            where
        )
        if provider == "anthropic":  # message_start reported the input
            assert partial.input_tokens in (n_in, _start_input(events)), where
            assert partial.cached_input_tokens <= n_cached, where
    assert known, f"{file}: no cut carried any usage"
    if provider in ("anthropic", "google"):
        assert all(p.input_tokens > 0 for p in known), file
    else:  # openai, mistral: the output seen, counted from the deltas, then the usage chunk
        assert known[-1].output_tokens + known[-1].reasoning_tokens > 0, file


def _start_input(events: list[bytes]) -> int:
    for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data:") and b"message_start" in line:
                return int(json.loads(line[5:])["message"]["usage"]["input_tokens"])
    return -1
