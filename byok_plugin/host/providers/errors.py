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
| :class:`ProtocolError` | malformed JSON, a stream that ends early, usage missing, an answer too large | no |

An error body's fields may hold any JSON (an OpenAI-compatible server such as vLLM sends
``"code": 400``): :func:`error_text` makes text of them, and an error keeps at most
:data:`MAX_MESSAGE_CHARS` characters of the provider's message, redacted (:func:`redact_bounded`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

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
    "error_text",
    "redact",
    "redact_bounded",
    "scrubbed",
]

from byok_hookspecs import redact  # one redaction for every boundary (re-exported here)
from byok_hookspecs.redaction import MIN_SECRET_RUN

#: the most of a provider's message (or code) an error keeps: an error body is the provider's,
#: of any length, and a message is for people to read
MAX_MESSAGE_CHARS = 1000


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
        maybe_executed: bool = False,
    ) -> None:
        self.provider = provider
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.attempts = attempts
        if maybe_executed:
            self.maybe_executed = True
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
    marker, a stream without usage, an answer larger than the client reads. Never turned into a
    partial result. Raised for a 2xx answer (one the provider executed) it has ``maybe_executed``
    set, so that the call is recorded ``uncertain``."""

    kind = "protocol error"


class UnsupportedRequest(ValueError):
    """The request asks for something this provider's API cannot do (raised before any call)."""

    def __init__(self, provider: str, message: str) -> None:
        self.provider = provider
        super().__init__(f"{provider}: {message}")


def error_text(value: Any) -> str | None:
    """A message or code from a provider's error body as text, whatever its JSON type: a string
    as it is, a number or a boolean as JSON writes it (``400``), a list or an object as compact
    JSON; ``None`` for null (or a missing field). Neither redacted nor bounded: see
    :func:`redact_bounded`."""
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (ValueError, RecursionError):  # nested deeper than the encoder goes
        return f"(a JSON {type(value).__name__} nested too deeply to show)"


def redact_bounded(text: str, *secrets: str | None, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``redact(text, *secrets)``, in at most ``limit`` characters (then ``…``).

    A long text is cut before it is redacted (redaction reads every character), a little beyond
    ``limit``: a key the cut splits is still removed if enough of it is kept (a run of
    ``MIN_SECRET_RUN`` characters), and the few characters it could leave at the very end are
    dropped with that margin."""
    if len(text) <= limit:
        return redact(text, *secrets)
    kept = redact(text[: limit + MIN_SECRET_RUN], *secrets)[:-MIN_SECRET_RUN]
    return kept[:limit] + "…"


def scrubbed(error: ProviderError, api_key: str | None) -> ProviderError:
    """``error`` with ``api_key`` redacted from its message, code and request id (in place), and
    the message and code bounded (:func:`redact_bounded`)."""
    error.message = redact_bounded(error_text(error.message) or "", api_key)
    if error.code is not None:
        error.code = redact_bounded(error_text(error.code) or "", api_key)
    if error.request_id is not None:
        error.request_id = redact(error.request_id, api_key)
    error.args = (error.provider, error.message)
    return error
