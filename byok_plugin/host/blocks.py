"""What each block type does once it runs: input, condition and output blocks are evaluated,
an agent block asks its model (with Exa search as a tool), a tool block searches; every provider
call goes through :mod:`byok_plugin.host.calls`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from typing import Any

from byok_hookspecs import Usage
from jsonschema import Draft202012Validator

from byok_plugin.host.calls import Calls, _input_bound
from byok_plugin.host.providers.base import ProviderClient
from byok_plugin.host.providers.common import (
    CompletionRequest,
    CompletionResult,
    FunctionTool,
    Message,
    SearchHit,
    SearchRequest,
    SearchResult,
    WebSearchTool,
)
from byok_plugin.host.providers.exa import ExaClient
from byok_plugin.host.run_result import BlockResult, BlockStatus, CallResult
from byok_plugin.host.run_state import BlockFailed, _CallSite, _Run
from byok_plugin.host.workflow import (
    AgentBlock,
    AgentTool,
    Block,
    ConditionBlock,
    InputBlock,
    KeyRef,
    OutputBlock,
    ToolBlock,
    json_path,
)
from byok_plugin.host.workflow.providers import TOOL_PROVIDERS, WEB_SEARCH_TOOLS
from byok_plugin.host.workflow.templates import to_text

EXA_TOOL = "exa_search"
_SEARCH_FUNCTION = FunctionTool(
    name=EXA_TOOL,
    description="Search the web with Exa. Returns the most relevant pages: title, URL and text.",
    parameters={
        "type": "object",
        "properties": {"query": {"type": "string", "description": "What to search for."}},
        "required": ["query"],
    },
)


class Blocks(Calls):
    """Executes one block."""

    async def _execute(
        self, run: _Run, block: Block, attempt: int, calls: list[CallResult]
    ) -> Mapping[str, Any]:
        if isinstance(block, InputBlock):
            return {name: run.inputs[name] for name in block.fields}
        if isinstance(block, ConditionBlock):
            text = block.value.render(run.lookup)
            result = block.test(text)
            return {"result": result, "value": text, "content": "true" if result else "false"}
        if isinstance(block, OutputBlock):
            if block.value is not None:
                value = block.value.evaluate(run.lookup)
                return {"value": value, "content": to_text(value)}
            fields = {name: t.evaluate(run.lookup) for name, t in block.fields.items()}
            return {"fields": fields, "content": to_text(fields)}
        if isinstance(block, ToolBlock):
            query = block.query.render(run.lookup).strip()
            if not query:
                raise BlockFailed("the search query is empty once its references are filled")
            hits, call = await self._search(
                run,
                block.id,
                attempt,
                1,
                _search_request(query, block.num_results, block.search_type, block.include_text),
                block.key,
            )
            calls.append(call)
            return {"results": [_hit_dict(h) for h in hits.hits], "content": _hits_text(hits.hits)}
        assert isinstance(block, AgentBlock)
        return await self._agent(run, block, attempt, calls)

    async def _agent(
        self, run: _Run, block: AgentBlock, attempt: int, calls: list[CallResult]
    ) -> Mapping[str, Any]:
        system = block.system.render(run.lookup) if block.system is not None else None
        prompt = block.prompt.render(run.lookup)
        stream = run.stream if run.stream is not None else block.stream
        client: ProviderClient = self.clients[block.provider]
        search: AgentTool | None = next((t for t in block.tools if t.type == EXA_TOOL), None)
        messages: list[Message] = [Message("user", prompt)]
        seq = 0
        rounds = block.max_tool_rounds if search is not None else 0
        result: CompletionResult | None = None
        for round_no in range(rounds + 1):
            tool_choice = None
            if search is not None:
                if round_no == rounds:
                    tool_choice = "none"
                elif round_no == 0 and search.required:
                    tool_choice = "required"
                else:
                    tool_choice = "auto"
            request = CompletionRequest(
                model=block.model,
                messages=tuple(messages),
                system=system,
                temperature=block.temperature,
                max_output_tokens=block.max_tokens,
                response_schema=block.response_schema,
                schema_name=_schema_name(block.id),
                tools=((_SEARCH_FUNCTION,) if search is not None else ())
                + ((WebSearchTool(block.web_search.max_uses),) if block.web_search else ()),
                tool_choice=tool_choice,
            )
            seq += 1

            def invoke(
                api_key: str, request: CompletionRequest = request
            ) -> Awaitable[CompletionResult]:
                if stream:
                    return client.complete_streamed(
                        request,
                        api_key=api_key,
                        on_text=lambda text: run.emit("text", block.id, "agent", text=text),
                    )
                return client.complete(request, api_key=api_key)

            searches = sum(t.max_uses or 1 for t in request.tools if isinstance(t, WebSearchTool))
            worst = Usage(
                block.provider,
                block.model,
                # the search results come back as input: an allowance per search
                input_tokens=_input_bound(request)
                + searches * self.options.budget_search_input_tokens,
                output_tokens=block.max_tokens or self.options.budget_output_tokens,
                tool_uses=((WEB_SEARCH_TOOLS[block.provider], searches),) if searches else (),
            )
            site = _CallSite(run, block.id, attempt, seq, block.provider, block.model)
            result, call = await self._call(site, block.key, stream, invoke, worst)
            calls.append(call)
            if not result.tool_calls or search is None:
                break
            messages.append(Message("assistant", result.content, tool_calls=result.tool_calls))
            for tool_call in result.tool_calls:
                query = _query_of(tool_call.arguments) or prompt
                seq += 1
                searched = _search_request(query, search.num_results)
                hits, call = await self._search(run, block.id, attempt, seq, searched, search.key)
                calls.append(call)
                messages.append(
                    Message(
                        "tool",
                        _hits_text(hits.hits) or "no results",
                        tool_call_id=tool_call.id,
                        name=tool_call.name,
                    )
                )
        assert result is not None
        output: dict[str, Any] = {
            "content": result.content,
            "model": result.model or block.model,
            "provider": block.provider,
            "finish_reason": result.finish_reason,
        }
        if block.response_schema is not None:
            output["json"] = _structured(block, result)
        return output

    async def _search(
        self,
        run: _Run,
        block_id: str,
        attempt: int,
        seq: int,
        request: SearchRequest,
        key: KeyRef | None,
    ) -> tuple[SearchResult, CallResult]:
        provider, tool = TOOL_PROVIDERS[EXA_TOOL]
        client: ExaClient = self.clients[provider]

        def invoke(api_key: str) -> Awaitable[SearchResult]:
            return client.search(request, api_key=api_key)

        worst = Usage(provider, tool, tool_requests=1)
        site = _CallSite(run, block_id, attempt, seq, provider, tool)
        return await self._call(site, key, False, invoke, worst)


def _search_request(
    query: str, num_results: int, search_type: str = "auto", include_text: bool = True
) -> SearchRequest:
    """A search of ``query`` (its first 2,000 characters), with up to 1,500 characters of each
    hit's text when ``include_text``."""
    return SearchRequest(
        query=query[:2000],
        num_results=num_results,
        search_type=search_type,
        include_text=include_text,
        max_characters=1500 if include_text else None,
    )


def _skipped(block: Block, reason: str) -> BlockResult:
    provider, model = _target(block)
    return BlockResult(
        block.id, block.type, BlockStatus.SKIPPED, reason=reason, provider=provider, model=model
    )


def _target(block: Block) -> tuple[str | None, str | None]:
    if isinstance(block, AgentBlock):
        return block.provider, block.model
    if isinstance(block, ToolBlock):
        return TOOL_PROVIDERS[block.tool]
    return None, None


def _schema_name(block_id: str) -> str:
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in block_id)
    return name[:64] or "response"


def _structured(block: AgentBlock, result: CompletionResult) -> Any:
    assert block.response_schema is not None
    not_json = "the reply is not the JSON its response_schema asks for"
    try:
        value = json.loads(result.content)
    except ValueError:
        cut = " (the reply was cut at max_tokens)" if result.finish_reason == "length" else ""
        raise BlockFailed(not_json + cut, retryable=True) from None
    except RecursionError:  # the model's text is data: nested deeper than the decoder goes
        raise BlockFailed(f"{not_json}: it is nested too deeply", retryable=True) from None
    try:
        validator = Draft202012Validator(dict(block.response_schema))
        error = next(iter(validator.iter_errors(value)), None)
    except RecursionError:  # a recursive schema ($ref) following a reply that deep
        raise BlockFailed(f"{not_json}: it is nested too deeply", retryable=True) from None
    if error is not None:
        where = json_path(error.absolute_path)
        raise BlockFailed(
            f"the reply does not match its response_schema at {where}: {error.message[:200]}",
            retryable=True,
        )
    return value


def _query_of(arguments: str) -> str | None:
    try:
        parsed = json.loads(arguments or "{}")
    except (ValueError, RecursionError):  # the model's arguments: any text at all
        return None
    query = parsed.get("query") if isinstance(parsed, dict) else None
    return query if isinstance(query, str) and query.strip() else None


def _hit_dict(hit: SearchHit) -> dict[str, Any]:
    return {
        "title": hit.title,
        "url": hit.url,
        "published_date": hit.published_date,
        "author": hit.author,
        "text": hit.text,
    }


def _hits_text(hits: tuple[SearchHit, ...]) -> str:
    """Search results as a model reads them: numbered, with title, URL, date and text."""
    parts = []
    for n, hit in enumerate(hits, start=1):
        lines = [f"[{n}] {hit.title or hit.url}", f"URL: {hit.url}"]
        if hit.published_date:
            lines.append(f"Published: {hit.published_date}")
        if hit.text:
            lines.append(hit.text.strip())
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
