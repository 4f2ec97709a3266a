"""``byok_prepare``: the store, catalog and prices load in a worker thread when a runner opens,
not on the event loop during its first run (real SQLite store, real emulator)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from byok_hookspecs import hookimpl

from byok_plugin.app import App
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.demo import PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.runner import WorkflowRunner
from byok_plugin.host.workflow import parse_workflow

ONE_BLOCK = {
    "name": "one",
    "version": "1",
    "blocks": {"answer": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Say hello."}},
}
LOADED = ("engine", "ledger", "durable_ledger", "catalog", "prices", "billing", "resolver")


class Where:
    """Records the thread ``byok_prepare`` ran on."""

    def __init__(self, fail: bool = False) -> None:
        self.threads: list[int] = []
        self.fail = fail

    @hookimpl
    def byok_prepare(self) -> None:
        self.threads.append(threading.get_ident())
        if self.fail:
            raise RuntimeError("the metering backend is not there")


def loaded(app: App) -> list[str]:
    return [name for name in LOADED if name in app.__dict__]


def test_hook_byok_prepare_loads_the_store_catalog_and_prices_off_the_event_loop(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    stack = DemoStack(tmp_path / "home", emulator)
    try:
        where = Where()
        stack.pm.register(where)
        # the catalog and prices are read and checked as the manager is built (a bad file stops
        # the host at start-up, issue 21); the store waits for byok_prepare
        assert loaded(stack.app) == ["catalog", "prices", "billing"]

        async def go() -> Any:
            loop_thread = threading.get_ident()
            async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
                assert loaded(stack.app) == list(LOADED)  # before any run
                assert len(where.threads) == 1
                assert where.threads[0] != loop_thread
                result = await runner.run(
                    parse_workflow(ONE_BLOCK), actor=OPERATOR, workspace_id=PLATFORM_WORKSPACE
                )
                second = await runner.run(
                    parse_workflow(ONE_BLOCK), actor=OPERATOR, workspace_id=PLATFORM_WORKSPACE
                )
            assert len(where.threads) == 1  # once per runner
            return result, second

        result, second = asyncio.run(go())
        assert result.ok, result.error
        assert second.ok, second.error
        assert stack.app.ledger.count() == 2
    finally:
        stack.close()


def test_hook_byok_prepare_runs_before_the_first_run_of_a_runner_built_without_open(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    from byok_plugin.host.providers import create_clients, new_http_client

    stack = DemoStack(tmp_path / "home", emulator)
    try:
        where = Where()
        stack.pm.register(where)

        async def go() -> Any:
            http = new_http_client(max_connections=4, max_keepalive=4)
            try:
                clients = create_clients(http, environ=stack.environ)
                runner = WorkflowRunner(stack.pm, clients, environ=stack.environ)
                assert where.threads == []
                result = await runner.run(
                    parse_workflow(ONE_BLOCK), actor=OPERATOR, workspace_id=PLATFORM_WORKSPACE
                )
                await runner.drain()
                return result
            finally:
                await http.aclose()

        assert asyncio.run(go()).ok
        assert len(where.threads) == 1
    finally:
        stack.close()


def test_hook_byok_prepare_that_fails_is_logged_and_the_runner_goes_on(
    emulator: EmulatorServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stack = DemoStack(tmp_path / "home", emulator)
    try:
        stack.pm.register(Where(fail=True))

        async def go() -> Any:
            async with WorkflowRunner.open(stack.pm, environ=stack.environ) as runner:
                return await runner.run(
                    parse_workflow(ONE_BLOCK), actor=OPERATOR, workspace_id=PLATFORM_WORKSPACE
                )

        with caplog.at_level(logging.WARNING, logger="byok.host.runner"):
            result = asyncio.run(go())
        assert result.ok, result.error
        assert "byok_prepare failed: RuntimeError: the metering backend is not there" in caplog.text
    finally:
        stack.close()
