"""Anthropic Messages (``POST {base}/v1/messages``), streamed and not.

Base URL: ``https://api.anthropic.com`` (as the Anthropic SDK's ``base_url``).

Usage, from https://docs.anthropic.com/en/api/messages (``usage``) and the prompt-caching guide
(https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching#tracking-cache-performance):
``input_tokens`` already excludes the cache — the input is ``input_tokens +
cache_creation_input_tokens + cache_read_input_tokens`` — so ``input = input_tokens``,
``cached_input = cache_read_input_tokens``, and the cache writes are split by lifetime as
``usage.cache_creation`` reports them (``ephemeral_5m_input_tokens``,
``ephemeral_1h_input_tokens``; the 1-hour cache is billed at twice the input price, the 5-minute
one at 1.25 times, https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching#pricing):
``cache_write_1h = ephemeral_1h_input_tokens``, ``cache_write = cache_creation_input_tokens -
cache_write_1h`` (all of them 5-minute writes when ``cache_creation`` is absent).
``output_tokens`` includes extended-thinking tokens; where the API breaks them out
(``output_tokens_details.thinking_tokens``, "always ≤ output_tokens" per the SDK's ``Usage`` type)
``reasoning = thinking_tokens`` and ``output = output_tokens - thinking_tokens``; otherwise all of
them are output. ``server_tool_use`` counts the server tools' requests
(https://docs.anthropic.com/en/api/messages#response-usage): ``web_search_requests`` (billed per
search) and ``web_fetch_requests`` (free; the fetched text is billed as input), kept in
``Usage.tool_uses`` as ``web_search`` and ``web_fetch`` and priced by the table's tools.

Streamed (https://docs.anthropic.com/en/docs/build-with-claude/streaming): ``message_start`` carries
the input usage; ``message_delta`` the cumulative ``output_tokens`` (and, in newer API versions, the
final input counts, which override); ``message_stop`` ends the stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from byok_hookspecs import Usage

from byok_plugin.host.providers.base import (
    ANSWER_SHAPE_ERRORS,
    MAX_TOOL_USES,
    ProviderClient,
    StreamAccumulator,
    as_int,
    nonneg,
)
from byok_plugin.host.providers.common import (
    CompletionRequest,
    CompletionResult,
    FinishReason,
    StreamEvent,
    ToolCall,
)
from byok_plugin.host.providers.errors import (
    AuthError,
    BadRequestError,
    ProtocolError,
    ProviderError,
    RateLimitError,
    ServerError,
    error_text,
)
from byok_plugin.host.providers.sse import ServerSentEvent

API_VERSION = "2023-06-01"

FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
    "pause_turn": FinishReason.OTHER,
}

_ERROR_EVENT_CLASSES: dict[str, type[ProviderError]] = {
    "authentication_error": AuthError,
    "permission_error": AuthError,
    "rate_limit_error": RateLimitError,
    "invalid_request_error": BadRequestError,
    "overloaded_error": ServerError,
    "api_error": ServerError,
}


def anthropic_usage(model: str, usage: Mapping[str, Any]) -> Usage:
    """``Usage`` from an Anthropic ``usage`` object (disjoint counts; see the module doc)."""
    output = as_int(usage.get("output_tokens"))
    thinking = as_int((usage.get("output_tokens_details") or {}).get("thinking_tokens"))
    server_tools = usage.get("server_tool_use") or {}
    uses = {
        name: as_int(server_tools.get(f"{name}_requests"), limit=MAX_TOOL_USES, what="tool count")
        for name in ("web_search", "web_fetch")
    }
    writes = as_int(usage.get("cache_creation_input_tokens"))
    writes_1h = min(
        as_int((usage.get("cache_creation") or {}).get("ephemeral_1h_input_tokens")), writes
    )
    return Usage(
        provider="anthropic",
        model=model,
        input_tokens=as_int(usage.get("input_tokens")),
        cached_input_tokens=as_int(usage.get("cache_read_input_tokens")),
        cache_write_tokens=writes - writes_1h,
        cache_write_1h_tokens=writes_1h,
        output_tokens=nonneg(output - thinking),
        reasoning_tokens=min(thinking, output),
        tool_uses=tuple((name, count) for name, count in uses.items() if count),
    )


class AnthropicStream(StreamAccumulator):
    def __init__(self, client: AnthropicClient, model: str) -> None:
        self.client = client
        self.model = model
        self.usage: dict[str, Any] | None = None
        self.blocks: dict[int, dict[str, Any]] = {}
        self.text: list[str] = []
        self.stop_reason: str | None = None
        self.response_id: str | None = None
        self.done = False
        #: content deltas received (text, thinking, tool input): one output token each, at least
        self.deltas = 0

    def partial_usage(self) -> Usage | None:
        """The input ``message_start`` reported (and any later counts), with the output at least
        the number of content deltas received."""
        if self.usage is None:
            return None
        usage = dict(self.usage)
        try:
            usage["output_tokens"] = max(as_int(usage.get("output_tokens")), self.deltas)
            return anthropic_usage(self.model, usage)
        except (TypeError, ValueError):
            return None

    def feed(self, event: ServerSentEvent) -> str:
        data = self.client.decode_event(event)
        kind = data.get("type") if isinstance(data, Mapping) else None
        if kind is None:
            raise ProtocolError("anthropic", f"a stream event without a type ({event.event})")
        if kind == "message_start":
            message = data.get("message") or {}
            self.response_id = message.get("id")
            self.model = message.get("model") or self.model
            self.usage = dict(message.get("usage") or {})
        elif kind == "content_block_start":
            self.blocks[int(data["index"])] = dict(data.get("content_block") or {}) | {
                "partial_json": ""
            }
        elif kind == "content_block_delta":
            self.deltas += 1
            delta = data.get("delta") or {}
            block = self.blocks.setdefault(
                int(data.get("index", 0)), {"type": "text", "partial_json": ""}
            )
            if delta.get("type") == "text_delta":
                text = delta.get("text", "")
                if not isinstance(text, str):
                    raise ProtocolError("anthropic", "a text_delta whose text is not a string")
                self.text.append(text)
                return text
            if delta.get("type") == "input_json_delta":
                block["partial_json"] += delta.get("partial_json", "")
        elif kind == "message_delta":
            if self.usage is None:
                raise ProtocolError("anthropic", "message_delta before message_start")
            self.stop_reason = (data.get("delta") or {}).get("stop_reason") or self.stop_reason
            for name, value in (data.get("usage") or {}).items():
                if value is not None:
                    self.usage[name] = value
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            error = data.get("error") or {}
            error_class = _ERROR_EVENT_CLASSES.get(str(error.get("type")), ServerError)
            raise error_class(
                "anthropic",
                error_text(error.get("message")) or "error event in the stream",
                code=error_text(error.get("type")),
            )
        return ""

    def result(self) -> CompletionResult:
        if not self.done:
            raise ProtocolError(
                "anthropic", "the stream ended before message_stop; the answer is incomplete"
            )
        if self.usage is None:
            raise ProtocolError("anthropic", "the stream carried no message_start usage")
        calls = []
        for _, block in sorted(self.blocks.items()):
            if block.get("type") == "tool_use":
                arguments = block["partial_json"] or json.dumps(block.get("input") or {})
                calls.append(
                    ToolCall(
                        id=block.get("id", ""), name=block.get("name", ""), arguments=arguments
                    )
                )
        try:
            usage = anthropic_usage(self.model, self.usage)
        except (TypeError, ValueError) as exc:
            raise ProtocolError("anthropic", f"unreadable usage in the stream: {exc}") from None
        return CompletionResult(
            provider="anthropic",
            model=self.model,
            content="".join(self.text),
            finish_reason=FINISH.get(self.stop_reason or "", FinishReason.OTHER),
            raw_finish_reason=self.stop_reason,
            tool_calls=tuple(calls),
            usage=usage,
            response_id=self.response_id,
            streamed=True,
        )


class AnthropicClient(ProviderClient):
    provider = "anthropic"
    default_base_url = "https://api.anthropic.com"
    #: Anthropic requires ``max_tokens``; used when the request sets no ``max_output_tokens``
    default_max_tokens = 4096

    def headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key, "anthropic-version": API_VERSION}

    def error_details(self, payload: Any) -> tuple[str | None, str | None]:
        error = payload.get("error") if isinstance(payload, Mapping) else None
        if isinstance(error, Mapping):
            return error_text(error.get("message")), error_text(error.get("type"))
        return None, None

    def classify(self, status: int, code: str | None, payload: Any) -> type[ProviderError]:
        if code == "overloaded_error":
            return ServerError
        return super().classify(status, code, payload)

    def body(self, request: CompletionRequest, *, stream: bool) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            if message.role == "tool":
                block = {
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id,
                    "content": message.content,
                }
                messages.append({"role": "user", "content": [block]})
            elif message.tool_calls:
                blocks: list[dict[str, Any]] = (
                    [{"type": "text", "text": message.content}] if message.content else []
                )
                blocks += [
                    {
                        "type": "tool_use",
                        "id": c.id,
                        "name": c.name,
                        "input": json.loads(c.arguments or "{}"),
                    }
                    for c in message.tool_calls
                ]
                messages.append({"role": "assistant", "content": blocks})
            else:
                messages.append({"role": message.role, "content": message.content})
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_output_tokens or self.default_max_tokens,
            "messages": messages,
        }
        if request.system:
            body["system"] = request.system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.response_schema is not None:
            body["output_config"] = {
                "format": {"type": "json_schema", "schema": dict(request.response_schema)}
            }
        tools: list[dict[str, Any]] = [
            {"name": t.name, "description": t.description, "input_schema": dict(t.parameters)}
            for t in request.function_tools
        ]
        if request.web_search is not None:
            search: dict[str, Any] = {"type": "web_search_20250305", "name": "web_search"}
            if request.web_search.max_uses is not None:
                search["max_uses"] = request.web_search.max_uses
            tools.append(search)
        if tools:
            body["tools"] = tools
        if request.tool_choice is not None:
            choice = request.tool_choice
            body["tool_choice"] = (
                {"type": "any"}
                if choice == "required"
                else {"type": choice}
                if choice in ("auto", "none")
                else {"type": "tool", "name": choice}
            )
        if stream:
            body["stream"] = True
        return body

    async def complete(self, request: CompletionRequest, *, api_key: str) -> CompletionResult:
        payload = await self.request_json(
            "POST", "/v1/messages", api_key=api_key, body=self.body(request, stream=False)
        )
        return parse_message(payload)

    def stream(self, request: CompletionRequest, *, api_key: str) -> AsyncIterator[StreamEvent]:
        return self.iter_stream(
            "/v1/messages",
            AnthropicStream(self, request.model),
            api_key=api_key,
            body=self.body(request, stream=True),
        )

    async def list_models(self, *, api_key: str) -> list[str]:
        payload = await self.request_json("GET", "/v1/models", api_key=api_key)
        return self.listed(payload, "data", "id")


def parse_message(payload: Any) -> CompletionResult:
    """A ``CompletionResult`` from an Anthropic ``message`` body."""
    try:
        text, calls = [], []
        for block in payload["content"]:
            if block.get("type") == "text":
                text.append(block.get("text", ""))
            elif block.get("type") == "tool_use":
                calls.append(
                    ToolCall(
                        id=block["id"],
                        name=block["name"],
                        arguments=json.dumps(block.get("input") or {}),
                    )
                )
        model = payload.get("model") or ""
        stop = payload.get("stop_reason")
        return CompletionResult(
            provider="anthropic",
            model=model,
            content="".join(text),
            finish_reason=FINISH.get(stop or "", FinishReason.OTHER),
            raw_finish_reason=stop,
            tool_calls=tuple(calls),
            usage=anthropic_usage(model, payload["usage"]),
            response_id=payload.get("id"),
        )
    except ANSWER_SHAPE_ERRORS as exc:
        raise ProtocolError(
            "anthropic",
            f"unexpected message shape ({type(exc).__name__}: {exc})",
            maybe_executed=True,  # a 2xx answer: executed
        ) from None
