"""Faults the emulator injects on request: which kind, for which provider or key, how many times."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field


class FaultKind(enum.StrEnum):
    """What goes wrong."""

    #: HTTP 429 in the provider's own error shape, with a ``Retry-After`` header
    RATE_LIMIT = "rate_limit"
    #: HTTP 500 in the provider's own error shape
    SERVER_ERROR = "server_error"
    #: the normal answer, after ``delay`` seconds (before the first byte)
    SLOW = "slow"
    #: a stream that stops before its terminal event (no ``[DONE]``, ``message_stop``, final chunk)
    TRUNCATED_STREAM = "truncated_stream"
    #: HTTP 200 whose body (or one stream event) is not valid JSON
    MALFORMED_JSON = "malformed_json"
    #: the account has no credit left, in the provider's own shape (OpenAI: 429
    #: ``insufficient_quota``; Anthropic: 400 "Your credit balance is too low")
    NO_CREDIT = "no_credit"


def key_fingerprint(api_key: str) -> str:
    """A stable, non-reversible reference to a key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault rule. The first rule that matches a call is applied and uses up one of its ``times``.

    :param kind: what goes wrong.
    :param provider: only calls to this provider (``None``: any).
    :param key_fingerprint: only calls made with this key (see :func:`key_fingerprint`; ``None``: any).
        :meth:`Fault.for_key` builds it from the key itself, so the rule never holds the key.
    :param times: how many calls it hits (``None``: every call until it is cleared).
    :param retry_after: the ``Retry-After`` seconds sent with a rate limit.
    :param delay: seconds a slow response waits.
    :param status: the HTTP status for ``server_error`` (500 by default; 502, 503, 529...).
    :param paths: only calls whose path ends with one of these (``()``: any), e.g. ``("/models",)``.
    """

    kind: FaultKind
    provider: str | None = None
    key_fingerprint: str | None = None
    times: int | None = 1
    retry_after: float = 1
    delay: float = 0.5
    status: int = 500
    paths: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FaultKind(self.kind))
        if self.times is not None and self.times < 1:
            raise ValueError("Fault.times must be at least 1, or None for every call")

    @classmethod
    def for_key(cls, kind: FaultKind | str, api_key: str, **kwargs: object) -> Fault:
        """A fault hitting only the calls made with ``api_key``."""
        return cls(FaultKind(kind), key_fingerprint=key_fingerprint(api_key), **kwargs)  # type: ignore[arg-type]

    def matches(self, provider: str, path: str, fingerprint: str | None) -> bool:
        if self.provider is not None and self.provider != provider:
            return False
        if self.key_fingerprint is not None and self.key_fingerprint != fingerprint:
            return False
        return not self.paths or any(path.endswith(p) for p in self.paths)
