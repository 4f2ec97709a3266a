"""Calls sent and never answered (``uncertain``), through the real plugin (its ledger on a SQLite
file), the runner and the emulator over loopback HTTP: the row carries the list cost of the
request's estimated input (charged nothing), and ``byok usage`` and ``byok reconcile`` show it
apart from what providers reported, in the table, JSON and CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from byok_hookspecs import CredentialSource
from click.testing import CliRunner

from byok_plugin.cli import main
from byok_plugin.cli.demo import OPERATOR, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.providers import NO_RETRY, create_clients, new_http_client
from byok_plugin.host.run_result import RunResult
from byok_plugin.host.runner import RunnerOptions, WorkflowRunner
from byok_plugin.host.workflow import parse_workflow

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
    yield built
    built.close()


def run(
    stack: DemoStack, *, timeout: float | None = None, wrap: Callable[[Any], Any] | None = None
) -> RunResult:
    async def go() -> RunResult:
        async with new_http_client() as http:
            clients = create_clients(http, environ=stack.environ, retry=NO_RETRY, timeout=timeout)
            if wrap is not None:
                clients["anthropic"] = wrap(clients["anthropic"])
            runner = WorkflowRunner(
                stack.pm,
                clients,
                environ=stack.environ,
                options=RunnerOptions(block_retries=0),
            )
            try:
                return await runner.run(
                    ONE_CALL, actor=OPERATOR, workspace_id=PLATFORM_WORKSPACE, inputs={}
                )
            finally:
                await runner.drain()

    return asyncio.run(go())


def test_an_uncertain_row_carries_its_estimated_input_cost_and_the_reports_show_it(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    emulator.add_fault(Fault(FaultKind.SLOW, provider="anthropic", delay=1.0, times=1))
    assert not run(stack, timeout=0.2).ok
    assert run(stack).ok  # the same request, answered: what the provider counts
    rows = {r.status: r for r in stack.app.ledger.rows()}
    uncertain, done = rows["uncertain"], rows["complete"]
    assert uncertain.source is CredentialSource.PLATFORM
    # the estimate is the budget's bound of the request: never below what the provider counted
    assert uncertain.input_tokens >= done.input_tokens > 0
    assert uncertain.output_tokens == 0
    assert (uncertain.estimated, done.estimated) == (("input_tokens",), ())
    # not charged; its list cost is the estimate at 3 USD per 1M input tokens (claude-sonnet-4-5)
    assert (uncertain.amount, uncertain.reason) == (0, "uncertain")
    assert uncertain.list_cost == Decimal(3) * uncertain.input_tokens / 1_000_000
    assert done.list_cost is not None
    stack.app.close()

    cli = CliRunner()
    usage = cli.invoke(main, ["usage", "--json"], env=stack.environ)
    assert usage.exit_code == 0, usage.output
    totals = json.loads(usage.output)["totals"]
    assert totals["calls"] == 2
    assert totals["uncertain_calls"] == 1
    assert Decimal(totals["uncertain_estimated_cost"]) == uncertain.list_cost
    # the reported columns stay what the provider reported: the estimate is kept apart
    assert totals["input_tokens"] == done.input_tokens
    assert Decimal(totals["list_cost"]) == done.list_cost
    assert Decimal(totals["charged"]) == done.amount

    # the rows' days are the UTC days the host stamped them with: one day, or two when a
    # midnight fell between the two runs (the reports must then split them the same way)
    uncertain_day, done_day = (r.occurred_at.date().isoformat() for r in (uncertain, done))
    as_csv = cli.invoke(main, ["usage", "--csv", "--by", "day"], env=stack.environ)
    assert as_csv.exit_code == 0, as_csv.output
    by_day = {line["day"]: line for line in csv.DictReader(io.StringIO(as_csv.output))}
    assert sorted(by_day) == sorted({uncertain_day, done_day})
    line = by_day[uncertain_day]
    assert line["uncertain_calls"] == "1"
    assert Decimal(line["uncertain_estimated_cost"]) == uncertain.list_cost

    table = cli.invoke(main, ["usage"], env={**stack.environ, "COLUMNS": "300"})
    assert table.exit_code == 0, table.output
    assert "1 uncertain calls (sent, never answered, not charged): estimated $" in table.output

    reconciled = cli.invoke(main, ["reconcile", "-p", "anthropic", "--json"], env=stack.environ)
    assert reconciled.exit_code == 0, reconciled.output
    lines = {line["day"]: line for line in json.loads(reconciled.output)["lines"]}
    assert sorted(lines) == sorted({uncertain_day, done_day})  # one platform key: a line a day
    totals = {n: sum(line[n] for line in lines.values()) for n in ("calls", "unpriced_calls")}
    assert totals == {"calls": 2, "unpriced_calls": 0}
    assert lines[uncertain_day]["uncertain_calls"] == 1
    assert Decimal(lines[uncertain_day]["uncertain_estimated_cost"]) == uncertain.list_cost
    assert sum(Decimal(line["list_cost"]) for line in lines.values()) == done.list_cost
    shown = cli.invoke(main, ["reconcile", "-p", "anthropic"], env=stack.environ)
    assert shown.exit_code == 0, shown.output
    assert "1 uncertain calls" in shown.output
    assert "(estimated $" in shown.output


# --- interrupted OpenAI-shaped streams: the input is reported only in the last chunk -------------


@pytest.mark.parametrize(
    ("model", "input_price", "output_price"),
    [("gpt-4o-mini", "0.15", "0.60"), ("mistral-small-latest", "0.06", "0.18")],
)
def test_a_cut_openai_shaped_stream_counts_its_estimated_input_and_the_deltas(
    stack: DemoStack, emulator: EmulatorServer, model: str, input_price: str, output_price: str
) -> None:
    workflow = parse_workflow(
        {
            "name": "one",
            "version": "1",
            "blocks": {"a": {"type": "agent", "model": model, "prompt": "Say hello"}},
        }
    )
    provider = "openai" if model.startswith("gpt") else "mistral"
    emulator.add_fault(Fault(FaultKind.TRUNCATED_STREAM, provider=provider, times=1))

    async def go() -> RunResult:
        async with new_http_client() as http:
            clients = create_clients(http, environ=stack.environ, retry=NO_RETRY)
            runner = WorkflowRunner(
                stack.pm, clients, environ=stack.environ, options=RunnerOptions(block_retries=1)
            )
            try:
                return await runner.run(
                    workflow,
                    actor=OPERATOR,
                    workspace_id=PLATFORM_WORKSPACE,
                    inputs={},
                    stream=True,
                )
            finally:
                await runner.drain()

    result = asyncio.run(go())
    assert result.ok, result.error
    cut, done = sorted(stack.app.ledger.rows(), key=lambda r: r.idempotency_key)
    assert (cut.status, done.status) == ("interrupted", "complete")
    assert (cut.estimated, done.estimated) == (("input_tokens",), ())
    # the input bound of the request, never below what the provider counted for the same request
    assert cut.input_tokens >= done.input_tokens > 0
    assert 0 < cut.output_tokens <= done.output_tokens  # the deltas received before the cut
    expected = (
        Decimal(input_price) * cut.input_tokens + Decimal(output_price) * cut.output_tokens
    ) / 1_000_000
    assert cut.amount == cut.list_cost == expected > 0
    assert cut.reason == "platform"
    stack.app.close()
    usage = CliRunner().invoke(main, ["usage", "--json"], env=stack.environ)
    assert usage.exit_code == 0, usage.output
    totals = json.loads(usage.output)["totals"]
    assert (totals["calls"], totals["estimated_calls"]) == (2, 1)
    assert totals["input_tokens"] == cut.input_tokens + done.input_tokens  # charged, so counted
    table = CliRunner().invoke(main, ["usage"], env={**stack.environ, "COLUMNS": "300"})
    assert "1 calls charged on an estimated input (streams cut" in table.output


class FailsAfterTheCall:
    """A provider client with a bug: it sends the request, gets the provider's answer, then
    fails reading it with an error that is not a ``ProviderError``."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def complete(self, request: Any, *, api_key: str) -> Any:
        await self._client.complete(request, api_key=api_key)
        raise KeyError("a field this client did not foresee")


def test_a_client_failing_after_the_call_leaves_an_uncertain_row(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    """The call was made (the emulator answered it): whatever the client raises then, the call
    is recorded ``uncertain``, not lost; on the platform key it is not tried again."""
    result = run(stack, wrap=FailsAfterTheCall)
    assert not result.ok
    assert "client failed while calling (KeyError)" in (result.error or "")
    assert len([c for c in emulator.calls() if c.method == "POST"]) == 1
    (row,) = stack.app.ledger.rows()
    assert (row.status, row.amount, row.source) == (
        "uncertain",
        Decimal(0),
        CredentialSource.PLATFORM,
    )
