"""The workflow runner against raw httpx posts of the same requests, both to the emulator on
loopback, in one run, at the same concurrency (1, 16 and 64).

- **runner**: 2,000 runs of a one-agent-block workflow through :class:`WorkflowRunner` and the real
  plugin: ``byok_resolve_credential`` (the workspace's stored BYOK key: key-list cache, AES-GCM
  decryption), the OpenAI client's call, ``byok_compute_charge``, ``byok_record_usage`` (one row in
  a SQLite ledger file, WAL), with the runner's default options: on a local SQLite store every
  implementation declares it does not block, so the hooks are called on the event loop;
- **runner, hooks in thread**: the same with ``hooks_in_thread=True``, what the runner does when a
  plugin may block (a PostgreSQL store, an undeclared plugin): the cost of two thread trips;
- **raw**: 2,000 ``httpx.AsyncClient`` posts of the very bytes the OpenAI client sends, with the
  JSON answer decoded;
- **provider client only**: the OpenAI client's ``complete`` alone (no hooks, no runner), which
  tells how much of the runner's time over raw is the client's and how much is the runner's.

The emulator runs in its own process, so that its CPU time does not share this process's GIL with
the code measured. The paths alternate in adjacent chunks (call by call at concurrency 1, chunks
of 4 x concurrency above), so drift in a shared machine's load hits them alike. Per-call time is
the time from a run's (or post's) start to its end, waiting included; blocks/s is calls over the
chunks' wall time. The verdict uses the median over adjacent chunks of the runner's median per-call
time over the raw posts' (the paired ratio), which the load of a shared machine moves far less than
a ratio of two overall medians; both are printed. CPU is this process's CPU time per call (all its
threads; the emulator's is not counted): at concurrency 16 and 64 the client process is busy all
the time, so per-call time follows CPU per call.

Where the runner's CPU goes, per call, at each concurrency: after the timed chunks, one more
chunk of the runner path with pluggy's hook-call monitoring on times each hook the runner calls
(its CPU on the calling thread, the hooks it calls in turn included: resolution's audit event in
``byok_resolve_credential``); the provider client's own share is its CPU over the raw posts', the
runner's own is what is left of its CPU once the client and the hooks are taken out. The hooks run
on the event loop (the runner's default here), so nothing else runs while one is timed.

Target: the runner's median per-call time at most 1.25x the raw posts'.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from byok_plugin.app import App
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import realistic_key
from byok_plugin.core.crypto import generate_master_key
from byok_plugin.host.emulator.server import describe
from byok_plugin.host.providers import (
    NO_RETRY,
    CompletionRequest,
    Message,
    create_client,
    create_clients,
)
from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
from byok_plugin.host.workflow import parse_workflow
from byok_plugin.keys.service import KeyService
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

CALLS = int(os.environ.get("BENCH_RUNNER_CALLS", "2000"))
BATCH = 250
CONCURRENCY = tuple(
    int(c) for c in os.environ.get("BENCH_RUNNER_CONCURRENCY", "1,16,64").split(",")
)
TARGET = 1.25
RAW = "raw httpx post"
HOOKS = "runner, hooks timed"  # the extra chunk that times the hooks; not a path of its own
WORKSPACE = "bench"
MODEL = "gpt-4o-mini"
SYSTEM = "You are terse."
PROMPT = "Summarise the quarterly usage report for the platform team in two lines."
WORKFLOW = parse_workflow(
    {
        "name": "bench",
        "version": "1",
        "blocks": {
            "answer": {
                "type": "agent",
                "model": MODEL,
                "system": SYSTEM,
                "prompt": PROMPT,
                "temperature": 0.2,
                "max_tokens": 200,
            }
        },
    }
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_emulator(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "byok_plugin", "emulator", "--port", str(port), "--accept-any-key"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/_emulator/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the emulator did not start")


Call = Callable[[], Awaitable[None]]


class Samples:
    """Per-call times, wall time and failures of one path, chunk by chunk."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.chunks: list[list[float]] = []
        self.wall = 0.0
        self.cpu = 0.0  # this process's CPU time (every thread), not the emulator's
        self.failures = 0
        self.hooks: dict[str, float] = {}  # CPU seconds per call in each hook (HOOKS only)

    @property
    def calls(self) -> int:
        return len(self.times)


async def chunk(call: Call, n: int, concurrency: int, into: Samples) -> None:
    """``n`` calls, at most ``concurrency`` at once."""
    gate = asyncio.Semaphore(concurrency)
    times: list[float] = []

    async def one() -> None:
        async with gate:
            start = time.perf_counter()
            try:
                await call()
            except (httpx.HTTPError, RuntimeError):
                into.failures += 1
                return
            times.append(time.perf_counter() - start)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    into.wall += time.perf_counter() - start
    into.cpu += time.process_time() - cpu
    into.times += times
    into.chunks.append(times)


async def alternate(
    paths: Mapping[str, Call], calls: int, size: int, concurrency: int
) -> dict[str, Samples]:
    """``calls`` calls of each path in adjacent chunks of ``size``, alternating which path goes
    first, so that every path meets the same machine (call by call at size 1)."""
    results = {name: Samples() for name in paths}
    done = turn = 0
    while done < calls:
        n = min(size, calls - done)
        order = list(paths.items())
        if turn % 2:
            order.reverse()
        for name, call in order:
            await chunk(call, n, concurrency, results[name])
        done += n
        turn += 1
    return results


async def measure(
    environ: dict[str, str], api_key: str, pm: Any, concurrency: int
) -> dict[str, Samples]:
    options = {
        "runner": RunnerOptions(max_concurrent_calls=concurrency, block_retries=0),
        "runner, hooks in thread": RunnerOptions(
            max_concurrent_calls=concurrency, block_retries=0, hooks_in_thread=True
        ),
    }
    size = max(concurrency, 10)
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as http:
        runners = {
            name: WorkflowRunner(
                pm,
                create_clients(http, environ=environ, retry=NO_RETRY),
                environ=environ,
                options=opts,
            )
            for name, opts in options.items()
        }
        client = create_client("openai", http, environ=environ, retry=NO_RETRY)
        request = CompletionRequest(
            model=MODEL,
            system=SYSTEM,
            messages=(Message("user", PROMPT),),
            temperature=0.2,
            max_output_tokens=200,
            schema_name="answer",
        )
        content = json.dumps(client.body(request, stream=False), separators=(",", ":")).encode()  # type: ignore[attr-defined]
        url = client.url("/chat/completions")
        headers = {**client.headers(api_key), "content-type": "application/json"}
        timeout = httpx.Timeout(60.0, connect=5.0)

        async def raw() -> None:
            response = await http.post(url, content=content, headers=headers, timeout=timeout)
            response.raise_for_status()
            response.json()

        def through(runner: WorkflowRunner) -> Call:
            async def run() -> None:
                result = await runner.run(WORKFLOW, workspace_id=WORKSPACE, actor=OPERATOR)
                if not result.ok:
                    raise RuntimeError(result.error)

            return run

        async def client_only() -> None:
            await client.complete(request, api_key=api_key)

        paths: dict[str, Call] = {RAW: raw, "provider client only": client_only}
        paths.update({name: through(r) for name, r in runners.items()})
        # warm-up: connections, caches, the thread pool
        for call in paths.values():
            await chunk(call, max(concurrency * 2, 20), concurrency, Samples())
        # adjacent chunks of the paths, alternating in order: call by call at concurrency 1
        size = 1 if concurrency == 1 else min(CALLS, concurrency * 4)
        results = await alternate(paths, CALLS, size, concurrency)
        # where the runner's CPU goes: each hook it calls, timed in one more chunk of its path
        spent, undo = hook_cpu(pm)
        layers = Samples()
        try:
            await chunk(paths["runner"], min(CALLS, 500), concurrency, layers)
        finally:
            undo()
        results[HOOKS] = layers
        results[HOOKS].hooks = {name: cpu / max(layers.calls, 1) for name, cpu in spent.items()}
    return results


def hook_cpu(pm: Any) -> tuple[dict[str, float], Callable[[], None]]:
    """CPU seconds spent in each hook called from outside any hook (those a hook calls in turn are
    in its time), while pluggy's monitoring is on; and what turns it off."""
    spent: dict[str, float] = {}
    depth = 0
    started = 0.0

    def before(name: str, impls: Any, kwargs: Any) -> None:
        nonlocal depth, started
        if depth == 0:
            started = time.thread_time()
        depth += 1

    def after(outcome: Any, name: str, impls: Any, kwargs: Any) -> None:
        nonlocal depth
        depth -= 1
        if depth == 0:
            spent[name] = spent.get(name, 0.0) + time.thread_time() - started

    return spent, pm.add_hookcall_monitoring(before, after)


def layers_line(results: Mapping[str, Samples]) -> str:
    """The runner's CPU per call split into raw post, the client's own, each hook, the rest."""
    per_call = {name: s.cpu / max(s.calls, 1) * 1e6 for name, s in results.items()}
    raw, client, runner = per_call[RAW], per_call["provider client only"], per_call["runner"]
    hooks = results[HOOKS].hooks
    parts = [f"raw post {raw:.0f}", f"client's own {client - raw:+.0f}"]
    parts += [
        f"{name.removeprefix('byok_')} {cpu * 1e6:.0f}"
        for name, cpu in sorted(hooks.items(), key=lambda item: -item[1])
    ]
    rest = runner - client - sum(hooks.values()) * 1e6
    return f"  runner CPU {runner:.0f} us/call = " + ", ".join(parts) + f", runner's own {rest:.0f}"


def paired_ratio(path: Samples, raw: Samples) -> float:
    """The median over adjacent chunks of (path's chunk median / raw's chunk median)."""
    ratios = [
        statistics.median(a) / statistics.median(b)
        for a, b in zip(path.chunks, raw.chunks, strict=True)
        if a and b
    ]
    return statistics.median(ratios)


def main() -> None:
    port = free_port()
    emulator = start_emulator(port)
    try:
        with tempfile.TemporaryDirectory(prefix="byok-bench-") as tmp:
            api_key = realistic_key("openai")
            master = generate_master_key()
            environ = {
                "BYOK_HOME": str(Path(tmp) / "home"),
                "BYOK_ENCRYPTION_KEYS": f"{master.id}:{base64.b64encode(master.secret).decode()}",
                "BYOK_VALIDATE_KEYS": "0",
                "BYOK_LOAD_PLUGINS": "byok_plugin",
                **describe(f"http://127.0.0.1:{port}"),
            }
            app = App(Settings.from_environ(environ))
            KeyService.for_app(app, plugin_manager_for(app)).set_key(
                OPERATOR, WORKSPACE, "openai", api_key, test=False
            )
            print(
                f"{CALLS} one-agent-block runs per path and concurrency (BYOK workspace: resolve from "
                f"the SQLite store, call, charge, record to the SQLite ledger) against {CALLS} raw "
                f"httpx posts of the same request; emulator in its own process on loopback; "
                f"{os.cpu_count()} CPUs"
            )
            pm = plugin_manager_for(app)
            threaded = WorkflowRunner(pm, {}).hooks_in_thread()
            print(
                f"runner's default: hooks {'in a worker thread' if threaded else 'on the event loop'}"
            )
            worst = 0.0
            summary = []
            for concurrency in CONCURRENCY:
                results = asyncio.run(measure(environ, api_key, pm, concurrency))
                raw = results[RAW]
                raw_median = statistics.median(raw.times)
                print(f"\nconcurrency {concurrency}")
                for name, sample in results.items():
                    if name == HOOKS:
                        continue
                    median = statistics.median(sample.times)
                    p90 = statistics.quantiles(sample.times, n=10)[-1]
                    failed = f"   {sample.failures} failed" if sample.failures else ""
                    print(
                        f"  {name:<22} median {median * 1e3:8.3f} ms   p90 {p90 * 1e3:8.3f} ms   "
                        f"{sample.calls / sample.wall:8.1f} blocks/s   "
                        f"CPU {sample.cpu / max(sample.calls, 1) * 1e3:6.3f} ms/call   "
                        f"{median / raw_median:5.2f}x raw (paired {paired_ratio(sample, raw):5.2f}x)"
                        f"{failed}"
                    )
                print(layers_line(results))
                ratio = paired_ratio(results["runner"], raw)
                worst = max(worst, ratio)
                verdict = "OK" if ratio <= TARGET else "OVER TARGET"
                print(
                    f"  runner / raw median per-call time, paired: {ratio:.3f}x "
                    f"(target <= {TARGET}x) {verdict}"
                )
                summary.append(
                    (
                        concurrency,
                        results["runner"].calls / results["runner"].wall,
                        raw.calls / raw.wall,
                        ratio,
                    )
                )
            print("\nblocks/s      runner      raw   runner/raw per-call")
            for concurrency, runner_rate, raw_rate, ratio in summary:
                print(f"  c={concurrency:<4} {runner_rate:9.1f} {raw_rate:8.1f}   {ratio:6.3f}x")
            rows = app.ledger.count()
            app.close()
            print(f"\nledger rows written: {rows}")
            print(
                f"worst runner / raw ratio: {worst:.3f}x ({'OK' if worst <= TARGET else 'OVER TARGET'})"
            )
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)


if __name__ == "__main__":
    main()
