"""OpenAI Chat Completions (``POST {base}/chat/completions``), streamed and not.

Base URL: ``https://api.openai.com/v1`` (``/v1`` included, as the OpenAI SDK's ``base_url``).

Usage, from https://platform.openai.com/docs/api-reference/chat/object (``usage``):
``prompt_tokens`` counts every input token, ``prompt_tokens_details.cached_tokens`` the ones read
from the prompt cache and ``prompt_tokens_details.cache_write_tokens`` (reported by newer models,
e.g. the ``gpt-5.6`` recording in pydantic-ai's ``test_openai_chat_prompt_cache_e2e`` cassette) the
ones written to it; ``completion_tokens`` counts every generated token and
``completion_tokens_details.reasoning_tokens`` the hidden reasoning among them. So, disjoint:
``input = prompt_tokens - cached_tokens - cache_write_tokens``, ``cached_input = cached_tokens``,
``cache_write = cache_write_tokens``, ``output = completion_tokens - reasoning_tokens``,
``reasoning = reasoning_tokens``. ``accepted_prediction_tokens`` and ``rejected_prediction_tokens``
are part of ``completion_tokens`` and billed as output. ``prompt_tokens_details.audio_tokens`` and
``completion_tokens_details.audio_tokens`` (audio models, e.g. ``gpt-4o-audio-preview``) are part
of the prompt and completion counts and billed at the audio prices
(https://platform.openai.com/docs/pricing, "Audio tokens"): ``input_audio`` and ``output_audio``
are taken out of ``input`` and ``output``; a model without audio prices leaves them unpriced.
A request with ``web_search_options`` (search models; https://platform.openai.com/docs/guides/tools-
web-search?api-mode=chat) makes one web search tool call, counted in ``Usage.tool_uses`` as
``web_search`` and priced per call by the table's ``openai/web_search`` tool.
Streamed, the usage comes in one last chunk with empty ``choices`` when the request sets
``stream_options.include_usage`` (https://platform.openai.com/docs/api-reference/chat/create
#chat-create-stream_options), then ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

from byok_hookspecs import Usage

from byok_plugin.host.providers.base import (
    ANSWER_SHAPE_ERRORS,
    ProviderClient,
    StreamAccumulator,
    as_int,
    nonneg,
)
from byok_plugin.host.providers.common import (
    CompletionRequest,
    CompletionResult,
    FinishReason,
    Message,
    StreamEvent,
    ToolCall,
)
from byok_plugin.host.providers.errors import ProtocolError, UnsupportedRequest, error_text
from byok_plugin.host.providers.sse import ServerSentEvent

FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
    "model_length": FinishReason.LENGTH,  # Mistral
    "error": FinishReason.OTHER,
}


def openai_usage(provider: str, model: str, usage: Mapping[str, Any]) -> Usage:
    """``Usage`` from an OpenAI-shaped ``usage`` object (disjoint counts; see the module doc)."""
    prompt = as_int(usage.get("prompt_tokens"))
    completion = as_int(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    cached = as_int(prompt_details.get("cached_tokens"))
    writes = as_int(prompt_details.get("cache_write_tokens"))
    audio_in = as_int(prompt_details.get("audio_tokens"))
    completion_details = usage.get("completion_tokens_details") or {}
    reasoning = as_int(completion_details.get("reasoning_tokens"))
    audio_out = as_int(completion_details.get("audio_tokens"))
    return Usage(
        provider=provider,
        model=model,
        input_tokens=nonneg(prompt - cached - writes - audio_in),
        cached_input_tokens=cached,
        cache_write_tokens=writes,
        output_tokens=nonneg(completion - reasoning - audio_out),
        reasoning_tokens=reasoning,
        input_audio_tokens=audio_in,
        output_audio_tokens=audio_out,
    )


def with_web_search(usage_of: Any) -> Any:
    """``usage_of``, adding the one ``web_search`` tool call of a request that searched."""

    def usage_with_search(provider: str, model: str, usage: Mapping[str, Any]) -> Usage:
        found: Usage = usage_of(provider, model, usage)
        return replace(found, tool_uses=(("web_search", 1),))

    return usage_with_search


def chat_messages(request: CompletionRequest) -> list[dict[str, Any]]:
    """The ``messages`` array of an OpenAI-shaped chat request (OpenAI, Mistral)."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    for message in request.messages:
        messages.append(chat_message(message))
    return messages


def chat_message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "content": message.content, "tool_call_id": message.tool_call_id}
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    return out


def function_tools(request: CompletionRequest) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": dict(t.parameters),
            },
        }
        for t in request.function_tools
    ]


def tool_choice(choice: str | None) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def parse_tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    calls = []
    for call in raw or ():
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if not isinstance(arguments, str):  # Mistral may send an object
            import json

            arguments = json.dumps(arguments if arguments is not None else {})
        calls.append(
            ToolCall(id=call.get("id") or "", name=function.get("name") or "", arguments=arguments)
        )
    return tuple(calls)


class ChatChunkAccumulator(StreamAccumulator):
    """An OpenAI-shaped chat stream: ``chat.completion.chunk`` events, then ``[DONE]``."""

    def __init__(self, client: ProviderClient, model: str, usage_of: Any) -> None:
        self.client = client
        self.model = model
        self.usage_of = usage_of
        self.text: list[str] = []
        self.tools: dict[int, dict[str, str]] = {}
        self.finish: str | None = None
        self.usage: Mapping[str, Any] | None = None
        self.response_id: str | None = None
        self.done = False
        #: chunks that carried generated text or tool-call arguments (one token each, at least)
        self.deltas = 0

    def partial_usage(self) -> Usage | None:
        """The usage chunk if it arrived; else the output counted from the deltas (the input of
        an OpenAI-shaped stream is reported only in its last chunk, so it is not known)."""
        if self.usage is not None:
            try:
                found: Usage = self.usage_of(self.client.provider, self.model, self.usage)
                return found
            except (TypeError, ValueError):
                pass
        if not self.deltas:
            return None
        return Usage(provider=self.client.provider, model=self.model, output_tokens=self.deltas)

    def feed(self, event: ServerSentEvent) -> str:
        if event.data.strip() == "[DONE]":
            self.done = True
            return ""
        chunk = self.client.decode_event(event)
        if not isinstance(chunk, Mapping):
            raise ProtocolError(self.client.provider, "a stream event is not a JSON object")
        if "error" in chunk and not chunk.get("choices"):
            from byok_plugin.host.providers.errors import ServerError

            message, code = self.client.error_details(chunk)
            raise ServerError(
                self.client.provider, message or "error event in the stream", code=code
            )
        self.response_id = self.response_id or chunk.get("id")
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        text = ""
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                text += delta["content"] if isinstance(delta["content"], str) else ""
            for call in delta.get("tool_calls") or ():
                slot = self.tools.setdefault(
                    int(call.get("index", len(self.tools))), {"id": "", "name": "", "arguments": ""}
                )
                function = call.get("function") or {}
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] = function.get("name") or slot["name"]
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    slot["arguments"] += arguments
                elif arguments is not None:
                    import json

                    slot["arguments"] += json.dumps(arguments)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
            if delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"):
                self.deltas += 1
        if text:
            self.text.append(text)
        return text

    def result(self) -> CompletionResult:
        provider = self.client.provider
        if not self.done:
            raise ProtocolError(
                provider, "the stream ended before data: [DONE]; the answer is incomplete"
            )
        if self.finish is None:
            raise ProtocolError(provider, "the stream ended without a finish reason")
        if self.usage is None:
            raise ProtocolError(provider, "the stream carried no usage")
        try:
            usage = self.usage_of(provider, self.model, self.usage)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(provider, f"unreadable usage in the stream: {exc}") from None
        return CompletionResult(
            provider=provider,
            model=self.model,
            content="".join(self.text),
            finish_reason=FINISH.get(self.finish, FinishReason.OTHER),
            raw_finish_reason=self.finish,
            tool_calls=tuple(
                ToolCall(id=t["id"], name=t["name"], arguments=t["arguments"] or "{}")
                for _, t in sorted(self.tools.items())
            ),
            usage=usage,
            response_id=self.response_id,
            streamed=True,
        )


def parse_chat_completion(provider: str, payload: Any, usage_of: Any) -> CompletionResult:
    """A ``CompletionResult`` from an OpenAI-shaped ``chat.completion`` body."""
    try:
        choice = payload["choices"][0]
        message = choice.get("message") or {}
        content = message.get("content")
        if isinstance(content, list):  # Mistral may answer content chunks
            content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        model = payload.get("model") or ""
        usage = usage_of(provider, model, payload["usage"])
        finish = choice.get("finish_reason")
        return CompletionResult(
            provider=provider,
            model=model,
            content=content or "",
            finish_reason=FINISH.get(finish, FinishReason.OTHER),
            raw_finish_reason=finish,
            tool_calls=parse_tool_calls(message.get("tool_calls")),
            usage=usage,
            response_id=payload.get("id"),
        )
    except ANSWER_SHAPE_ERRORS as exc:
        raise ProtocolError(
            provider,
            f"unexpected chat completion shape ({type(exc).__name__}: {exc})",
            maybe_executed=True,  # a 2xx answer: executed
        ) from None


def chat_body(request: CompletionRequest, *, max_tokens_field: str) -> dict[str, Any]:
    """The parts of a chat-completions body that OpenAI and Mistral share; each names its own
    output-token limit field (``max_completion_tokens``, ``max_tokens``)."""
    body: dict[str, Any] = {"model": request.model, "messages": chat_messages(request)}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.max_output_tokens is not None:
        body[max_tokens_field] = request.max_output_tokens
    if request.response_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": request.schema_name,
                "schema": dict(request.response_schema),
                "strict": True,
            },
        }
    tools = function_tools(request)
    if tools:
        body["tools"] = tools
    if request.tool_choice is not None:
        body["tool_choice"] = tool_choice(request.tool_choice)
    return body


class OpenAIClient(ProviderClient):
    provider = "openai"
    default_base_url = "https://api.openai.com/v1"

    def headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def error_details(self, payload: Any) -> tuple[str | None, str | None]:
        error = payload.get("error") if isinstance(payload, Mapping) else None
        if isinstance(error, Mapping):
            # "code" may be a number (vLLM and other OpenAI-compatible servers send 400)
            code = error_text(error.get("code")) or error_text(error.get("type"))
            return error_text(error.get("message")), code
        return None, None

    def quota_exhausted(self, code: str | None, payload: Any) -> bool:
        return code == "insufficient_quota"

    def body(self, request: CompletionRequest, *, stream: bool) -> dict[str, Any]:
        body = chat_body(request, max_tokens_field="max_completion_tokens")
        if request.web_search is not None:
            if request.web_search.max_uses is not None:
                raise UnsupportedRequest(
                    self.provider, "web search has no max_uses in chat completions"
                )
            body["web_search_options"] = {}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, request: CompletionRequest, *, api_key: str) -> CompletionResult:
        payload = await self.request_json(
            "POST", "/chat/completions", api_key=api_key, body=self.body(request, stream=False)
        )
        return parse_chat_completion(self.provider, payload, self.usage_of(request))

    @staticmethod
    def usage_of(request: CompletionRequest) -> Any:
        return with_web_search(openai_usage) if request.web_search is not None else openai_usage

    def stream(self, request: CompletionRequest, *, api_key: str) -> AsyncIterator[StreamEvent]:
        return self.iter_stream(
            "/chat/completions",
            ChatChunkAccumulator(self, request.model, self.usage_of(request)),
            api_key=api_key,
            body=self.body(request, stream=True),
        )

    async def list_models(self, *, api_key: str) -> list[str]:
        payload = await self.request_json("GET", "/models", api_key=api_key)
        return self.listed(payload, "data", "id")
