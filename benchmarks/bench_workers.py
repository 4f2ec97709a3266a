"""N worker processes against one PostgreSQL and the emulator (issue 18): calls/s and per-call
overhead of the runner over raw posts, measured in the same run.

Each worker process runs one-agent-block workflows through :class:`WorkflowRunner` and the real
plugin (resolve the workspace's stored BYOK key, call the emulator, charge, record the ledger row)
at concurrency ``BENCH_WORKERS_CONCURRENCY`` (16), alternating adjacent chunks with raw
``httpx`` posts of the same request, as ``bench_runner`` does. On PostgreSQL the runner calls the
hooks in a worker thread and group-commits the ledger rows (one writer per process); on SQLite
(one process, the baseline of the PostgreSQL path's overhead) it calls them on the event loop.
The workers start together (a barrier); the emulator runs in its own process.

- **calls/s**: every worker's runner calls over the longest worker's runner wall time;
- **overhead**: a worker's median per-call time through the runner minus the raw posts' (median
  over the workers), and the paired runner/raw ratio (median over adjacent chunks);
- **CPU ms/call**: the workers' own CPU time in their runner chunks, and the PostgreSQL server's
  (its processes on this machine, read from ``/proc``; the SQLite row's is the idle server's)
  over the runner calls: on a machine whose cores the server shares with the workers and the
  emulator, the server's share is a cost the SQLite path does not pay;
- **cores busy**: the CPU time of the workers, the PostgreSQL server and the emulator over the
  measured wall time (the machine's core count is saturation: adding workers cannot add calls).

Targets (issue 18): the PostgreSQL path's overhead within 1.5x of the SQLite path's; the runner
within 1.25x of raw at c=16 on SQLite (``bench_runner``); throughput rising with workers until
the emulator or the CPUs saturate. Needs ``BYOK_TEST_POSTGRES_URL`` (a role that may create
databases); ``BENCH_WORKERS=1,4,8`` and ``BENCH_WORKERS_CALLS=400`` (per path and worker) change
the sizes. ``BENCH_SWITCH_INTERVAL`` (seconds, e.g. ``0.0005``) sets every worker's
``sys.setswitchinterval`` (Python's default is 0.005): a thread that wants the GIL while the
event loop's thread runs waits up to that long, and the PostgreSQL group writer is such a
thread (a measurement knob; the package sets nothing process-wide).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from benchmarks.bench_runner import (
    MODEL,
    PROMPT,
    SYSTEM,
    WORKFLOW,
    WORKSPACE,
    Samples,
    alternate,
    chunk,
    free_port,
    paired_ratio,
    start_emulator,
)
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
from byok_plugin.keys.service import KeyService
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

WORKERS = tuple(int(n) for n in os.environ.get("BENCH_WORKERS", "1,4,8").split(","))
SWITCH_INTERVAL = os.environ.get("BENCH_SWITCH_INTERVAL", "")
CALLS = int(os.environ.get("BENCH_WORKERS_CALLS", "400"))
CONCURRENCY = int(os.environ.get("BENCH_WORKERS_CONCURRENCY", "16"))
RUNNER, RAW = "runner", "raw"


async def _worker(environ: dict[str, str], api_key: str, group_commit: bool) -> dict[str, Any]:
    if SWITCH_INTERVAL:
        sys.setswitchinterval(float(SWITCH_INTERVAL))
    app = App(Settings.from_environ(environ))
    pm = plugin_manager_for(app, load_entrypoints=False)
    size = max(CONCURRENCY, 10)
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    options = RunnerOptions(
        max_concurrent_calls=CONCURRENCY, block_retries=0, group_commit=group_commit
    )
    async with httpx.AsyncClient(limits=limits, trust_env=False) as http:
        runner = WorkflowRunner(
            pm,
            create_clients(http, environ=environ, retry=NO_RETRY),
            environ=environ,
            options=options,
        )
        await runner.prepare()
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

        errors: list[str] = []  # the first few failures, said after the table

        def failed(path: str, error: object) -> None:
            if len(errors) < 3:
                errors.append(f"{path}: {str(error)[:300]}")

        async def raw() -> None:
            try:
                response = await http.post(url, content=content, headers=headers, timeout=60.0)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                failed(RAW, f"{type(exc).__name__}: {exc}")
                raise
            response.json()

        async def run() -> None:
            result = await runner.run(WORKFLOW, workspace_id=WORKSPACE, actor=OPERATOR)
            if not result.ok:
                failed(RUNNER, result.error)
                raise RuntimeError(result.error)

        paths = {RUNNER: run, RAW: raw}
        for call in paths.values():  # warm-up: connections, caches, threads
            await chunk(call, CONCURRENCY * 2, CONCURRENCY, Samples())
        print("ready", flush=True)
        sys.stdin.readline()  # the barrier: every worker starts together
        results = await alternate(paths, CALLS, CONCURRENCY * 4, CONCURRENCY)
        await runner.drain()
    app.close()
    return {
        "threaded": runner.hooks_in_thread(),
        "errors": errors,
        "ratio": paired_ratio(results[RUNNER], results[RAW]),
        **{
            f"{name}_{what}": value
            for name, s in results.items()
            for what, value in (
                ("calls", s.calls),
                ("wall", s.wall),
                ("median", statistics.median(s.times)),
                ("failures", s.failures),
                ("cpu", s.cpu),
            )
        },
    }


def _cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time used so far (Linux ``/proc``): by process ``pid``, or, when ``None``, by this
    machine's PostgreSQL server processes (the postmaster's exited children are in its
    ``cutime``/``cstime``); ``None`` when there is none here (a server on another machine)."""
    ticks, total, found = os.sysconf("SC_CLK_TCK"), 0, False
    stats = [Path(f"/proc/{pid}/stat")] if pid is not None else Path("/proc").glob("[0-9]*/stat")
    for stat in stats:
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        if pid is None and text[text.find("(") + 1 : text.rfind(")")] != "postgres":
            continue
        fields = text[text.rfind(")") + 2 :].split()
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        found = True
    return total / ticks if found else None


def _start(
    n: int, environ: dict[str, str], api_key: str, group_commit: bool, emulator: int
) -> dict[str, Any]:
    server_cpu, emulator_cpu = _cpu_seconds(), _cpu_seconds(emulator)
    env = {**os.environ, **environ, "BENCH_API_KEY": api_key}
    env["BENCH_GROUP_COMMIT"] = "1" if group_commit else "0"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_workers", "--worker"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a worker did not start: {line!r}")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = [
        json.loads(proc.communicate(timeout=1800)[0].strip().splitlines()[-1]) for proc in procs
    ]
    server_after, emulator_after = _cpu_seconds(), _cpu_seconds(emulator)
    others = [
        after - before
        for before, after in ((server_cpu, server_after), (emulator_cpu, emulator_after))
        if before is not None and after is not None
    ]
    runner_calls = sum(o["runner_calls"] for o in outs)
    wall = max(o["runner_wall"] for o in outs)
    raw_wall = max(o["raw_wall"] for o in outs)
    return {
        "workers": n,
        "threaded": outs[0]["threaded"],
        "calls_per_s": sum(o["runner_calls"] for o in outs) / wall,
        "raw_per_s": sum(o["raw_calls"] for o in outs) / raw_wall,
        "overhead_ms": statistics.median(
            (o["runner_median"] - o["raw_median"]) * 1e3 for o in outs
        ),
        "runner_ms": statistics.median(o["runner_median"] * 1e3 for o in outs),
        "raw_ms": statistics.median(o["raw_median"] * 1e3 for o in outs),
        "ratio": statistics.median(o["ratio"] for o in outs),
        "worker_cpu_ms": sum(o["runner_cpu"] for o in outs) / max(runner_calls, 1) * 1e3,
        "server_cpu_ms": (
            (server_after - server_cpu) / max(runner_calls, 1) * 1e3
            if server_cpu is not None and server_after is not None
            else None
        ),
        # every process's CPU over the measured wall time: 2.0 on 2 cores is saturation
        "cores_busy": (sum(o["runner_cpu"] + o["raw_cpu"] for o in outs) + sum(others))
        / max(max(o["runner_wall"] + o["raw_wall"] for o in outs), 1e-9),
        "failures": sum(o["runner_failures"] + o["raw_failures"] for o in outs),
        "runner_failures": sum(o["runner_failures"] for o in outs),
        "errors": [e for o in outs for e in o["errors"]][:3],
    }


def _store_key(environ: dict[str, str], api_key: str) -> None:
    app = App(Settings.from_environ(environ))
    try:
        KeyService.for_app(app, plugin_manager_for(app, load_entrypoints=False)).set_key(
            OPERATOR, WORKSPACE, "openai", api_key, test=False
        )
    finally:
        app.close()


def main() -> None:
    server = os.environ.get("BYOK_TEST_POSTGRES_URL")
    if not server:
        print("bench_workers: set BYOK_TEST_POSTGRES_URL (a role that may create databases)")
        return
    name = f"byok_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    port = free_port()
    emulator = start_emulator(port)
    try:
        with tempfile.TemporaryDirectory(prefix="byok-bench-") as tmp:
            api_key = realistic_key("openai")
            master = generate_master_key()
            base = {
                "BYOK_ENCRYPTION_KEYS": f"{master.id}:{base64.b64encode(master.secret).decode()}",
                "BYOK_VALIDATE_KEYS": "0",
                "BYOK_LOAD_PLUGINS": "byok_plugin",
                "BYOK_DB_POOL_SIZE": "5",
                "BYOK_DB_MAX_OVERFLOW": "5",
                **describe(f"http://127.0.0.1:{port}"),
            }
            sqlite_env = {**base, "BYOK_HOME": str(Path(tmp) / "sqlite")}
            pg_url = make_url(server).set(database=name).render_as_string(hide_password=False)
            pg_env = {**base, "BYOK_HOME": str(Path(tmp) / "pg"), "BYOK_DATABASE_URL": pg_url}
            _store_key(sqlite_env, api_key)
            _store_key(pg_env, api_key)
            print(
                f"{CALLS} one-agent-block runs and {CALLS} raw posts per worker, c={CONCURRENCY} "
                f"per worker, emulator in its own process on loopback; {os.cpu_count()} CPUs"
                + (f"; switch interval {SWITCH_INTERVAL} s" if SWITCH_INTERVAL else "")
            )
            rows = [("SQLite", _start(1, sqlite_env, api_key, True, emulator.pid))]
            for n in WORKERS:
                rows.append(("PostgreSQL", _start(n, pg_env, api_key, True, emulator.pid)))
            rows.append(
                (
                    "PostgreSQL, commit per call",
                    _start(max(WORKERS), pg_env, api_key, False, emulator.pid),
                )
            )
            print(
                f"\n{'store':<28}{'workers':>8}{'hooks':>8}{'calls/s':>10}{'raw/s':>9}"
                f"{'runner ms':>11}{'raw ms':>8}{'overhead ms':>13}{'paired':>8}"
                f"{'cores busy':>11}{'CPU ms/call: worker':>21}{'PostgreSQL':>11}"
            )
            for store, r in rows:
                print(
                    f"{store:<28}{r['workers']:>8}{'thread' if r['threaded'] else 'loop':>8}"
                    f"{r['calls_per_s']:>10.1f}{r['raw_per_s']:>9.1f}{r['runner_ms']:>11.2f}"
                    f"{r['raw_ms']:>8.2f}{r['overhead_ms']:>13.3f}{r['ratio']:>7.2f}x"
                    f"{r['cores_busy']:>11.2f}{r['worker_cpu_ms']:>21.3f}"
                    + (f"{r['server_cpu_ms']:>11.3f}" if r["server_cpu_ms"] is not None else "")
                    + (
                        f"  {r['failures']} failed ({r['runner_failures']} runner)"
                        if r["failures"]
                        else ""
                    )
                )
            for store, r in rows:
                for error in r["errors"]:
                    print(f"  failed, {store}, {r['workers']} workers: {error}")
            sqlite_overhead = rows[0][1]["overhead_ms"]
            pg_one = rows[1][1]["overhead_ms"]
            print(
                f"\nPostgreSQL (1 worker) overhead / SQLite overhead: "
                f"{pg_one / sqlite_overhead if sqlite_overhead > 0 else float('inf'):.2f}x "
                f"(target <= 1.5x)"
            )
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"
                ),
                {"d": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        result = asyncio.run(
            _worker(
                dict(os.environ),
                os.environ["BENCH_API_KEY"],
                os.environ.get("BENCH_GROUP_COMMIT", "1") == "1",
            )
        )
        print(json.dumps(result), flush=True)
    else:
        main()
