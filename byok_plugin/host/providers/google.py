"""Google Gemini API: ``generateContent`` and ``streamGenerateContent?alt=sse``.

Base URL: ``https://generativelanguage.googleapis.com`` (paths under ``/v1beta``); the key goes in
the ``x-goog-api-key`` header, never in the URL.

Usage, from https://ai.google.dev/api/generate-content#UsageMetadata : ``promptTokenCount`` counts
the whole prompt *including* ``cachedContentTokenCount``; ``candidatesTokenCount`` counts the
generated answer and ``thoughtsTokenCount`` the thinking tokens, reported apart (``totalTokenCount``
= prompt + candidates + thoughts + tool-use prompt); ``toolUsePromptTokenCount`` counts the tokens
of tool results (Google Search) fed back as input. So, disjoint: ``input = promptTokenCount -
cachedContentTokenCount + toolUsePromptTokenCount``, ``cached_input = cachedContentTokenCount``,
``output = candidatesTokenCount``, ``reasoning = thoughtsTokenCount``. A grounded answer (its
candidate has ``groundingMetadata.webSearchQueries``) is one grounded prompt, the unit Gemini 2.5
bills Grounding with Google Search in (https://ai.google.dev/gemini-api/docs/pricing): it counts
``google_search`` once in ``Usage.tool_uses``, priced by the table's ``google/google_search``.
``promptTokensDetails``/``cacheTokensDetails`` split the prompt and the cache by modality; audio
input is billed apart (Gemini 2.5 Flash: $1.00 per 1M audio tokens against $0.30 for text): the
fresh audio tokens (the prompt's ``AUDIO`` less the cache's) are ``input_audio``, taken out of
``input``, and priced at the table's ``input_audio`` (named unpriced where an entry has none).
Cached audio stays in ``cached_input``, at the cached text price (``Usage`` has no cached-audio
count): on a recorded Gemini 2.5 Flash call with 1,881 cached audio tokens, $0.00013 under what
Google bills.

Streamed, every chunk is a ``GenerateContentResponse``; there is no end marker, so the stream is
complete only when a candidate carried a ``finishReason``, and the usage is the last chunk's
``usageMetadata``.

Errors (https://ai.google.dev/gemini-api/docs/troubleshooting): ``{"error": {"code", "message",
"status", "details"}}``; an invalid key is a 400 whose ``ErrorInfo.reason`` is ``API_KEY_INVALID``
(an auth error here), a 429's ``RetryInfo.retryDelay`` ("37s") serves as ``Retry-After``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
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
    StreamEvent,
    ToolCall,
)
from byok_plugin.host.providers.errors import (
    AuthError,
    ProtocolError,
    ProviderError,
    RateLimitError,
    ServerError,
    UnsupportedRequest,
    error_text,
)
from byok_plugin.host.providers.sse import ServerSentEvent

FINISH = {
    "STOP": FinishReason.STOP,
    "MAX_TOKENS": FinishReason.LENGTH,
    "SAFETY": FinishReason.CONTENT_FILTER,
    "RECITATION": FinishReason.CONTENT_FILTER,
    "BLOCKLIST": FinishReason.CONTENT_FILTER,
    "PROHIBITED_CONTENT": FinishReason.CONTENT_FILTER,
    "SPII": FinishReason.CONTENT_FILTER,
    "IMAGE_SAFETY": FinishReason.CONTENT_FILTER,
}
_AUTH_REASONS = {"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "API_KEY_HTTP_REFERRER_BLOCKED"}


def gemini_usage(model: str, metadata: Mapping[str, Any], *, grounded: bool = False) -> Usage:
    """``Usage`` from a Gemini ``usageMetadata`` object (disjoint counts; see the module doc)."""
    prompt = as_int(metadata.get("promptTokenCount"))
    cached = as_int(metadata.get("cachedContentTokenCount"))
    audio = nonneg(
        _modality(metadata.get("promptTokensDetails"), "AUDIO")
        - _modality(metadata.get("cacheTokensDetails"), "AUDIO")
    )
    audio = min(audio, nonneg(prompt - cached))  # never more than the fresh prompt
    return Usage(
        provider="google",
        model=model,
        input_tokens=nonneg(prompt - cached - audio)
        + as_int(metadata.get("toolUsePromptTokenCount")),
        input_audio_tokens=audio,
        cached_input_tokens=cached,
        output_tokens=as_int(metadata.get("candidatesTokenCount")),
        reasoning_tokens=as_int(metadata.get("thoughtsTokenCount")),
        tool_uses=(("google_search", 1),) if grounded else (),
    )


def _modality(details: Any, modality: str) -> int:
    """The token count of ``modality`` in a ``promptTokensDetails``-shaped list (0 when absent)."""
    if not isinstance(details, list):
        return 0
    return sum(
        as_int(entry.get("tokenCount"))
        for entry in details
        if isinstance(entry, Mapping) and entry.get("modality") == modality
    )


def _duration_seconds(value: Any) -> float | None:
    if isinstance(value, str) and value.endswith("s"):
        try:
            return float(value[:-1])
        except ValueError:
            return None
    return None


class _Collector:
    """Text, function calls and finish reason gathered from one or more response bodies."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: list[ToolCall] = []
        self.finish: str | None = None
        self.grounded = False
        self.blocked: str | None = None

    def add(self, payload: Mapping[str, Any]) -> str:
        added = ""
        candidates = payload.get("candidates") or []
        if not candidates and (payload.get("promptFeedback") or {}).get("blockReason"):
            self.blocked = payload["promptFeedback"]["blockReason"]
        for candidate in candidates[:1]:
            for part in (candidate.get("content") or {}).get("parts") or ():
                if "text" in part and not part.get("thought"):
                    added += part["text"]
                elif "functionCall" in part:
                    call = part["functionCall"]
                    self.calls.append(
                        ToolCall(
                            id=call.get("id") or call.get("name", ""),
                            name=call.get("name", ""),
                            arguments=json.dumps(call.get("args") or {}),
                        )
                    )
            if (candidate.get("groundingMetadata") or {}).get("webSearchQueries"):
                self.grounded = True
            if candidate.get("finishReason"):
                self.finish = candidate["finishReason"]
        if added:
            self.text.append(added)
        return added

    def result(
        self, model: str, metadata: Mapping[str, Any], response_id: str | None, streamed: bool
    ) -> CompletionResult:
        raw: str | None
        if self.blocked:
            finish, raw = FinishReason.CONTENT_FILTER, self.blocked
        else:
            raw = self.finish
            finish = FINISH.get(raw or "", FinishReason.OTHER)
            if self.calls and finish == FinishReason.STOP:
                finish = FinishReason.TOOL_CALLS
        return CompletionResult(
            provider="google",
            model=model,
            content="".join(self.text),
            finish_reason=finish,
            raw_finish_reason=raw,
            tool_calls=tuple(self.calls),
            usage=gemini_usage(model, metadata, grounded=self.grounded),
            response_id=response_id,
            streamed=streamed,
        )


class GeminiStream(StreamAccumulator):
    def __init__(self, client: GoogleClient, model: str) -> None:
        self.client = client
        self.model = model
        self.collector = _Collector()
        self.metadata: Mapping[str, Any] | None = None
        self.response_id: str | None = None

    def partial_usage(self) -> Usage | None:
        """The last ``usageMetadata`` received: every chunk carries the running counts."""
        if self.metadata is None:
            return None
        try:
            return gemini_usage(self.model, self.metadata, grounded=self.collector.grounded)
        except (TypeError, ValueError):
            return None

    def feed(self, event: ServerSentEvent) -> str:
        payload = self.client.decode_event(event)
        if not isinstance(payload, Mapping):
            raise ProtocolError("google", "a stream event is not a JSON object")
        if "error" in payload:
            message, code = self.client.error_details(payload)
            raise ServerError("google", message or "error event in the stream", code=code)
        self.response_id = payload.get("responseId") or self.response_id
        self.model = payload.get("modelVersion") or self.model
        if payload.get("usageMetadata"):
            self.metadata = payload["usageMetadata"]
        return self.collector.add(payload)

    def result(self) -> CompletionResult:
        if self.collector.finish is None and self.collector.blocked is None:
            raise ProtocolError(
                "google", "the stream ended before a finishReason; the answer is incomplete"
            )
        if self.metadata is None:
            raise ProtocolError("google", "the stream carried no usageMetadata")
        try:
            return self.collector.result(self.model, self.metadata, self.response_id, streamed=True)
        except (TypeError, ValueError) as exc:
            raise ProtocolError("google", f"unreadable usage in the stream: {exc}") from None


class GoogleClient(ProviderClient):
    provider = "google"
    default_base_url = "https://generativelanguage.googleapis.com"

    def headers(self, api_key: str) -> dict[str, str]:
        return {"x-goog-api-key": api_key}

    def error_details(self, payload: Any) -> tuple[str | None, str | None]:
        error = payload.get("error") if isinstance(payload, Mapping) else None
        if not isinstance(error, Mapping):
            return None, None
        details = error.get("details")
        reasons = [
            d["reason"]
            for d in (details if isinstance(details, list) else ())
            if isinstance(d, Mapping) and isinstance(d.get("reason"), str) and d["reason"]
        ]
        code = reasons[0] if reasons else error_text(error.get("status"))
        return error_text(error.get("message")), code

    def classify(self, status: int, code: str | None, payload: Any) -> type[ProviderError]:
        if code in _AUTH_REASONS:
            return AuthError
        return super().classify(status, code, payload)

    def status_error(self, response: httpx.Response, api_key: str, attempt: int) -> ProviderError:
        error = super().status_error(response, api_key, attempt)
        if isinstance(error, RateLimitError) and error.retry_after is None:
            try:
                details = response.json()["error"].get("details") or ()
            except ANSWER_SHAPE_ERRORS:
                details = ()
            for detail in details if isinstance(details, list) else ():
                if isinstance(detail, Mapping) and str(detail.get("@type", "")).endswith(
                    "RetryInfo"
                ):
                    error.retry_after = _duration_seconds(detail.get("retryDelay"))
        return error

    def body(self, request: CompletionRequest) -> dict[str, Any]:
        contents: list[dict[str, Any]] = []
        for message in request.messages:
            if message.role == "tool":
                if not message.name:
                    raise UnsupportedRequest(
                        self.provider, "a tool message needs the function's name"
                    )
                try:
                    response = json.loads(message.content)
                except ValueError:
                    response = None
                if not isinstance(response, dict):
                    response = {"content": message.content}
                contents.append(
                    {
                        "role": "user",
                        "parts": [
                            {"functionResponse": {"name": message.name, "response": response}}
                        ],
                    }
                )
                continue
            parts: list[dict[str, Any]] = (
                [{"text": message.content}] if message.content or not message.tool_calls else []
            )
            parts += [
                {"functionCall": {"name": c.name, "args": c.parsed_arguments()}}
                for c in message.tool_calls
            ]
            contents.append(
                {"role": "model" if message.role == "assistant" else "user", "parts": parts}
            )
        body: dict[str, Any] = {"contents": contents}
        if request.system:
            body["systemInstruction"] = {"parts": [{"text": request.system}]}
        config: dict[str, Any] = {}
        if request.temperature is not None:
            config["temperature"] = request.temperature
        if request.max_output_tokens is not None:
            config["maxOutputTokens"] = request.max_output_tokens
        if request.response_schema is not None:
            config["responseMimeType"] = "application/json"
            config["responseJsonSchema"] = dict(request.response_schema)
        if config:
            body["generationConfig"] = config
        tools: list[dict[str, Any]] = []
        if request.function_tools:
            tools.append(
                {
                    "functionDeclarations": [
                        {
                            "name": t.name,
                            "description": t.description,
                            "parametersJsonSchema": dict(t.parameters),
                        }
                        for t in request.function_tools
                    ]
                }
            )
        if request.web_search is not None:
            tools.append({"googleSearch": {}})
        if tools:
            body["tools"] = tools
        if request.tool_choice is not None:
            choice = request.tool_choice
            mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}.get(choice, "ANY")
            calling: dict[str, Any] = {"mode": mode}
            if choice not in ("auto", "none", "required"):
                calling["allowedFunctionNames"] = [choice]
            body["toolConfig"] = {"functionCallingConfig": calling}
        return body

    def model_path(self, model: str, method: str) -> str:
        name = model.removeprefix("models/")
        return f"/v1beta/models/{quote(name, safe='-._')}:{method}"

    async def complete(self, request: CompletionRequest, *, api_key: str) -> CompletionResult:
        payload = await self.request_json(
            "POST",
            self.model_path(request.model, "generateContent"),
            api_key=api_key,
            body=self.body(request),
        )
        try:
            collector = _Collector()
            collector.add(payload)
            model = payload.get("modelVersion") or request.model
            return collector.result(
                model, payload["usageMetadata"], payload.get("responseId"), streamed=False
            )
        except ANSWER_SHAPE_ERRORS as exc:
            raise ProtocolError(
                "google",
                f"unexpected generateContent shape ({type(exc).__name__}: {exc})",
                maybe_executed=True,  # a 2xx answer: executed
            ) from None

    def stream(self, request: CompletionRequest, *, api_key: str) -> AsyncIterator[StreamEvent]:
        return self.iter_stream(
            self.model_path(request.model, "streamGenerateContent"),
            GeminiStream(self, request.model),
            api_key=api_key,
            body=self.body(request),
            params={"alt": "sse"},
        )

    async def list_models(self, *, api_key: str) -> list[str]:
        payload = await self.request_json("GET", "/v1beta/models", api_key=api_key)
        return [name.removeprefix("models/") for name in self.listed(payload, "models", "name")]
