"""The default live key check (``byok_validate_key``): one cheap authenticated call per provider.

| provider | request | key sent as |
|---|---|---|
| openai | ``GET {base}/v1/models`` | ``Authorization: Bearer`` |
| anthropic | ``GET {base}/v1/models`` | ``x-api-key`` + ``anthropic-version: 2023-06-01`` |
| google | ``GET {base}/v1beta/models?pageSize=1`` | ``x-goog-api-key`` (never in the URL) |
| mistral | ``GET {base}/v1/models`` | ``Authorization: Bearer`` |
| exa | ``POST {base}/search`` with one result | ``x-api-key`` |

Listing models is free at the four model providers. Exa has no free authenticated endpoint for
every plan (its Websets list needs a Websets plan), so its check is the smallest search (one
result, no contents), which Exa bills as one search.

Base URLs come from ``BYOK_<PROVIDER>_BASE_URL`` (shared with the host's provider clients and the
emulator), defaulting to the providers' own. A base URL may or may not end in the API version
(``https://api.openai.com/v1`` and ``https://api.openai.com`` both work).

Outcomes: 2xx is ``valid``; 401/403 (and Gemini's 400 ``API_KEY_INVALID``) is ``invalid``, with the
provider's message with anything resembling the key removed; OpenAI's 429 ``insufficient_quota``
and Anthropic's 400 "credit balance is too low" are ``no_credit``; another 429 is ``valid`` (the key
authenticated, it is only rate-limited or out of quota; the message says so); anything else, a
timeout or a connection error is ``unreachable``. ``BYOK_VALIDATE_KEYS=0`` answers ``skipped``
without any network call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from byok_hookspecs import KeyCheck, KeyCheckStatus
from byok_hookspecs import redact as redact_secrets

from byok_plugin.settings import Settings

__all__ = ["DEFAULT_BASE_URLS", "KeyValidator", "ProviderCheck", "redact"]

log = logging.getLogger("byok.validation")

DEFAULT_BASE_URLS: Mapping[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "google": "https://generativelanguage.googleapis.com",
    "mistral": "https://api.mistral.ai",
    "exa": "https://api.exa.ai",
}
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_TIMEOUT = 5.0
_MAX_MESSAGE = 300


@dataclass(frozen=True, slots=True)
class ProviderCheck:
    """How one provider's key is checked."""

    method: str
    version: str | None
    path: str
    auth_header: str
    bearer: bool = False
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    json_body: Mapping[str, Any] | None = None

    def url(self, base_url: str) -> str:
        base = base_url.rstrip("/")
        if self.version and not base.endswith("/" + self.version):
            base = f"{base}/{self.version}"
        return f"{base}/{self.path}"

    def headers(self, api_key: str) -> dict[str, str]:
        value = f"Bearer {api_key}" if self.bearer else api_key
        return {self.auth_header: value, "accept": "application/json", **self.extra_headers}


CHECKS: Mapping[str, ProviderCheck] = {
    "openai": ProviderCheck("GET", "v1", "models", "authorization", bearer=True),
    "anthropic": ProviderCheck(
        "GET", "v1", "models", "x-api-key", extra_headers={"anthropic-version": ANTHROPIC_VERSION}
    ),
    "google": ProviderCheck("GET", "v1beta", "models", "x-goog-api-key", params={"pageSize": "1"}),
    "mistral": ProviderCheck("GET", "v1", "models", "authorization", bearer=True),
    "exa": ProviderCheck(
        "POST",
        None,
        "search",
        "x-api-key",
        json_body={"query": "byok key check", "numResults": 1, "type": "auto"},
    ),
}


def redact(text: str, api_key: str) -> str:
    """A provider's message without the key in any form (:func:`byok_hookspecs.redact`), cut to
    a readable length."""
    if not text:
        return ""
    out = redact_secrets(text, api_key)
    return out if len(out) <= _MAX_MESSAGE else out[: _MAX_MESSAGE - 3] + "..."


def _provider_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or ""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            for name in ("message", "detail", "error"):
                message = error.get(name)
                if isinstance(message, str):
                    return message
        if isinstance(error, str):
            return error
        for name in ("message", "detail"):
            message = body.get(name)
            if isinstance(message, str):
                return message
    return response.reason_phrase or ""


def _no_credit(response: httpx.Response) -> bool:
    """OpenAI's 429 ``insufficient_quota``, or Anthropic's 400 about the credit balance."""
    status, text = response.status_code, response.text
    return (status == 429 and "insufficient_quota" in text) or (
        status == 400 and "credit balance is too low" in text
    )


def _gemini_invalid_key(response: httpx.Response) -> bool:
    return response.status_code == 400 and (
        "API_KEY_INVALID" in response.text or "API key not valid" in response.text
    )


class KeyValidator:
    """Checks keys against the providers (or whatever their base URLs point to).

    :param base_urls: provider -> base URL; missing ones use :data:`DEFAULT_BASE_URLS`.
    :param enabled: ``False`` answers ``skipped`` without a call.
    :param timeout: seconds, for connecting and for reading.
    :param transport: an httpx transport (tests may pass a real loopback one; default: network).
    """

    def __init__(
        self,
        *,
        base_urls: Mapping[str, str] | None = None,
        enabled: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_urls = {**DEFAULT_BASE_URLS, **(base_urls or {})}
        self.enabled = enabled
        self.timeout = timeout
        self._transport = transport

    def __repr__(self) -> str:
        return f"KeyValidator(enabled={self.enabled}, timeout={self.timeout})"

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyValidator:
        env = settings.environ
        base_urls = {
            provider: env[f"BYOK_{provider.upper()}_BASE_URL"]
            for provider in CHECKS
            if env.get(f"BYOK_{provider.upper()}_BASE_URL")
        }
        return cls(
            base_urls=base_urls,
            enabled=settings.validate_keys,
            timeout=settings.validate_timeout,
        )

    def knows(self, provider: str) -> bool:
        return provider in CHECKS

    def check(self, provider: str, api_key: str) -> KeyCheck | None:
        """Check ``api_key`` live; ``None`` for a provider this validator does not know."""
        spec = CHECKS.get(provider)
        if spec is None:
            return None
        if not self.enabled:
            return KeyCheck(
                provider, KeyCheckStatus.SKIPPED, "live key checks are off (BYOK_VALIDATE_KEYS=0)"
            )
        url = spec.url(self.base_urls[provider])
        try:
            with httpx.Client(
                timeout=httpx.Timeout(self.timeout), transport=self._transport
            ) as client:
                response = client.request(
                    spec.method,
                    url,
                    headers=spec.headers(api_key),
                    params=dict(spec.params),
                    json=dict(spec.json_body) if spec.json_body is not None else None,
                )
        except httpx.TimeoutException:
            log.info("key check for %s timed out after %ss", provider, self.timeout)
            return KeyCheck(
                provider,
                KeyCheckStatus.UNREACHABLE,
                f"{provider} did not answer within {self.timeout:g}s",
            )
        except httpx.HTTPError as exc:
            log.info("key check for %s could not connect: %s", provider, type(exc).__name__)
            return KeyCheck(
                provider,
                KeyCheckStatus.UNREACHABLE,
                f"could not reach {provider} ({type(exc).__name__})",
            )
        return self._outcome(provider, response, api_key)

    @staticmethod
    def _outcome(provider: str, response: httpx.Response, api_key: str) -> KeyCheck:
        status = response.status_code
        message = redact(_provider_message(response), api_key)
        log.debug("key check for %s answered HTTP %s", provider, status)
        if 200 <= status < 300:
            return KeyCheck(provider, KeyCheckStatus.VALID, f"{provider} accepted the key")
        if status in (401, 403) or (provider == "google" and _gemini_invalid_key(response)):
            return KeyCheck(
                provider,
                KeyCheckStatus.INVALID,
                f"{provider} refused the key (HTTP {status})" + (f": {message}" if message else ""),
            )
        if _no_credit(response):
            return KeyCheck(
                provider,
                KeyCheckStatus.NO_CREDIT,
                f"{provider} accepted the key but its account has no credit left (HTTP {status})"
                + (f": {message}" if message else ""),
            )
        if status == 429:
            return KeyCheck(
                provider,
                KeyCheckStatus.VALID,
                f"{provider} accepted the key but is rate-limiting it or it is out of quota "
                f"(HTTP 429)" + (f": {message}" if message else ""),
            )
        return KeyCheck(
            provider,
            KeyCheckStatus.UNREACHABLE,
            f"{provider} answered HTTP {status}" + (f": {message}" if message else ""),
        )
