"""OpenAI audio tokens (``prompt_tokens_details.audio_tokens``,
``completion_tokens_details.audio_tokens``) read by the real client over loopback HTTP, priced at
the audio prices of a dated, sourced price entry; without audio prices they are named unpriced
and the text part is still charged (never a $0 call)."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

from byok_hookspecs import Credential, CredentialSource, Usage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from byok_plugin.billing.catalog import shipped_catalog
from byok_plugin.billing.charges import Billing
from byok_plugin.billing.pricing import load_price_file, parse_litellm_prices, shipped_prices
from byok_plugin.host.emulator.server import BackgroundServer
from byok_plugin.host.providers import NO_RETRY, create_clients, new_http_client
from byok_plugin.host.providers.common import CompletionRequest, Message

D = Decimal
PLATFORM = Credential(api_key="sk-test", provider="openai", source=CredentialSource.PLATFORM)
#: the shape of https://platform.openai.com/docs/api-reference/chat/object with an audio answer
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "(the model asked for)",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1000,
        "completion_tokens": 700,
        "total_tokens": 1700,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 600},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 500},
    },
}
AUDIO_PRICES = {
    "version": "test-audio",
    "currency": "USD",
    "models": {
        "openai/gpt-4o-mini-audio-preview": {
            "input": 0.15,
            "output": 0.60,
            "input_audio": 10.00,
            "output_audio": 20.00,
            "as_of": "2026-12-04",
            "source": "https://platform.openai.com/docs/pricing",
        }
    },
}


async def _completions(request: Request) -> Response:
    asked = json.loads(await request.body())
    return Response(json.dumps({**ANSWER, "model": asked["model"]}), media_type="application/json")


def _usage(model: str) -> Usage:
    app = Starlette(routes=[Route("/chat/completions", _completions, methods=["POST"])])
    with BackgroundServer(app) as server:

        async def go() -> Usage:
            async with new_http_client() as http:
                clients = create_clients(
                    http, environ={}, base_urls={"openai": server.url}, retry=NO_RETRY
                )
                request = CompletionRequest(model=model, messages=(Message("user", "Hi"),))
                result = await clients["openai"].complete(request, api_key="sk-test")
                return result.usage

        return asyncio.run(go())


def test_audio_tokens_are_kept_apart_and_priced_at_the_audio_prices(tmp_path) -> None:
    usage = _usage("gpt-4o-mini-audio-preview")
    # disjoint: text input 1000 - 600 audio, text output 700 - 500 audio
    assert (usage.input_tokens, usage.input_audio_tokens) == (400, 600)
    assert (usage.output_tokens, usage.output_audio_tokens) == (200, 500)
    price_file = tmp_path / "prices.json"
    price_file.write_text(json.dumps(AUDIO_PRICES))
    billing = Billing(shipped_prices().overlaid(load_price_file(price_file)), shipped_catalog())
    charge = billing.charge(usage, PLATFORM)
    expected = (D("0.15") * 400 + D("0.60") * 200 + D("10.00") * 600 + D("20.00") * 500) / 1_000_000
    assert charge.amount == charge.list_cost == expected
    assert charge.unpriced == ()
    assert dict(charge.breakdown)["output_audio"] == D("20.00") * 500 / 1_000_000


def test_audio_tokens_without_audio_prices_are_unpriced_and_the_text_is_charged() -> None:
    usage = _usage("gpt-4o-mini")  # the shipped table prices its text only
    billing = Billing(shipped_prices(), shipped_catalog())
    charge = billing.charge(usage, PLATFORM)
    assert charge.unpriced == ("input_audio", "output_audio")
    assert charge.amount == (D("0.15") * 400 + D("0.60") * 200) / 1_000_000 > 0
    assert charge.reason == "platform"


def test_litellm_audio_prices_are_imported() -> None:
    table = parse_litellm_prices(
        {
            "gpt-4o-mini-audio-preview": {
                "litellm_provider": "openai",
                "mode": "chat",
                "input_cost_per_token": 1.5e-07,
                "output_cost_per_token": 6e-07,
                "input_cost_per_audio_token": 1e-05,
                "output_cost_per_audio_token": 2e-05,
            }
        }
    )
    rates = table.entries[("openai", "gpt-4o-mini-audio-preview")].rates
    assert (rates.input_audio, rates.output_audio) == (D(10), D(20))
