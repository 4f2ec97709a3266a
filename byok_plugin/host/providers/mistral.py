"""Mistral chat completions (``POST {base}/v1/chat/completions``), streamed and not.

Base URL: ``https://api.mistral.ai`` (as the ``mistralai`` SDK's ``server_url``).

Usage, from https://docs.mistral.ai/api/ (``ChatCompletionResponse.usage``): ``prompt_tokens``,
``completion_tokens``, ``total_tokens``. Mistral bills prompt-cache hits at 10% of the input price
and reports them in ``usage.prompt_tokens_details.cached_tokens``, part of ``prompt_tokens``
(https://docs.mistral.ai/inference/conversations/advanced/prompt-caching); absent means 0 (no
cache hit). The shipped price table prices them at ``cached_input``. Reasoning (Magistral) tokens are
part of ``completion_tokens`` with no separate count, so they land in ``output_tokens``. Hence:
``input = prompt_tokens - cached_tokens``, ``output = completion_tokens``.
A stream's last chunk carries ``finish_reason`` and ``usage`` together; then ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from byok_plugin.host.providers.base import ProviderClient
from byok_plugin.host.providers.common import CompletionRequest, CompletionResult, StreamEvent
from byok_plugin.host.providers.errors import UnsupportedRequest, error_text
from byok_plugin.host.providers.openai import (
    ChatChunkAccumulator,
    chat_body,
    openai_usage,
    parse_chat_completion,
)


class MistralClient(ProviderClient):
    provider = "mistral"
    default_base_url = "https://api.mistral.ai"

    def headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def error_details(self, payload: Any) -> tuple[str | None, str | None]:
        if not isinstance(payload, Mapping):
            return None, None
        message = payload.get("message", payload.get("detail"))
        if isinstance(payload.get("error"), Mapping):  # gateway errors
            message = payload["error"].get("message", message)
        # any JSON may stand in either (a list of validation errors as "detail", "code": 400)
        code = error_text(payload.get("type")) or error_text(payload.get("code"))
        return error_text(message), code

    def body(self, request: CompletionRequest, *, stream: bool) -> dict[str, Any]:
        if request.web_search is not None:
            raise UnsupportedRequest(
                self.provider, "chat completions have no web search (it is an Agents API connector)"
            )
        body = chat_body(request, max_tokens_field="max_tokens")
        if stream:
            body["stream"] = True
        return body

    async def complete(self, request: CompletionRequest, *, api_key: str) -> CompletionResult:
        payload = await self.request_json(
            "POST", "/v1/chat/completions", api_key=api_key, body=self.body(request, stream=False)
        )
        return parse_chat_completion(self.provider, payload, openai_usage)

    def stream(self, request: CompletionRequest, *, api_key: str) -> AsyncIterator[StreamEvent]:
        return self.iter_stream(
            "/v1/chat/completions",
            ChatChunkAccumulator(self, request.model, openai_usage),
            api_key=api_key,
            body=self.body(request, stream=True),
        )

    async def list_models(self, *, api_key: str) -> list[str]:
        payload = await self.request_json("GET", "/v1/models", api_key=api_key)
        return self.listed(payload, "data", "id")
