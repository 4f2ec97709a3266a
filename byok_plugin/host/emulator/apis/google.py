"""Google's Gemini API (``/v1beta/models``, ``:generateContent``, ``:streamGenerateContent``).

Wire format as in https://ai.google.dev/api/generate-content : the key in ``x-goog-api-key`` (or the
``key`` query parameter); ``usageMetadata`` ``{promptTokenCount, candidatesTokenCount,
totalTokenCount, cachedContentTokenCount, thoughtsTokenCount}`` where ``promptTokenCount`` includes
the cached tokens and ``candidatesTokenCount`` excludes the thoughts. ``streamGenerateContent?alt=sse``
sends ``GenerateContentResponse`` chunks as ``data:`` events (no end marker); the last one carries
``finishReason`` and the complete ``usageMetadata``. An invalid key is answered 400
``INVALID_ARGUMENT`` / ``API_KEY_INVALID`` and a missing one 403 ``PERMISSION_DENIED``, as Google does
(https://ai.google.dev/gemini-api/docs/troubleshooting). Errors:
``{"error": {"code", "message", "status", "details"}}``.

A request with the ``googleSearch`` (or ``google_search``) tool is answered grounded, as the
recorded ``fixtures/provider-recordings/google/grounded_search.json``: the candidate carries
``groundingMetadata`` (``webSearchQueries``, ``groundingChunks``) and the usage
``toolUsePromptTokenCount`` (:data:`GROUNDING_TOOL_TOKENS`, the search results fed back as input),
counted in ``totalTokenCount``; streamed, on the last chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from byok_plugin.host.emulator.apis.base import (
    BadRequest,
    Exchange,
    ProviderAPI,
    _seconds,
    json_response,
    new_id,
    sse,
    sse_response,
    stream_events,
)
from byok_plugin.host.emulator.faults import Fault
from byok_plugin.host.emulator.synth import (
    Reply,
    is_reasoning_model,
    make_reply,
    prompt_tokens,
    schema_instance,
    text_of,
)

_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}


#: the API versions served: ``v1`` (google-genai's default) and ``v1beta`` (the REST docs')
VERSIONS = ("v1", "v1beta")


def field(mapping: Any, name: str) -> Any:
    """``mapping[name]``, by its lowerCamelCase name or its snake_case one: the API takes both
    (proto3 JSON), and google-genai sends some nested configs in snake_case
    (``thinkingConfig: {"thinking_budget": 0}``, ``parameters_json_schema``)."""
    if not isinstance(mapping, Mapping):
        return None
    if name in mapping:
        return mapping[name]
    return mapping.get("".join(f"_{c.lower()}" if c.isupper() else c for c in name))


def _target(request: Request, body: Mapping[str, Any]) -> str | None:
    return request.path_params.get("target", "").split(":", 1)[0] or None


def _no_model(request: Request, body: Mapping[str, Any]) -> str | None:
    return None


def _streamed(request: Request, body: Mapping[str, Any]) -> bool:
    target: str = request.path_params.get("target", "")
    return target.endswith(":streamGenerateContent")


class GoogleAPI(ProviderAPI):
    name = "google"
    models = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash-lite", "gemini-2.0-flash")

    def key_from(self, request: Request) -> str | None:
        return request.headers.get("x-goog-api-key") or request.query_params.get("key") or None

    def error(self, status: int, kind: str, message: str) -> Response:
        payload: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": _STATUS.get(status, "UNKNOWN"),
        }
        if status == 429:
            payload["details"] = _quota_details()
        return json_response({"error": payload}, status)

    async def _apply_fault(self, fault: Fault, exchange: Exchange, stream: bool) -> Response | None:
        response = await super()._apply_fault(fault, exchange, stream)
        if response is not None and response.status_code == 429:
            # Google says when to retry in the body (``RetryInfo.retryDelay``), not in a header
            delay = _seconds(fault.retry_after)
            response = json_response(
                {
                    "error": {
                        "code": 429,
                        "message": "You exceeded your current quota, please check your plan and "
                        f"billing details. Please retry in {delay}s.",
                        "status": "RESOURCE_EXHAUSTED",
                        "details": _quota_details(
                            _target(exchange.request, exchange.body), f"{delay}s"
                        ),
                    }
                },
                429,
            )
        return response

    def auth_failure(self, api_key: str | None) -> Response:
        if not api_key:
            return self.error(
                403,
                "auth",
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        return json_response(
            {
                "error": {
                    "code": 400,
                    "message": "API key not valid. Please pass a valid API key.",
                    "status": "INVALID_ARGUMENT",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID",
                            "domain": "googleapis.com",
                            "metadata": {"service": "generativelanguage.googleapis.com"},
                        }
                    ],
                }
            },
            400,
        )

    def routes(self) -> list[Route]:
        routes = []
        for version in VERSIONS:
            routes += [
                self.route(
                    f"/{version}/models", self.list_models, methods=("GET",), model_of=_no_model
                ),
                self.route(
                    f"/{version}/models/{{target}}",
                    self.get_model,
                    methods=("GET",),
                    model_of=_no_model,
                ),
                self.route(
                    f"/{version}/models/{{target}}",
                    self.generate,
                    model_of=_target,
                    stream_of=_streamed,
                ),
            ]
        return routes

    @staticmethod
    def model_info(model: str) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": f"models/{model}",
            "version": "001",
            "displayName": model,
            "description": f"The emulator's {model}.",
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
            "temperature": 1,
            "topP": 0.95,
            "topK": 64,
            "maxTemperature": 2,
        }
        if is_reasoning_model(model):
            info["thinking"] = True
        return info

    async def list_models(self, ex: Exchange) -> Response:
        # one page of ``pageSize`` (50 by default), the next one named by ``pageToken``
        try:
            size = max(1, min(int(ex.query.get("pageSize") or 50), 1000))
            start = int(ex.query.get("pageToken") or 0)
        except ValueError:
            raise BadRequest("pageSize and pageToken must be integers") from None
        page: dict[str, Any] = {
            "models": [self.model_info(m) for m in self.models[start : start + size]]
        }
        if start + size < len(self.models):
            page["nextPageToken"] = str(start + size)
        return json_response(page)

    async def get_model(self, ex: Exchange) -> Response:
        model = ex.request.path_params["target"]
        if model not in self.models:
            return self.error(404, "not_found", f"models/{model} is not found for API version.")
        return json_response(self.model_info(model))

    def reply(self, model: str, body: Mapping[str, Any]) -> Reply:
        contents = field(body, "contents")
        if not isinstance(contents, list) or not contents:
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        system = field(body, "systemInstruction")
        parts = [text_of(system)] if system else []
        parts += [text_of(c.get("parts")) for c in contents if isinstance(c, Mapping)]
        users = [
            text_of(c.get("parts"))
            for c in contents
            if isinstance(c, Mapping) and c.get("role", "user") == "user"
        ]
        config = field(body, "generationConfig") or {}
        schema = field(config, "responseJsonSchema") or field(config, "responseSchema")
        if schema is None and field(config, "responseMimeType") == "application/json":
            schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        budget = field(field(config, "thinkingConfig"), "thinkingBudget")
        reasoning: bool | None = None
        if isinstance(budget, int) and budget != -1:  # -1: the model decides (its default)
            if budget == 0 and model.startswith("gemini-2.5-pro"):
                raise BadRequest("Budget 0 is invalid. This model only works in thinking mode.")
            reasoning = budget > 0
        return make_reply(
            provider=self.name,
            model=model,
            parts=parts,
            last_user=users[-1] if users else "",
            max_tokens=field(config, "maxOutputTokens"),
            schema=_lower_types(schema) if schema is not None else None,
            reasoning=reasoning,
        )

    def count_tokens(self, body: Mapping[str, Any]) -> Response:
        """``:countTokens``: ``contents``, or a whole ``generateContentRequest``."""
        request = field(body, "generateContentRequest") or body
        contents = field(request, "contents")
        if not isinstance(contents, list) or not contents:
            raise BadRequest("* CountTokensRequest.contents: contents is not specified")
        system = field(request, "systemInstruction")
        parts = [text_of(system)] if system else []
        parts += [text_of(c.get("parts")) for c in contents if isinstance(c, Mapping)]
        total = prompt_tokens(parts)
        return json_response(
            {
                "totalTokens": total,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}],
            }
        )

    @staticmethod
    def usage(reply: Reply, *, final: bool = True, grounded: bool = False) -> dict[str, Any]:
        if not final:
            return {"promptTokenCount": reply.prompt_tokens, "totalTokenCount": reply.prompt_tokens}
        tool_tokens = GROUNDING_TOOL_TOKENS if grounded else 0
        usage: dict[str, Any] = {
            "promptTokenCount": reply.prompt_tokens,
            "candidatesTokenCount": reply.output_tokens,
            "totalTokenCount": reply.prompt_tokens
            + reply.output_tokens
            + reply.reasoning_tokens
            + tool_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": reply.prompt_tokens}],
        }
        if tool_tokens:
            usage["toolUsePromptTokenCount"] = tool_tokens
            usage["toolUsePromptTokensDetails"] = [{"modality": "TEXT", "tokenCount": tool_tokens}]
        if reply.cached_tokens:
            usage["cachedContentTokenCount"] = reply.cached_tokens
            usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": reply.cached_tokens}]
        if reply.reasoning_tokens:
            usage["thoughtsTokenCount"] = reply.reasoning_tokens
        return usage

    async def generate(self, ex: Exchange) -> Response:
        target = ex.request.path_params["target"]
        model, _, method = target.partition(":")
        if method == "countTokens":
            return self.count_tokens(ex.body)
        if method not in ("generateContent", "streamGenerateContent"):
            return self.error(
                404, "not_found", f"Method {method!r} is not found for models/{model}."
            )
        reply = self.reply(model, ex.body)
        model = self.state.answered_model(self.name, model)  # the reply's modelVersion
        function = _forced_function(ex.body)
        parts: list[dict[str, Any]]
        response_id = new_id("")[:22]
        if function is not None:
            parts = [
                {
                    "functionCall": {
                        "name": function["name"],
                        "args": schema_instance(
                            _lower_types(
                                field(function, "parametersJsonSchema")
                                or field(function, "parameters")
                                or {}
                            )
                        ),
                    }
                }
            ]
            finish = "STOP"
        else:
            parts = [{"text": reply.text}]
            finish = _FINISH[reply.finish]
        grounding = None
        if function is None and _searches_web(ex.body):
            contents = [c for c in field(ex.body, "contents") if isinstance(c, Mapping)]
            grounding = _grounding(text_of(contents[-1].get("parts")) if contents else "")
        thinking = field(field(ex.body, "generationConfig"), "thinkingConfig")
        if reply.reasoning_tokens and field(thinking, "includeThoughts"):
            parts = [{"text": "Emulated thought summary.", "thought": True}, *parts]
        if method == "streamGenerateContent":
            if ex.query.get("alt") != "sse":
                raise BadRequest("the emulator streams only with ?alt=sse")
            return sse_response(
                self._stream(
                    ex, reply, model, response_id, function is not None, parts, finish, grounding
                )
            )
        candidate: dict[str, Any] = {
            "content": {"parts": parts, "role": "model"},
            "finishReason": finish,
            "index": 0,
        }
        if grounding is not None:
            candidate["groundingMetadata"] = grounding
        return json_response(
            {
                "candidates": [candidate],
                "usageMetadata": self.usage(reply, grounded=grounding is not None),
                "modelVersion": model,
                "responseId": response_id,
            }
        )

    def _stream(
        self,
        ex: Exchange,
        reply: Reply,
        model: str,
        response_id: str,
        tool: bool,
        parts: list[dict[str, Any]],
        finish: str,
        grounding: dict[str, Any] | None = None,
    ) -> AsyncIterator[str]:
        chunks: list[list[dict[str, Any]]] = (
            [parts] if tool else [[{"text": p}] for p in reply.pieces] or [[{"text": ""}]]
        )
        thoughts = [p for p in parts if p.get("thought")]
        if thoughts and not tool:
            chunks.insert(0, thoughts)  # the thought summary streams first, as its own chunk
        events = []
        for i, chunk_parts in enumerate(chunks):
            last = i == len(chunks) - 1
            candidate: dict[str, Any] = {
                "content": {"parts": chunk_parts, "role": "model"},
                "index": 0,
            }
            if last:
                candidate["finishReason"] = finish
                if grounding is not None:
                    candidate["groundingMetadata"] = grounding
            events.append(
                sse(
                    {
                        "candidates": [candidate],
                        "usageMetadata": self.usage(
                            reply, final=last, grounded=grounding is not None
                        ),
                        "modelVersion": model,
                        "responseId": response_id,
                    },
                    crlf=True,
                )
            )
        return stream_events(events, ex.stream_mode, terminal=1)


#: the ``toolUsePromptTokenCount`` of a grounded emulated answer
GROUNDING_TOOL_TOKENS = 240


def _searches_web(body: Mapping[str, Any]) -> bool:
    """Whether the request enables Grounding with Google Search."""
    return any(
        isinstance(tool, Mapping) and ("googleSearch" in tool or "google_search" in tool)
        for tool in field(body, "tools") or []
    )


def _grounding(query: str) -> dict[str, Any]:
    """A ``groundingMetadata`` for one search of ``query``."""
    query = " ".join(query.split())[:80] or "emulated search"
    return {
        "webSearchQueries": [query],
        "groundingChunks": [
            {"web": {"uri": "https://example.com/emulated/1", "title": "example.com"}}
        ],
        "searchEntryPoint": {"renderedContent": "<div>emulated</div>"},
    }


def _forced_function(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    config = field(field(body, "toolConfig"), "functionCallingConfig")
    if field(config, "mode") != "ANY":
        return None
    allowed = field(config, "allowedFunctionNames") or None
    for tool in field(body, "tools") or []:
        for declaration in field(tool, "functionDeclarations") or []:
            if allowed is None or field(declaration, "name") in allowed:
                return declaration  # type: ignore[no-any-return]
    return None


def _quota_details(model: str | None = None, retry_delay: str = "1s") -> list[dict[str, Any]]:
    """The ``details`` of Google's 429: which quota (``QuotaFailure``), when to retry
    (``RetryInfo``), and where to read about it (``Help``)."""
    dimensions = {"location": "global", **({"model": model} if model else {})}
    return [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": dimensions,
                    "quotaValue": "10",
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
    ]


def _lower_types(schema: Any) -> Any:
    """Gemini's OpenAPI-style schemas spell types in capitals (``OBJECT``); JSON Schema does not."""
    if isinstance(schema, Mapping):
        return {
            k: (v.lower() if k == "type" and isinstance(v, str) else _lower_types(v))
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_lower_types(v) for v in schema]
    return schema
