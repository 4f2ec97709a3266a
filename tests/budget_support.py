"""Workers for the budget concurrency tests, in a small module that spawned processes import.

Not a test module. Each worker is a whole host: its own App and plugin manager over the shared
store, its own runner, calling the emulator of the test process over loopback HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from byok_plugin.cli.context import OPERATOR
from byok_plugin.host.workflow import Workflow, parse_workflow

WORKSPACE = "globex-platform"


def one_call() -> Workflow:
    """One platform-billed call whose worst case is the same for every input of the same length."""
    return parse_workflow(
        {
            "name": "one-call",
            "version": "1",
            "blocks": {
                "answer": {
                    "type": "agent",
                    "model": "gpt-4o-mini",
                    "prompt": "Say hello to {{inputs.name}}.",
                    "max_tokens": 64,
                }
            },
            "inputs": {"name": {"type": "string"}},
        }
    )


def name_of(worker: int, n: int) -> str:
    return f"w{worker:02d}-{n:04d}"


def run_calls(
    environ: Mapping[str, str],
    worker: int,
    runs: int,
    concurrency: int,
    barrier: Any = None,
    hold_seconds: float = 900.0,
    clock: Callable[[], datetime] | None = None,
) -> dict[str, Any]:
    """``runs`` one-call runs, ``concurrency`` at a time, once every worker reached ``barrier``:
    how many completed, and the error of each run that did not. ``clock`` is the app's (the
    test's, so that every worker reads the same budget period and hold expiry)."""
    from byok_plugin.app import App
    from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
    from byok_plugin.manager import plugin_manager_for
    from byok_plugin.settings import Settings

    settings = Settings.from_environ(dict(environ))
    app = App(settings) if clock is None else App(settings, clock=clock)
    pm = plugin_manager_for(app)
    app.budgets.list_budgets(WORKSPACE)  # connect and migrate before the start line
    workflow = one_call()
    if barrier is not None:
        barrier.wait(timeout=120)

    async def go() -> list[Any]:
        options = RunnerOptions(max_concurrent_calls=concurrency, budget_hold_seconds=hold_seconds)
        async with WorkflowRunner.open(pm, environ=environ, options=options) as runner:
            gate = asyncio.Semaphore(concurrency)

            async def one(n: int) -> Any:
                async with gate:
                    return await runner.run(
                        workflow,
                        actor=OPERATOR,
                        workspace_id=WORKSPACE,
                        inputs={"name": name_of(worker, n)},
                    )

            return await asyncio.gather(*(one(n) for n in range(runs)))

    try:
        results = asyncio.run(go())
    finally:
        app.close()
    return {
        "completed": sum(1 for r in results if r.ok),
        "errors": [r.error for r in results if not r.ok],
    }
