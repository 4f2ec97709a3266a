"""OpenAI's Chat Completions API (``/v1/chat/completions``, ``/v1/models``), streaming included,
and the Responses API (``/v1/responses``, in :mod:`.openai_responses`).

Wire format as in https://platform.openai.com/docs/api-reference/chat : usage carries
``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens``;
``completion_tokens`` includes the reasoning tokens and ``prompt_tokens`` the cached ones. A stream
sends ``chat.completion.chunk`` events, with ``stream_options.include_usage`` one last chunk with
empty ``choices`` and the usage, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.responses import Response
from starlette.routing import Route

from byok_plugin.host.emulator.apis.base import (
    BadRequest,
    Exchange,
    ProviderAPI,
    json_response,
    new_id,
    now,
    sse,
    sse_response,
    stream_events,
)
from byok_plugin.host.emulator.apis.openai_responses import build_response, responses_reply
from byok_plugin.host.emulator.apis.openai_responses import (
    stream_events as responses_stream_events,
)
from byok_plugin.host.emulator.synth import Reply, make_reply, text_of

_ERROR_TYPES = {
    "auth": ("invalid_request_error", "invalid_api_key"),
    "rate_limit": ("requests", "rate_limit_exceeded"),
    "server": ("server_error", None),
    "bad_request": ("invalid_request_error", None),
    "not_found": ("invalid_request_error", "model_not_found"),
}


def chat_reply(provider: str, body: Mapping[str, Any]) -> Reply:
    """The deterministic reply to an OpenAI-shaped chat request (OpenAI and Mistral)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array")
    parts = [text_of(m.get("content")) for m in messages if isinstance(m, Mapping)]
    users = [
        text_of(m.get("content"))
        for m in messages
        if isinstance(m, Mapping) and m.get("role") == "user"
    ]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    fmt = body.get("response_format") or {}
    schema = None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
    elif isinstance(fmt, Mapping) and fmt.get("type") == "json_object":
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    return make_reply(
        provider=provider,
        model=model,
        parts=parts,
        last_user=users[-1] if users else "",
        max_tokens=int(max_tokens) if max_tokens else None,
        schema=schema,
        reasoning=True if body.get("reasoning_effort") else None,
    )


def wanted_tool_call(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The function the request forces (``tool_choice`` ``required`` or a named function)."""
    tools = [
        t for t in body.get("tools") or [] if isinstance(t, Mapping) and t.get("type") == "function"
    ]
    choice = body.get("tool_choice")
    if not tools or choice in (None, "auto", "none"):
        return None
    if isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name")
        return next((t["function"] for t in tools if t["function"].get("name") == name), None)
    return tools[0]["function"] if choice in ("required", "any") else None


def tool_call_payload(function: Mapping[str, Any], call_id: str) -> dict[str, Any]:
    from byok_plugin.host.emulator.synth import schema_instance

    arguments = schema_instance(function.get("parameters") or {"type": "object"})
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": function.get("name"), "arguments": json.dumps(arguments)},
    }


class OpenAIAPI(ProviderAPI):
    name = "openai"
    models = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini", "gpt-5-mini")

    def error(self, status: int, kind: str, message: str) -> Response:
        err_type, code = _ERROR_TYPES.get(kind, ("invalid_request_error", None))
        if kind == "auth":
            message = (
                "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
        return json_response(
            {"error": {"message": message, "type": err_type, "param": None, "code": code}},
            status,
            {"x-request-id": new_id("req_")},
        )

    def no_credit(self) -> Response:
        return json_response(
            {
                "error": {
                    "message": "You exceeded your current quota, please check your plan and "
                    "billing details.",
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            },
            429,
            {"x-request-id": new_id("req_")},
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
            self.route("/v1/chat/completions", self.chat),
            self.route("/v1/responses", self.responses),
            self.route("/v1/responses/input_tokens", self.count_input_tokens),
        ]

    @staticmethod
    def model_info(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1715367049, "owned_by": "system"}

    async def list_models(self, ex: Exchange) -> Response:
        return json_response({"object": "list", "data": [self.model_info(m) for m in self.models]})

    async def get_model(self, ex: Exchange) -> Response:
        model = ex.request.path_params["model"]
        if model not in self.models:
            return self.error(
                404,
                "not_found",
                f"The model '{model}' does not exist or you do not have access to it.",
            )
        return json_response(self.model_info(model))

    async def responses(self, ex: Exchange) -> Response:
        body = ex.body
        model = body.get("model")
        answered = self.state.answered_model(self.name, model) if isinstance(model, str) else ""
        response, reply = build_response(body, answered)
        if body.get("stream"):
            events = responses_stream_events(response, reply)
            return sse_response(stream_events(events, ex.stream_mode, terminal=1))
        return json_response(response)

    async def count_input_tokens(self, ex: Exchange) -> Response:
        """``POST /v1/responses/input_tokens``: the ``input_tokens`` the same request to
        ``/v1/responses`` would report."""
        reply = responses_reply(ex.body)
        return json_response(
            {"object": "response.input_tokens", "input_tokens": reply.prompt_tokens}
        )

    def usage(self, reply: Reply) -> dict[str, Any]:
        completion = reply.output_tokens + reply.reasoning_tokens
        return {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": reply.prompt_tokens + completion,
            "prompt_tokens_details": {
                "cached_tokens": reply.cached_tokens,
                "cache_write_tokens": 0,
                "audio_tokens": 0,
            },
            "completion_tokens_details": {
                "reasoning_tokens": reply.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    async def chat(self, ex: Exchange) -> Response:
        body = ex.body
        reply = chat_reply(self.name, body)
        model = self.state.answered_model(self.name, body["model"])
        function = wanted_tool_call(body)
        tool_calls = [tool_call_payload(function, new_id("call_"))] if function else None
        finish = "tool_calls" if tool_calls else reply.finish
        content = None if tool_calls else reply.text
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return sse_response(self._stream(ex, reply, model, finish, tool_calls, include_usage))
        return json_response(
            {
                "id": new_id("chatcmpl-"),
                "object": "chat.completion",
                "created": now(),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": content,
                            "refusal": None,
                            "annotations": [],
                            **({"tool_calls": tool_calls} if tool_calls else {}),
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": self.usage(reply),
                "service_tier": "default",
                "system_fingerprint": "fp_emulated",
            }
        )

    def _stream(
        self,
        ex: Exchange,
        reply: Reply,
        model: str,
        finish: str,
        tool_calls: list[dict[str, Any]] | None,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        base = {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": now(),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_emulated",
        }
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse({**base, "choices": [choice], **extra})

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if tool_calls:
            for i, call in enumerate(tool_calls):
                events.append(chunk({"tool_calls": [{"index": i, **call}]}))
        else:
            events += [chunk({"content": piece}) for piece in reply.pieces]
        events.append(chunk({}, finish))
        terminal = 1
        if include_usage:
            events.append(sse({**base, "choices": [], "usage": self.usage(reply)}))
            terminal = 2
        events.append("data: [DONE]\n\n")
        return stream_events(events, ex.stream_mode, terminal=terminal)
