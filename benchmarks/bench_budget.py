"""The runner's per-call time with a workspace budget against without one, in the same run.

Two platform-billed workspaces in one store: ``plain`` has no budget, ``budgeted`` a hard monthly
budget large enough never to refuse. Each run is one agent block through :class:`WorkflowRunner`
and the real plugin, against the emulator in its own process. With a budget every call adds
``byok_compute_charge`` of its worst case, ``byok_reserve_budget`` (on SQLite one write
transaction: expire lapsed holds, the conditional admission, the hold's row; on PostgreSQL one
statement) and its settlement (on SQLite ``byok_settle_budget``, another transaction; on
PostgreSQL inside the group commit's transaction); without one, the reserve finds no budget (a
read on SQLite, the same one statement on PostgreSQL). The paths alternate in adjacent
chunks, as in ``bench_runner``; the verdict is the paired ratio of median per-call times.

The store is a SQLite file, or ``BENCH_BUDGET_DATABASE_URL`` (a PostgreSQL database, say).

Target: with a budget at most 1.15x the per-call time without.
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.bench_runner import (
    WORKFLOW,
    Call,
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
from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

CALLS = int(os.environ.get("BENCH_BUDGET_CALLS", "1000"))
CONCURRENCY = tuple(int(c) for c in os.environ.get("BENCH_BUDGET_CONCURRENCY", "1,16").split(","))
TARGET = 1.15
PATHS = {"no budget": "plain", "hard budget": "budgeted"}


async def measure(environ: dict[str, str], pm: object, concurrency: int) -> dict[str, Samples]:
    options = RunnerOptions(max_concurrent_calls=concurrency, block_retries=0)
    async with WorkflowRunner.open(pm, environ=environ, options=options) as runner:  # type: ignore[arg-type]

        def through(workspace: str) -> Call:
            async def run() -> None:
                result = await runner.run(WORKFLOW, workspace_id=workspace, actor=OPERATOR)
                if not result.ok:
                    raise RuntimeError(result.error)

            return run

        paths = {name: through(ws) for name, ws in PATHS.items()}
        for call in paths.values():  # warm-up
            await chunk(call, max(concurrency * 2, 20), concurrency, Samples())
        size = 1 if concurrency == 1 else min(CALLS, concurrency * 4)
        results = await alternate(paths, CALLS, size, concurrency)
    return results


def main() -> None:
    port = free_port()
    emulator = start_emulator(port)
    try:
        with tempfile.TemporaryDirectory(prefix="byok-bench-") as tmp:
            master = generate_master_key()
            environ = {
                "BYOK_HOME": str(Path(tmp) / "home"),
                "BYOK_ENCRYPTION_KEYS": f"{master.id}:{base64.b64encode(master.secret).decode()}",
                "BYOK_VALIDATE_KEYS": "0",
                "BYOK_LOAD_PLUGINS": "byok_plugin",
                "BYOK_PLATFORM_KEYS_OPENAI": realistic_key("openai"),
                **describe(f"http://127.0.0.1:{port}"),
            }
            if os.environ.get("BENCH_BUDGET_DATABASE_URL"):
                environ["BYOK_DATABASE_URL"] = os.environ["BENCH_BUDGET_DATABASE_URL"]
            app = App(Settings.from_environ(environ))
            app.budgets.set_budget(PATHS["hard budget"], "monthly", limit="1000000")
            pm = plugin_manager_for(app)
            store = app.engine.dialect.name
            threaded = WorkflowRunner(pm, {}).hooks_in_thread()
            print(
                f"{CALLS} one-agent-block platform-billed runs per path and concurrency, with and "
                f"without a hard budget, {store} store, hooks "
                f"{'in a worker thread' if threaded else 'on the event loop'}; emulator in its "
                f"own process; {os.cpu_count()} CPUs"
            )
            worst = 0.0
            for concurrency in CONCURRENCY:
                results = asyncio.run(measure(environ, pm, concurrency))
                base = results["no budget"]
                print(f"\nconcurrency {concurrency}")
                for name, sample in results.items():
                    median = statistics.median(sample.times)
                    failed = f"   {sample.failures} failed" if sample.failures else ""
                    print(
                        f"  {name:<12} median {median * 1e3:8.3f} ms   "
                        f"{sample.calls / sample.wall:8.1f} blocks/s   "
                        f"CPU {sample.cpu / max(sample.calls, 1) * 1e3:6.3f} ms/call{failed}"
                    )
                ratio = paired_ratio(results["hard budget"], base)
                worst = max(worst, ratio)
                print(
                    f"  budget / no budget median per-call time, paired: {ratio:.3f}x "
                    f"(target <= {TARGET}x) {'OK' if ratio <= TARGET else 'OVER TARGET'}"
                )
            spent = app.budgets.get(PATHS["hard budget"], "monthly")
            app.close()
            print(f"\nbudget after the runs: {spent.as_dict() if spent else None}")
            print(f"worst ratio: {worst:.3f}x ({'OK' if worst <= TARGET else 'OVER TARGET'})")
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)


if __name__ == "__main__":
    main()
