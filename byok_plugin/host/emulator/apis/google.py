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
    json_response,
    new_id,
    sse,
    sse_response,
    stream_events,
)
from byok_plugin.host.emulator.synth import Reply, make_reply, schema_instance, text_of

_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}


def _target(request: Request, body: Mapping[str, Any]) -> str | None:
    return request.path_params.get("target", "").split(":", 1)[0] or None


def _streamed(request: Request, body: Mapping[str, Any]) -> bool:
    return request.path_params.get("target", "").endswith(":streamGenerateContent")


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
        return json_response({"error": payload}, status)

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
        return [
            self.route(
                "/v1beta/models", self.list_models, methods=("GET",), model_of=lambda r, b: None
            ),
            self.route(
                "/v1beta/models/{target}", self.generate, model_of=_target, stream_of=_streamed
            ),
        ]

    async def list_models(self, ex: Exchange) -> Response:
        return json_response(
            {
                "models": [
                    {
                        "name": f"models/{m}",
                        "version": "001",
                        "displayName": m,
                        "inputTokenLimit": 1048576,
                        "outputTokenLimit": 65536,
                        "supportedGenerationMethods": ["generateContent", "countTokens"],
                    }
                    for m in self.models
                ]
            }
        )

    def reply(self, model: str, body: Mapping[str, Any]) -> Reply:
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        system = body.get("systemInstruction") or body.get("system_instruction")
        parts = [text_of(system)] if system else []
        parts += [text_of(c.get("parts")) for c in contents if isinstance(c, Mapping)]
        users = [
            text_of(c.get("parts"))
            for c in contents
            if isinstance(c, Mapping) and c.get("role", "user") == "user"
        ]
        config = body.get("generationConfig") or {}
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        if schema is None and config.get("responseMimeType") == "application/json":
            schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        thinking = config.get("thinkingConfig") or {}
        return make_reply(
            provider=self.name,
            model=model,
            parts=parts,
            last_user=users[-1] if users else "",
            max_tokens=config.get("maxOutputTokens"),
            schema=_lower_types(schema) if schema is not None else None,
            reasoning=bool(thinking.get("thinkingBudget")),
        )

    @staticmethod
    def usage(reply: Reply, *, final: bool = True) -> dict[str, Any]:
        if not final:
            return {"promptTokenCount": reply.prompt_tokens, "totalTokenCount": reply.prompt_tokens}
        usage: dict[str, Any] = {
            "promptTokenCount": reply.prompt_tokens,
            "candidatesTokenCount": reply.output_tokens,
            "totalTokenCount": reply.prompt_tokens + reply.output_tokens + reply.reasoning_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": reply.prompt_tokens}],
        }
        if reply.cached_tokens:
            usage["cachedContentTokenCount"] = reply.cached_tokens
            usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": reply.cached_tokens}]
        if reply.reasoning_tokens:
            usage["thoughtsTokenCount"] = reply.reasoning_tokens
        return usage

    async def generate(self, ex: Exchange) -> Response:
        target = ex.request.path_params["target"]
        model, _, method = target.partition(":")
        if method not in ("generateContent", "streamGenerateContent"):
            return self.error(
                404, "not_found", f"Method {method!r} is not found for models/{model}."
            )
        reply = self.reply(model, ex.body)
        model = self.state.answered_model(self.name, model)  # the reply's modelVersion
        function = _forced_function(ex.body)
        response_id = new_id("")[:22]
        if function is not None:
            parts = [
                {
                    "functionCall": {
                        "name": function["name"],
                        "args": schema_instance(
                            _lower_types(
                                function.get("parametersJsonSchema")
                                or function.get("parameters")
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
        if method == "streamGenerateContent":
            if ex.query.get("alt") != "sse":
                raise BadRequest("the emulator streams only with ?alt=sse")
            return sse_response(
                self._stream(ex, reply, model, response_id, function is not None, parts, finish)
            )
        return json_response(
            {
                "candidates": [
                    {
                        "content": {"parts": parts, "role": "model"},
                        "finishReason": finish,
                        "index": 0,
                    }
                ],
                "usageMetadata": self.usage(reply),
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
    ) -> AsyncIterator[str]:
        chunks: list[list[dict[str, Any]]] = (
            [parts] if tool else [[{"text": p}] for p in reply.pieces] or [[{"text": ""}]]
        )
        events = []
        for i, chunk_parts in enumerate(chunks):
            last = i == len(chunks) - 1
            candidate: dict[str, Any] = {
                "content": {"parts": chunk_parts, "role": "model"},
                "index": 0,
            }
            if last:
                candidate["finishReason"] = finish
            events.append(
                sse(
                    {
                        "candidates": [candidate],
                        "usageMetadata": self.usage(reply, final=last),
                        "modelVersion": model,
                        "responseId": response_id,
                    },
                    crlf=True,
                )
            )
        return stream_events(events, ex.stream_mode, terminal=1)


def _forced_function(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode")
    if mode != "ANY":
        return None
    for tool in body.get("tools") or []:
        for declaration in (tool or {}).get("functionDeclarations") or []:
            return declaration
    return None


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
