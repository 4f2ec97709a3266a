"""Our provider client's non-streamed call against a raw httpx POST of the same body, both to the
local emulator over loopback, in one process and one run. Target: median ratio at most 1.1x.

The two paths alternate call by call on the same shared ``httpx.AsyncClient`` and the same
emulator, so drift (CPU frequency, the other engineers' load) hits both alike. The raw baseline
posts the very bytes our client sends and decodes the JSON answer (any caller must); the bare
POST without decoding is printed too. The verdict uses the median of the paired ratios (each client
call over the raw call made next to it), which the load of a shared machine moves far less than a
ratio of two medians; both are printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

import httpx

from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.providers import (
    NO_RETRY,
    CompletionRequest,
    Message,
    create_client,
    new_http_client,
)

PROVIDERS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}
ROUNDS = int(os.environ.get("BENCH_CLIENT_ROUNDS", "600"))
WARMUP = 40
TARGET = 1.10


async def measure(emulator: EmulatorServer, provider: str, model: str) -> dict[str, list[float]]:
    key = emulator.new_key(provider)
    request = CompletionRequest(
        model=model,
        system="You are terse.",
        messages=(
            Message(
                "user", "Summarise the quarterly usage report for the platform team in two lines."
            ),
        ),
        temperature=0.2,
        max_output_tokens=200,
    )
    async with new_http_client() as http:
        client = create_client(provider, http, base_url=emulator.base_url(provider), retry=NO_RETRY)
        body = client.body(request, stream=False)  # type: ignore[attr-defined]
        path = "/chat/completions" if provider == "openai" else "/v1/messages"
        url = client.url(path)
        headers = {**client.headers(key), "content-type": "application/json"}
        content = json.dumps(body, separators=(",", ":")).encode()
        timeout = httpx.Timeout(60.0, connect=5.0)

        async def ours() -> None:
            await client.complete(request, api_key=key)

        async def raw_json() -> None:
            response = await http.post(url, content=content, headers=headers, timeout=timeout)
            response.raise_for_status()
            response.json()

        async def raw_bare() -> None:
            response = await http.post(url, content=content, headers=headers, timeout=timeout)
            response.raise_for_status()

        paths = {"client": ours, "raw httpx + json": raw_json, "raw httpx post": raw_bare}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(WARMUP + ROUNDS):
            order = list(paths.items())
            if i % 2:
                order.reverse()
            for name, call in order:
                start = time.perf_counter()
                await call()
                if i >= WARMUP:
                    times[name].append(time.perf_counter() - start)
        return times


def main() -> None:
    print(f"{ROUNDS} calls per path (after {WARMUP} warm-up), alternating, emulator on loopback")
    worst = 0.0
    with EmulatorServer() as emulator:
        for provider, model in PROVIDERS.items():
            times = asyncio.run(measure(emulator, provider, model))
            medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            p90 = {name: statistics.quantiles(t, n=10)[-1] * 1e3 for name, t in times.items()}
            ratio_of_medians = medians["client"] / medians["raw httpx + json"]
            bare = medians["client"] / medians["raw httpx post"]
            # adjacent calls of the two paths, paired: robust to drift in the machine's load
            paired = statistics.median(
                c / r for c, r in zip(times["client"], times["raw httpx + json"], strict=True)
            )
            worst = max(worst, paired)
            print(f"\n{provider} ({model}), non-streamed")
            for name in times:
                print(f"  {name:<18} median {medians[name]:7.3f} ms   p90 {p90[name]:7.3f} ms")
            verdict = "OK" if paired <= TARGET else "OVER TARGET"
            print(f"  ratio of medians, client / raw httpx + json: {ratio_of_medians:.3f}x")
            print(f"  ratio of medians, client / bare raw post:    {bare:.3f}x")
            print(
                f"  median of paired ratios, client / raw httpx + json: {paired:.3f}x "
                f"(target <= {TARGET}x) {verdict}"
            )
    print(
        f"\nworst median paired ratio: {worst:.3f}x ({'OK' if worst <= TARGET else 'OVER TARGET'})"
    )
