"""Async clients of OpenAI, Anthropic, Google Gemini, Mistral and Exa over one shared httpx client.

::

    http = new_http_client()                       # once per process; await http.aclose() at exit
    clients = create_clients(http, environ=settings.environ)
    result = await clients["openai"].complete(CompletionRequest.simple("gpt-4o-mini", "Hi"), api_key=key)
    result.usage                                    # byok_hookspecs.Usage, disjoint token counts

    async for event in clients["anthropic"].stream(request, api_key=key):
        if isinstance(event, TextDelta): ...        # visible text as it arrives
        else: event.result.usage                    # StreamDone: the complete result, with usage

Errors are :mod:`byok_plugin.host.providers.errors`; none ever carries the key.
"""

from __future__ import annotations

from byok_plugin.host.providers.anthropic import AnthropicClient
from byok_plugin.host.providers.base import DEFAULT_TIMEOUT, ProviderClient, base_url_var
from byok_plugin.host.providers.common import (
    CompletionRequest,
    CompletionResult,
    FinishReason,
    FunctionTool,
    Message,
    SearchHit,
    SearchRequest,
    SearchResult,
    StreamDone,
    StreamEvent,
    TextDelta,
    Tool,
    ToolCall,
    WebSearchTool,
)
from byok_plugin.host.providers.errors import (
    AuthError,
    BadRequestError,
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    RateLimitError,
    ServerError,
    UnsupportedRequest,
)
from byok_plugin.host.providers.exa import EXA_SEARCH_MODEL, ExaClient
from byok_plugin.host.providers.google import GoogleClient
from byok_plugin.host.providers.mistral import MistralClient
from byok_plugin.host.providers.openai import OpenAIClient
from byok_plugin.host.providers.registry import (
    CLIENT_CLASSES,
    MODEL_PROVIDERS,
    PROVIDERS,
    UnknownProvider,
    create_client,
    create_clients,
    new_http_client,
)
from byok_plugin.host.providers.retry import NO_RETRY, RetryPolicy, parse_retry_after

__all__ = [
    "CLIENT_CLASSES",
    "DEFAULT_TIMEOUT",
    "EXA_SEARCH_MODEL",
    "MODEL_PROVIDERS",
    "NO_RETRY",
    "PROVIDERS",
    "AnthropicClient",
    "AuthError",
    "BadRequestError",
    "CompletionRequest",
    "CompletionResult",
    "ExaClient",
    "FinishReason",
    "FunctionTool",
    "GoogleClient",
    "Message",
    "MistralClient",
    "OpenAIClient",
    "ProtocolError",
    "ProviderClient",
    "ProviderError",
    "ProviderTimeout",
    "ProviderUnreachable",
    "RateLimitError",
    "RetryPolicy",
    "SearchHit",
    "SearchRequest",
    "SearchResult",
    "ServerError",
    "StreamDone",
    "StreamEvent",
    "TextDelta",
    "Tool",
    "ToolCall",
    "UnknownProvider",
    "UnsupportedRequest",
    "WebSearchTool",
    "base_url_var",
    "create_client",
    "create_clients",
    "new_http_client",
    "parse_retry_after",
]
