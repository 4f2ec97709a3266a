"""What can go wrong in a provider call, as distinct exceptions.

Each carries the provider, the HTTP status (``None`` when there was no answer) and the provider's
own message, with the key removed from it in any form (:func:`byok_hookspecs.redact`). No error holds the key: not in its message,
its ``repr``, its attributes, or its ``__cause__`` (transport errors are re-raised ``from None``,
because an ``httpx`` exception keeps the request and so the key header).

| class | when | retried |
|---|---|---|
| :class:`AuthError` | 401, 403, Gemini's 400 ``API_KEY_INVALID`` | no |
| :class:`RateLimitError` | 429 (``retry_after`` from ``Retry-After``) | yes, unless quota is exhausted |
| :class:`BadRequestError` | other 4xx: the request itself is wrong | no |
| :class:`ServerError` | 5xx, Anthropic's 529 overloaded, an error event in a stream | yes (HTTP) |
| :class:`ProviderTimeout` | connect / read / write / pool timeout, 408 | yes |
| :class:`ProviderUnreachable` | connection refused, DNS failure, reset before an answer | yes |
| :class:`ProtocolError` | malformed JSON, a stream that ends early, usage missing | no |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from byok_hookspecs import Usage

__all__ = [
    "AuthError",
    "BadRequestError",
    "ProtocolError",
    "ProviderError",
    "ProviderTimeout",
    "ProviderUnreachable",
    "RateLimitError",
    "ServerError",
    "UnsupportedRequest",
    "redact",
    "scrubbed",
]

from byok_hookspecs import redact  # one redaction for every boundary (re-exported here)


class ProviderError(Exception):
    """A provider call failed.

    :param provider: ``openai``, ``anthropic``, ``google``, ``mistral`` or ``exa``.
    :param message: the provider's own message (or ours, for transport and protocol failures).
    :param status: the HTTP status, ``None`` when there was no HTTP answer.
    :param code: the provider's machine-readable code or type (``invalid_api_key``...), if any.
    :param request_id: the provider's request id, if it sent one.
    :param attempts: how many attempts were made before giving up.

    ``partial_usage`` is set on the error of a stream that broke after the provider started
    answering (an error event, a cut connection, a stall, a stream that ended early): what the
    provider is known to bill for it (see :meth:`StreamAccumulator.partial_usage`); ``None``
    otherwise.
    """

    kind = "error"
    retryable = False
    partial_usage: Usage | None = None
    #: the provider may have executed the request: it was sent, and the answer was lost (a read
    #: timeout, a connection reset) or broke off midway
    maybe_executed = False

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        self.provider = provider
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.attempts = attempts
        super().__init__(provider, message)

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        code = f" [{self.code}]" if self.code else ""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{self.provider} {self.kind}{status}{code}{tries}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(provider={self.provider!r}, status={self.status!r}, "
            f"code={self.code!r}, message={self.message!r})"
        )


class AuthError(ProviderError):
    """The provider refused the key (invalid, revoked, or not allowed this model)."""

    kind = "authentication error"


class RateLimitError(ProviderError):
    """The provider throttled the call. ``retry_after`` is its own hint, in seconds, if it gave one.

    ``quota_exhausted`` is set when the provider says the account is out of quota or credit
    (OpenAI's ``insufficient_quota``): waiting does not help, so it is not retried.
    """

    kind = "rate limit"
    retryable = True

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        retry_after: float | None = None,
        quota_exhausted: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(provider, message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after
        self.quota_exhausted = quota_exhausted
        self.retryable = not quota_exhausted


class BadRequestError(ProviderError):
    """The provider rejected the request itself (unknown model, invalid parameter...)."""

    kind = "bad request"


class ServerError(ProviderError):
    """The provider failed (5xx, overloaded), or reported an error in the middle of a stream."""

    kind = "server error"
    retryable = True


class ProviderTimeout(ProviderError):
    """No (complete) answer in time: connect, read, write or pool timeout."""

    kind = "timeout"
    retryable = True


class ProviderUnreachable(ProviderError):
    """No connection: refused, unresolvable, or reset before an answer."""

    kind = "unreachable"
    retryable = True


class ProtocolError(ProviderError):
    """The answer is not what the wire format says: malformed JSON, a stream cut before its end
    marker, a stream without usage. Never turned into a partial result."""

    kind = "protocol error"


class UnsupportedRequest(ValueError):
    """The request asks for something this provider's API cannot do (raised before any call)."""

    def __init__(self, provider: str, message: str) -> None:
        self.provider = provider
        super().__init__(f"{provider}: {message}")


def scrubbed(error: ProviderError, api_key: str | None) -> ProviderError:
    """``error`` with ``api_key`` redacted from its message, code and request id (in place)."""
    error.message = redact(error.message, api_key)
    if error.code is not None:
        error.code = redact(error.code, api_key)
    if error.request_id is not None:
        error.request_id = redact(error.request_id, api_key)
    error.args = (error.provider, error.message)
    return error
