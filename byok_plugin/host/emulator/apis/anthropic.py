"""Anthropic's Messages API (``/v1/messages``, ``/v1/models``), streaming included.

Wire format as in https://docs.anthropic.com/en/api/messages and
https://docs.anthropic.com/en/docs/build-with-claude/streaming : the key in ``x-api-key`` (or, as
the ``anthropic`` SDK 2.x sends it, ``Authorization: Bearer``), an
``anthropic-version`` header required; ``usage`` ``{input_tokens, cache_creation_input_tokens,
cache_read_input_tokens, output_tokens}`` where ``input_tokens`` counts only the uncached input and
``output_tokens`` includes extended-thinking tokens (broken out in
``output_tokens_details.thinking_tokens``). A stream sends ``message_start`` (the input
usage), content block events, ``message_delta`` (stop reason and cumulative ``output_tokens``) and
``message_stop``. Errors: ``{"type": "error", "error": {"type", "message"}, "request_id"}``.

A request with the ``web_search_20250305`` server tool searches :func:`searches_of` times: each
search is a ``server_tool_use`` block and its ``web_search_tool_result`` before the text, the
results' :data:`SEARCH_RESULT_TOKENS` tokens are added to ``input_tokens``, and the final usage
counts ``server_tool_use.web_search_requests``, as in the recorded
``fixtures/provider-recordings/anthropic/web_search_stream.sse`` (where ``message_start`` reports
the input before the searches and ``message_delta`` the input with their results).
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

_ERROR_TYPES = {
    "auth": "authentication_error",
    "rate_limit": "rate_limit_error",
    "server": "api_error",
    "bad_request": "invalid_request_error",
    "not_found": "not_found_error",
    "route": "not_found_error",
    "method": "invalid_request_error",
}
_STOP = {"stop": "end_turn", "length": "max_tokens"}
#: input tokens each emulated search's results add to the call
SEARCH_RESULT_TOKENS = 1200


def searches_of(body: Mapping[str, Any]) -> int:
    """How many times the emulated model searches: ``min(max_uses, 2)`` of a ``web_search``
    server tool (once without ``max_uses``), 0 without the tool."""
    for tool in body.get("tools") or []:
        if isinstance(tool, Mapping) and str(tool.get("type", "")).startswith("web_search_"):
            max_uses = tool.get("max_uses")
            return min(max_uses, 2) if isinstance(max_uses, int) and max_uses > 0 else 1
    return 0


def _has_cache_control(body: Mapping[str, Any]) -> bool:
    def walk(value: Any) -> bool:
        if isinstance(value, Mapping):
            return "cache_control" in value or any(walk(v) for v in value.values())
        if isinstance(value, list):
            return any(walk(v) for v in value)
        return False

    # a top-level ``cache_control`` (automatic caching) caches the request up to its last block
    return (
        "cache_control" in body
        or walk(body.get("system"))
        or walk(body.get("messages"))
        or walk(body.get("tools"))
    )


class AnthropicAPI(ProviderAPI):
    name = "anthropic"
    models = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1", "claude-3-5-haiku-latest")

    def key_from(self, request: Request) -> str | None:
        # ``x-api-key`` as documented; the SDK (2.x) sends ``Authorization: Bearer``, also accepted
        return request.headers.get("x-api-key") or super().key_from(request)

    def preflight(self, request: Request) -> Response | None:
        if not request.headers.get("anthropic-version"):
            return self.error(400, "bad_request", "anthropic-version: header is required")
        return None

    def error(self, status: int, kind: str, message: str) -> Response:
        if kind == "auth":
            message = "invalid x-api-key"
        if status == 529:
            kind, message = "overloaded", "Overloaded"
        err_type = (
            "overloaded_error" if kind == "overloaded" else _ERROR_TYPES.get(kind, "api_error")
        )
        request_id = new_id("req_")
        return json_response(
            {
                "type": "error",
                "error": {"type": err_type, "message": message},
                "request_id": request_id,
            },
            status,
            {"request-id": request_id},
        )

    def no_credit(self) -> Response:
        return self.error(
            400,
            "bad_request",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
            "Billing to upgrade or purchase credits.",
        )

    def routes(self) -> list[Route]:
        return [
            self.route("/v1/models", self.list_models, methods=("GET",)),
            self.route(
                "/v1/models/{model}",
                self.get_model,
                methods=("GET",),
                model_of=lambda r, b: r.path_params.get("model"),
            ),
            self.route("/v1/messages", self.messages),
            self.route("/v1/messages/count_tokens", self.count_tokens),
        ]

    @staticmethod
    def model_info(model: str) -> dict[str, Any]:
        return {
            "type": "model",
            "id": model,
            "display_name": model,
            "created_at": "2025-09-29T00:00:00Z",
        }

    async def list_models(self, ex: Exchange) -> Response:
        data = [self.model_info(m) for m in self.models]
        return json_response(
            {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        )

    async def get_model(self, ex: Exchange) -> Response:
        model = ex.request.path_params["model"]
        if model not in self.models:
            return self.error(404, "not_found", f"model: {model}")
        return json_response(self.model_info(model))

    async def count_tokens(self, ex: Exchange) -> Response:
        """``POST /v1/messages/count_tokens``: what ``input_tokens`` plus the cache fields of the
        same request to ``/v1/messages`` would add up to."""
        reply = self.reply(ex.body, count_only=True)
        return json_response({"input_tokens": reply.prompt_tokens})

    def reply(self, body: Mapping[str, Any], *, count_only: bool = False) -> Reply:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model: Field required")
        if not count_only and not isinstance(body.get("max_tokens"), int):
            raise BadRequest("max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: at least one message is required")
        parts = [text_of(body["system"])] if body.get("system") else []
        parts += [text_of(m.get("content")) for m in messages if isinstance(m, Mapping)]
        users = [
            text_of(m.get("content"))
            for m in messages
            if isinstance(m, Mapping) and m.get("role") == "user"
        ]
        fmt = body.get("output_format") or (body.get("output_config") or {}).get("format") or {}
        schema = (
            fmt.get("schema")
            if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema"
            else None
        )
        thinking = body.get("thinking") or {}
        return make_reply(
            provider=self.name,
            model=model,
            parts=parts,
            last_user=users[-1] if users else "",
            max_tokens=body.get("max_tokens"),
            schema=schema,
            reasoning=(
                True
                if isinstance(thinking, Mapping) and thinking.get("type") in ("enabled", "adaptive")
                else None
            ),
            cache_write=_has_cache_control(body),
        )

    @staticmethod
    def input_usage(reply: Reply, searches: int = 0) -> dict[str, Any]:
        return {
            "input_tokens": reply.uncached_prompt_tokens + searches * SEARCH_RESULT_TOKENS,
            "cache_creation_input_tokens": reply.cache_write_tokens,
            "cache_read_input_tokens": reply.cached_tokens,
        }

    @staticmethod
    def thinking_usage(reply: Reply) -> dict[str, Any]:
        """``output_tokens_details.thinking_tokens``, the share of ``output_tokens`` spent thinking
        (as the SDK's ``Usage`` type documents it); only present when the model thought."""
        if not reply.reasoning_tokens:
            return {}
        return {"output_tokens_details": {"thinking_tokens": reply.reasoning_tokens}}

    @staticmethod
    def forced_tool(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
        tools = [
            t for t in body.get("tools") or [] if isinstance(t, Mapping) and "input_schema" in t
        ]
        choice = body.get("tool_choice") or {}
        if (
            not tools
            or not isinstance(choice, Mapping)
            or choice.get("type") not in ("any", "tool")
        ):
            return None
        if choice.get("type") == "tool":
            return next((t for t in tools if t.get("name") == choice.get("name")), None)
        return tools[0]

    async def messages(self, ex: Exchange) -> Response:
        body = ex.body
        reply = self.reply(body)
        tool = self.forced_tool(body)
        searches = searches_of(body) if tool is None else 0
        content: list[dict[str, Any]] = []
        if reply.reasoning_tokens:
            content.append(
                {"type": "thinking", "thinking": "Emulated thinking.", "signature": "ZW11bGF0ZWQ="}
            )
        for i in range(searches):
            search_id = new_id("srvtoolu_")
            content.append(
                {
                    "type": "server_tool_use",
                    "id": search_id,
                    "name": "web_search",
                    "input": {"query": f"emulated search {i + 1}"},
                }
            )
            content.append(
                {
                    "type": "web_search_tool_result",
                    "tool_use_id": search_id,
                    "content": [
                        {
                            "type": "web_search_result",
                            "title": f"Emulated result {i + 1}",
                            "url": f"https://example.com/emulated/{i + 1}",
                            "encrypted_content": "ZW11bGF0ZWQ=",
                            "page_age": None,
                        }
                    ],
                }
            )
        if tool is not None:
            content.append(
                {
                    "type": "tool_use",
                    "id": new_id("toolu_"),
                    "name": tool["name"],
                    "input": schema_instance(tool["input_schema"]),
                }
            )
            stop = "tool_use"
        else:
            content.append({"type": "text", "text": reply.text})
            stop = _STOP[reply.finish]
        output_tokens = reply.output_tokens + reply.reasoning_tokens
        message = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.state.answered_model(self.name, body["model"]),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                **self.input_usage(reply, searches),
                "output_tokens": output_tokens,
                **self.thinking_usage(reply),
                **self.search_usage(searches),
                "service_tier": "standard",
            },
        }
        if body.get("stream"):
            return sse_response(self._stream(ex, message, reply, searches))
        return json_response(message)

    @staticmethod
    def search_usage(searches: int) -> dict[str, Any]:
        """``server_tool_use``: the call's searches; only present when it searched."""
        if not searches:
            return {}
        return {"server_tool_use": {"web_search_requests": searches, "web_fetch_requests": 0}}

    def _stream(
        self, ex: Exchange, message: dict[str, Any], reply: Reply, searches: int = 0
    ) -> AsyncIterator[str]:
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**self.input_usage(reply), "output_tokens": 1, "service_tier": "standard"},
        }
        events = [sse({"type": "message_start", "message": start}, "message_start")]
        for index, block in enumerate(message["content"]):
            kind = block["type"]
            empty = {
                "text": {"type": "text", "text": ""},
                "thinking": {"type": "thinking", "thinking": "", "signature": ""},
            }
            head = empty.get(
                kind, {**block, "input": {}} if kind in ("tool_use", "server_tool_use") else block
            )
            events.append(
                sse(
                    {"type": "content_block_start", "index": index, "content_block": head},
                    "content_block_start",
                )
            )
            if index == 0:
                events.append(sse({"type": "ping"}, "ping"))
            if kind == "text":
                deltas = [{"type": "text_delta", "text": p} for p in reply.pieces]
            elif kind == "thinking":
                deltas = [
                    {"type": "thinking_delta", "thinking": block["thinking"]},
                    {"type": "signature_delta", "signature": block["signature"]},
                ]
            elif kind == "web_search_tool_result":  # sent whole in its start event
                deltas = []
            else:
                import json

                deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
            events += [
                sse(
                    {"type": "content_block_delta", "index": index, "delta": d},
                    "content_block_delta",
                )
                for d in deltas
            ]
            events.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
        usage = {
            **self.input_usage(reply, searches),
            "output_tokens": message["usage"]["output_tokens"],
            **self.thinking_usage(reply),
            **self.search_usage(searches),
        }
        events.append(
            sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                    "usage": usage,
                },
                "message_delta",
            )
        )
        events.append(sse({"type": "message_stop"}, "message_stop"))
        return stream_events(events, ex.stream_mode, terminal=2)
