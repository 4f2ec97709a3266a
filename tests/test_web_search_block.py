"""An agent block's ``web_search``: the provider's own web search, enabled in a workflow.

- the setting is checked where the workflow is loaded, with a JSON path: a provider or model
  without a web search of its own is refused there, as are settings it cannot honour;
- the runner sends the tool (Anthropic ``web_search_20250305``, Gemini ``googleSearch``) and names
  it in ``CredentialRequest.tools``: a platform call whose tool has no price is refused before it
  is sent, and the budget hold counts the searches;
- end to end over real HTTP against the emulator, the real plugin on a SQLite file and on
  PostgreSQL: a platform call is charged its tokens (the search results' included) plus its
  searches, to the cent of a hand computation; a BYOK call is charged $0 with its list cost kept.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from byok_hookspecs import CredentialSource, Usage

from byok_plugin.billing.budgets import UNIT, budget_holds
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.emulator.apis.anthropic import SEARCH_RESULT_TOKENS
from byok_plugin.host.emulator.apis.google import GROUNDING_TOOL_TOKENS
from byok_plugin.host.run_result import CallResult, RunResult, RunStatus
from byok_plugin.host.runner import RunnerOptions
from byok_plugin.host.workflow import (
    AgentBlock,
    WebSearch,
    WorkflowError,
    parse_workflow,
    workflow_schema,
)

D = Decimal
MILLION = D(1_000_000)
# the shipped table's list prices (byok_plugin/data/prices.json), written out by hand
SONNET_IN, SONNET_OUT, ANTHROPIC_SEARCH = D(3), D(15), D("0.01")
FLASH_IN, FLASH_OUT, GROUNDED_PROMPT = D("0.30"), D("2.50"), D("0.035")


def workflow(**agent: Any) -> dict[str, Any]:
    block = {"type": "agent", "prompt": "What is the weather in {{inputs.city}}?", **agent}
    return {
        "name": "weather",
        "version": "1",
        "inputs": {"city": {"type": "string"}},
        "blocks": {"ask": block},
    }


def problems_of(document: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(WorkflowError) as caught:
        parse_workflow(document)
    return [(p.path, p.message) for p in caught.value.problems]


def agent(document: dict[str, Any]) -> AgentBlock:
    block = parse_workflow(document).blocks["ask"]
    assert isinstance(block, AgentBlock)
    return block


# --- loading ------------------------------------------------------------------------------------
def test_the_setting_is_read_with_anthropics_default_bound() -> None:
    assert agent(workflow(model="claude-sonnet-4-5", web_search=True)).web_search == WebSearch(5)
    limited = workflow(model="claude-sonnet-4-5", web_search={"max_uses": 2})
    assert agent(limited).web_search == WebSearch(2)
    assert agent(workflow(model="gemini-2.5-flash", web_search={})).web_search == WebSearch()
    assert agent(workflow(model="gemini-2.5-flash", web_search=False)).web_search is None
    assert agent(workflow(model="gemini-2.5-flash")).web_search is None
    search_model = workflow(model="gpt-4o-search-preview", web_search=True)
    assert agent(search_model).web_search == WebSearch()


@pytest.mark.parametrize(
    ("agent_fields", "path", "words"),
    [
        (
            {"model": "mistral-small-latest", "web_search": True},
            "$.blocks.ask.web_search",
            "mistral chat completions have no web search",
        ),
        (
            {"model": "gpt-4o-mini", "web_search": True},
            "$.blocks.ask.web_search",
            "only with a search model",
        ),
        (
            {"model": "gemini-2.5-flash", "web_search": {"max_uses": 3}},
            "$.blocks.ask.web_search.max_uses",
            "only Anthropic limits the searches",
        ),
        (
            {
                "model": "claude-sonnet-4-5",
                "web_search": True,
                "tools": [{"type": "exa_search"}],
            },
            "$.blocks.ask.web_search",
            "not both",
        ),
        (
            {
                "model": "gemini-2.5-flash",
                "web_search": True,
                "response_schema": {"type": "object"},
            },
            "$.blocks.ask.web_search",
            "structured",
        ),
        ({"model": "claude-sonnet-4-5", "web_search": "yes"}, "$.blocks.ask.web_search", ""),
        (
            {"model": "claude-sonnet-4-5", "web_search": {"max_uses": 0}},
            "$.blocks.ask.web_search.max_uses",
            "",
        ),
        (
            {"model": "claude-sonnet-4-5", "web_search": {"max_searches": 2}},
            "$.blocks.ask.web_search.max_searches",
            "did you mean 'max_uses'",
        ),
    ],
)
def test_a_setting_the_provider_cannot_honour_is_refused_with_its_path(
    agent_fields: dict[str, Any], path: str, words: str
) -> None:
    problems = problems_of(workflow(**agent_fields))
    assert [p for p, _ in problems] == [path], problems
    assert words in problems[0][1]


def test_the_schema_documents_the_setting() -> None:
    agent_schema = workflow_schema()["$defs"]["agent"]["properties"]["web_search"]
    assert agent_schema["type"] == ["boolean", "object"]
    assert "Anthropic" in agent_schema["description"]


# --- end to end ---------------------------------------------------------------------------------
@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def run(stack: DemoStack, document: dict[str, Any], workspace: str, **kw: Any) -> CallResult:
    result: RunResult = stack.run(parse_workflow(document), workspace, {"city": "Lyon"}, **kw)
    assert result.status is RunStatus.COMPLETED, result.error
    (call,) = result.blocks["ask"].calls
    return call


def sent_bodies(emulator: EmulatorServer, provider: str) -> list[dict[str, Any]]:
    return [dict(c.body or {}) for c in emulator.calls(provider) if c.method == "POST"]


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_platform_call_is_charged_its_tokens_and_searches(
    stack: DemoStack, stream: bool
) -> None:
    plain = run(stack, workflow(model="claude-sonnet-4-5", max_tokens=200), PLATFORM_WORKSPACE)
    searching = workflow(model="claude-sonnet-4-5", max_tokens=200, web_search=True)
    call = run(stack, searching, PLATFORM_WORKSPACE, stream=stream)
    last = sent_bodies(stack.emulator, "anthropic")[-1]
    assert {"type": "web_search_20250305", "name": "web_search", "max_uses": 5} in last["tools"]
    usage = call.usage
    assert usage.tool_uses == (("web_search", 2),)  # the emulator searches min(max_uses, 2) times
    # the search results are input, billed at the input price
    assert usage.input_tokens == plain.usage.input_tokens + 2 * SEARCH_RESULT_TOKENS
    hand = (
        usage.input_tokens * SONNET_IN / MILLION
        + usage.output_tokens * SONNET_OUT / MILLION
        + 2 * ANTHROPIC_SEARCH
    )
    assert call.source is CredentialSource.PLATFORM
    assert call.charge.amount == hand
    assert call.charge.amount > plain.charge.amount + D("0.02")
    row = stack.app.ledger.get(call.idempotency_key)
    assert row is not None
    assert row.tool_uses == (("web_search", 2),)
    assert row.amount == hand
    assert row.unpriced == ()


def test_a_gemini_grounded_platform_call_is_charged_its_tokens_and_grounded_prompt(
    stack: DemoStack,
) -> None:
    plain = run(stack, workflow(model="gemini-2.5-flash", max_tokens=200), PLATFORM_WORKSPACE)
    grounded = workflow(model="gemini-2.5-flash", max_tokens=200, web_search=True)
    for stream in (False, True):
        call = run(stack, grounded, PLATFORM_WORKSPACE, stream=stream)
        assert {"googleSearch": {}} in sent_bodies(stack.emulator, "google")[-1]["tools"]
        usage = call.usage
        assert usage.tool_uses == (("google_search", 1),)
        assert usage.input_tokens == plain.usage.input_tokens + GROUNDING_TOOL_TOKENS
        hand = (
            usage.input_tokens * FLASH_IN / MILLION
            + (usage.output_tokens + usage.reasoning_tokens) * FLASH_OUT / MILLION
            + GROUNDED_PROMPT
        )
        assert call.charge.amount == hand
        row = stack.app.ledger.get(call.idempotency_key)
        assert row is not None
        assert (row.amount, row.tool_uses) == (hand, (("google_search", 1),))


def test_a_byok_call_that_searched_is_charged_nothing_and_keeps_its_list_cost(
    stack: DemoStack,
) -> None:
    document = workflow(model="claude-sonnet-4-5", max_tokens=200, web_search={"max_uses": 1})
    call = run(stack, document, BYOK_WORKSPACE)
    assert call.source is CredentialSource.WORKSPACE
    usage = call.usage
    assert usage.tool_uses == (("web_search", 1),)
    hand = (
        usage.input_tokens * SONNET_IN / MILLION
        + usage.output_tokens * SONNET_OUT / MILLION
        + ANTHROPIC_SEARCH
    )
    assert call.charge.amount == 0
    assert call.charge.list_cost == hand
    row = stack.app.ledger.get(call.idempotency_key)
    assert row is not None
    assert (row.amount, row.list_cost) == (D(0), hand)


def without_tool_price(stack: DemoStack, provider: str, tool: str) -> None:
    """The stack's price table without ``provider/tool`` (before resolution first reads it)."""
    assert "resolver" not in stack.app.__dict__
    stack.app.__dict__.pop("billing", None)
    prices = stack.app.prices
    tools = {k: v for k, v in prices.tools.items() if k != (provider, tool)}
    stack.app.__dict__["prices"] = dataclasses.replace(prices, tools=MappingProxyType(tools))


def test_a_platform_call_whose_search_has_no_price_is_refused_before_it_is_sent(
    stack: DemoStack,
) -> None:
    without_tool_price(stack, "google", "google_search")
    grounded = parse_workflow(workflow(model="gemini-2.5-flash", web_search=True))
    refused = stack.run(grounded, PLATFORM_WORKSPACE, {"city": "Lyon"})
    assert refused.status is RunStatus.FAILED
    assert refused.blocks["ask"].calls == ()
    assert "tool google/google_search per_request" in (refused.blocks["ask"].error or "")
    assert sent_bodies(stack.emulator, "google") == []  # never sent
    # the same block without search runs on the platform key; with search, on the workspace's
    plain = parse_workflow(workflow(model="gemini-2.5-flash"))
    assert stack.run(plain, PLATFORM_WORKSPACE, {"city": "Lyon"}).ok
    byok = stack.run(grounded, BYOK_WORKSPACE, {"city": "Lyon"})
    assert byok.ok, byok.error
    (call,) = byok.blocks["ask"].calls
    assert call.usage.tool_uses == (("google_search", 1),)
    assert call.charge.amount == 0


def test_the_budget_hold_counts_every_search_the_call_may_make(stack: DemoStack) -> None:
    stack.app.budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="100")
    document = workflow(model="claude-sonnet-4-5", max_tokens=100, web_search={"max_uses": 4})
    call = run(stack, document, PLATFORM_WORKSPACE)
    with stack.app.engine.connect() as conn:
        (hold,) = [r.amount_units for r in conn.execute(sa.select(budget_holds.c.amount_units))]
    held = D(hold) * UNIT
    # four searches at most, their results' allowance as input, and at least max_tokens of output
    allowance = 4 * RunnerOptions().budget_search_input_tokens * SONNET_IN / MILLION
    assert held >= 4 * ANTHROPIC_SEARCH + allowance + 100 * SONNET_OUT / MILLION
    # and not much more: the prompt is short
    assert held < 4 * ANTHROPIC_SEARCH + allowance + D("0.01")
    assert call.charge.amount < held


RECORDINGS = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"
RECORDED_SEARCH = RECORDINGS / "provider-recordings" / "anthropic" / "web_search_stream.sse"


@pytest.mark.skipif(not RECORDED_SEARCH.is_file(), reason=f"no recording at {RECORDED_SEARCH}")
def test_the_hold_covers_what_a_real_searching_call_billed(stack: DemoStack) -> None:
    # a real Anthropic stream (pydantic-ai's cassette) that searched twice: its search results
    # made most of its billed input (22,397 tokens, 2,068 before searching); the hold of a block
    # that may search as often, and writes as much, must cover that bill
    events = sse_data(RECORDED_SEARCH.read_text())
    usage = next(e for e in reversed(events) if e["type"] == "message_delta")["usage"]
    searches = usage["server_tool_use"]["web_search_requests"]
    billed = stack.app.billing.list_cost(
        Usage(
            "anthropic",
            "claude-sonnet-4-5",
            input_tokens=usage["input_tokens"],
            output_tokens=usage["output_tokens"],
            tool_uses=(("web_search", searches),),
        )
    )[0]
    assert billed is not None
    assert (usage["input_tokens"], searches) == (22_397, 2)
    stack.app.budgets.set_budget(PLATFORM_WORKSPACE, "monthly", limit="100")
    document = workflow(
        model="claude-sonnet-4-5",
        max_tokens=usage["output_tokens"],
        web_search={"max_uses": searches},
    )
    run(stack, document, PLATFORM_WORKSPACE)
    with stack.app.engine.connect() as conn:
        (hold,) = [r.amount_units for r in conn.execute(sa.select(budget_holds.c.amount_units))]
    assert D(hold) * UNIT >= billed


# --- the emulator's wire format, as in the recordings -------------------------------------------
def sse_data(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def test_the_emulated_anthropic_stream_reports_searches_as_the_recording_does(
    emulator: EmulatorServer,
) -> None:
    key = emulator.new_key("anthropic")
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Weather in Lyon?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}],
    }
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    url = emulator.base_url("anthropic") + "/v1/messages"
    plain = httpx.post(url, headers=headers, json={**body, "tools": []}).json()
    message = httpx.post(url, headers=headers, json=body).json()
    assert [b["type"] for b in message["content"]] == [
        "server_tool_use",
        "web_search_tool_result",
        "text",
    ]
    assert message["usage"]["server_tool_use"] == {
        "web_search_requests": 1,
        "web_fetch_requests": 0,
    }
    assert "server_tool_use" not in plain["usage"]
    searched = plain["usage"]["input_tokens"] + SEARCH_RESULT_TOKENS
    assert message["usage"]["input_tokens"] == searched
    events = sse_data(httpx.post(url, headers=headers, json={**body, "stream": True}).text)
    start = next(e for e in events if e["type"] == "message_start")
    delta = next(e for e in events if e["type"] == "message_delta")
    # as recordings/anthropic/web_search_stream.sse: the input before the search, then with it
    assert start["message"]["usage"]["input_tokens"] == plain["usage"]["input_tokens"]
    assert delta["usage"]["input_tokens"] == searched
    assert delta["usage"]["server_tool_use"]["web_search_requests"] == 1


def test_the_emulated_gemini_answer_is_grounded_as_the_recording_is(
    emulator: EmulatorServer,
) -> None:
    key = emulator.new_key("google")
    base = emulator.base_url("google") + "/v1beta/models/gemini-2.5-flash"
    body = {
        "contents": [{"role": "user", "parts": [{"text": "Weather in Lyon?"}]}],
        "tools": [{"googleSearch": {}}],
    }
    headers = {"x-goog-api-key": key}
    answer = httpx.post(base + ":generateContent", headers=headers, json=body).json()
    (candidate,) = answer["candidates"]
    assert candidate["groundingMetadata"]["webSearchQueries"] == ["Weather in Lyon?"]
    usage = answer["usageMetadata"]
    assert usage["toolUsePromptTokenCount"] == GROUNDING_TOOL_TOKENS
    assert usage["totalTokenCount"] == (
        usage["promptTokenCount"]
        + usage["candidatesTokenCount"]
        + usage.get("thoughtsTokenCount", 0)
        + GROUNDING_TOOL_TOKENS
    )
    plain = httpx.post(
        base + ":generateContent", headers=headers, json={"contents": body["contents"]}
    ).json()
    assert "groundingMetadata" not in plain["candidates"][0]
    assert "toolUsePromptTokenCount" not in plain["usageMetadata"]
    chunks = sse_data(
        httpx.post(base + ":streamGenerateContent?alt=sse", headers=headers, json=body).text
    )
    grounded = [c for c in chunks if "groundingMetadata" in c["candidates"][0]]
    assert grounded == [chunks[-1]]  # on the last chunk, with the complete usage
    assert chunks[-1]["usageMetadata"]["toolUsePromptTokenCount"] == GROUNDING_TOOL_TOKENS
