"""Provider name -> client class, and a factory building every client over one shared HTTP client."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from byok_plugin.host.providers.anthropic import AnthropicClient
from byok_plugin.host.providers.base import ProviderClient
from byok_plugin.host.providers.exa import ExaClient
from byok_plugin.host.providers.google import GoogleClient
from byok_plugin.host.providers.mistral import MistralClient
from byok_plugin.host.providers.openai import OpenAIClient
from byok_plugin.host.providers.retry import RetryPolicy

CLIENT_CLASSES: Mapping[str, type[ProviderClient]] = {
    "openai": OpenAIClient,
    "anthropic": AnthropicClient,
    "google": GoogleClient,
    "mistral": MistralClient,
    "exa": ExaClient,
}
PROVIDERS = tuple(CLIENT_CLASSES)
#: the providers with chat completions (all but Exa)
MODEL_PROVIDERS = ("openai", "anthropic", "google", "mistral")


class UnknownProvider(ValueError):
    def __init__(self, provider: str) -> None:
        self.provider = provider
        super().__init__(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


def create_client(
    provider: str,
    http: httpx.AsyncClient,
    *,
    environ: Mapping[str, str] | None = None,
    base_url: str | None = None,
    retry: RetryPolicy | None = None,
    timeout: httpx.Timeout | float | None = None,
) -> ProviderClient:
    """The client of ``provider``, over ``http``; base URL from ``base_url``, else
    ``BYOK_<PROVIDER>_BASE_URL`` in ``environ``, else the public API."""
    try:
        client_class = CLIENT_CLASSES[provider]
    except KeyError:
        raise UnknownProvider(provider) from None
    return client_class(http, base_url=base_url, environ=environ, retry=retry, timeout=timeout)


def create_clients(
    http: httpx.AsyncClient,
    *,
    environ: Mapping[str, str] | None = None,
    base_urls: Mapping[str, str] | None = None,
    retry: RetryPolicy | None = None,
    timeout: httpx.Timeout | float | None = None,
) -> dict[str, ProviderClient]:
    """Every provider's client over the one shared ``http`` client."""
    base_urls = base_urls or {}
    unknown = set(base_urls) - set(PROVIDERS)
    if unknown:
        raise UnknownProvider(sorted(unknown)[0])
    return {
        name: create_client(
            name, http, environ=environ, base_url=base_urls.get(name), retry=retry, timeout=timeout
        )
        for name in PROVIDERS
    }


def new_http_client(*, max_connections: int = 100, max_keepalive: int = 20) -> httpx.AsyncClient:
    """The shared ``httpx.AsyncClient`` a host creates once (pooled, HTTP/1.1 keep-alive) and closes
    at shutdown. Timeouts are set per request by each provider client."""
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_keepalive
        ),
        follow_redirects=False,
        trust_env=False,
    )
