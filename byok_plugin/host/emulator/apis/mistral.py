"""Mistral's chat completions API (``/v1/chat/completions``, ``/v1/models[/{id}]``), streaming
included.

Wire format as in https://docs.mistral.ai/api/ (``POST /v1/chat/completions``): OpenAI-shaped, with
``usage`` ``{prompt_tokens, completion_tokens, total_tokens}`` plus, when a prefix was served from
the prompt cache, ``prompt_tokens_details.cached_tokens``
(https://docs.mistral.ai/inference/conversations/advanced/prompt-caching). Reasoning (Magistral)
tokens are part of ``completion_tokens``; Mistral reports no separate count. A stream's last chunk
carries the ``finish_reason`` *and* the ``usage``; then ``data: [DONE]``. Errors:
``{"object": "error", "message", "type", "param", "code"}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response
from starlette.routing import Route

from byok_plugin.host.emulator.apis.base import (
    Exchange,
    ProviderAPI,
    json_response,
    new_id,
    now,
    sse,
    sse_response,
    stream_events,
)
from byok_plugin.host.emulator.apis.openai import chat_reply, tool_call_payload, wanted_tool_call
from byok_plugin.host.emulator.synth import Reply

_ERROR_TYPES = {
    "auth": "authentication_error",
    "rate_limit": "rate_limited",
    "server": "internal_server_error",
    "bad_request": "invalid_request_error",
    "not_found": "invalid_request_error",
}


class MistralAPI(ProviderAPI):
    name = "mistral"
    models = (
        "mistral-small-latest",
        "mistral-medium-latest",
        "mistral-large-latest",
        "magistral-medium-latest",
    )

    def error(self, status: int, kind: str, message: str) -> Response:
        if kind == "auth":
            message = "Unauthorized"
        return json_response(
            {
                "object": "error",
                "message": message,
                "type": _ERROR_TYPES.get(kind, "invalid_request_error"),
                "param": None,
                "code": str(status),
            },
            status,
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
        ]

    @staticmethod
    def model_info(model: str) -> dict[str, Any]:
        return {
            "id": model,
            "object": "model",
            "created": 1727740800,
            "owned_by": "mistralai",
            "capabilities": {"completion_chat": True, "function_calling": True},
            "type": "base",
        }

    async def list_models(self, ex: Exchange) -> Response:
        return json_response({"object": "list", "data": [self.model_info(m) for m in self.models]})

    async def get_model(self, ex: Exchange) -> Response:
        model = ex.request.path_params["model"]
        if model not in self.models:
            return self.error(404, "not_found", f"Model '{model}' not found")
        return json_response(self.model_info(model))

    def usage(self, reply: Reply) -> dict[str, Any]:
        completion = reply.output_tokens + reply.reasoning_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": reply.prompt_tokens + completion,
        }
        if reply.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
        return usage

    async def chat(self, ex: Exchange) -> Response:
        body = ex.body
        reply = chat_reply(self.name, body)
        model = self.state.answered_model(self.name, body["model"])
        function = wanted_tool_call(body)
        tool_calls = [tool_call_payload(function, new_id("")[:9])] if function else None
        finish = "tool_calls" if tool_calls else reply.finish
        if body.get("stream"):
            return sse_response(self._stream(ex, reply, model, finish, tool_calls))
        message: dict[str, Any] = {"role": "assistant", "content": "" if tool_calls else reply.text}
        message["tool_calls"] = tool_calls
        return json_response(
            {
                "id": new_id(""),
                "object": "chat.completion",
                "model": model,
                "created": now(),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": self.usage(reply),
            }
        )

    def _stream(
        self,
        ex: Exchange,
        reply: Reply,
        model: str,
        finish: str,
        tool_calls: list[dict[str, Any]] | None,
    ) -> AsyncIterator[str]:
        base = {
            "id": new_id(""),
            "object": "chat.completion.chunk",
            "created": now(),
            "model": model,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return sse({**base, "choices": [choice], **extra})

        events = [chunk({"role": "assistant", "content": ""})]
        pieces: list[dict[str, Any]] = (
            [{"tool_calls": tool_calls}] if tool_calls else [{"content": p} for p in reply.pieces]
        )
        if not pieces:
            pieces = [{"content": ""}]
        events += [chunk(delta) for delta in pieces[:-1]]
        events.append(chunk(pieces[-1], finish, usage=self.usage(reply)))
        events.append("data: [DONE]\n\n")
        return stream_events(events, ex.stream_mode, terminal=2)
