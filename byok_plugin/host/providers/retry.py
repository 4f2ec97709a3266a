"""Retries: bounded attempts, exponential backoff with jitter, the provider's ``Retry-After`` honoured.

The policy holds its own ``sleep`` and ``random`` so that tests inject fakes and run instantly and
deterministically; there is no module-level state. Whoever waits for a call may learn of each wait
before it starts (:data:`retry_listener`, a context variable: each task sees its own listener).
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

__all__ = [
    "NO_RETRY",
    "RetryPolicy",
    "RetryWait",
    "parse_retry_after",
    "retry_listener",
    "retry_once_sent",
    "retrying_once_sent",
]


@dataclass(frozen=True, slots=True)
class RetryWait:
    """A provider client is about to wait before trying a call again.

    :param attempt: the attempt that failed (1-based), of ``max_attempts`` in all.
    :param wait: the seconds it will wait now.
    :param retry_after: the provider's own ``Retry-After`` hint, when the wait is that.
    :param reason: the failure's kind (``rate limit``, ``timeout``, ``unreachable``, ``server
        error``…) and its HTTP status if any; never the provider's message.
    """

    provider: str
    attempt: int
    max_attempts: int
    wait: float
    retry_after: float | None
    reason: str

    def describe(self) -> str:
        """``openai attempt 1 of 4 failed (rate limit 429): waiting 2.0 s (Retry-After)``."""
        why = " (Retry-After)" if self.retry_after is not None else ""
        return (
            f"{self.provider} attempt {self.attempt} of {self.max_attempts} failed "
            f"({self.reason}): waiting {self.wait:.1f} s{why}"
        )


#: who hears of a client's waits in the current task (``None``: nobody); the runner sets it
#: around each block's calls
retry_listener: ContextVar[Callable[[RetryWait], None] | None] = ContextVar(
    "byok_retry_listener", default=None
)


#: whether a client may try again a request the provider may have executed (a read timeout after
#: the body was sent, a connection reset while the answer came): ``True`` by default; the runner
#: turns it off around calls on the platform's key, every execution of which the platform pays.
#: A request that was never sent (a refused connection) and a received 429/5xx are retried either way
retry_once_sent: ContextVar[bool] = ContextVar("byok_retry_once_sent", default=True)


@contextmanager
def retrying_once_sent(allowed: bool) -> Iterator[None]:
    """:data:`retry_once_sent` set to ``allowed`` for the calls made inside (this task only)."""
    token = retry_once_sent.set(allowed)
    try:
        yield
    finally:
        retry_once_sent.reset(token)


def parse_retry_after(
    headers: Mapping[str, str], now: Callable[[], float] = time.time
) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (OpenAI, Anthropic) or ``Retry-After`` (seconds or
    an HTTP date, RFC 9110 §10.2.3); ``None`` when absent or unreadable."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a failed call again.

    :param max_attempts: attempts in all, the first included (1 = never retry).
    :param base_delay: the first backoff, in seconds; doubled on each further attempt.
    :param max_delay: no backoff is longer than this.
    :param max_retry_after: a ``Retry-After`` longer than this is not waited for: the call fails
        with the rate-limit error (carrying ``retry_after``) at once.
    :param retry_timeouts: also retry timeouts and unreachable hosts (the default).
    :param sleep: ``await sleep(seconds)``; ``asyncio.sleep`` by default.
    :param random: a float in [0, 1) for the jitter; a private ``random.Random()`` by default.
    """

    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_retry_after: float = 60.0
    retry_timeouts: bool = True
    sleep: Callable[[float], Awaitable[object]] = field(default=asyncio.sleep, compare=False)
    random: Callable[[], float] = field(
        default_factory=lambda: _random.Random().random,  # noqa: S311 - jitter, not crypto
        compare=False,
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (1-based): "equal jitter", i.e. half of
        the exponential step plus a random share of the other half."""
        step: float = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return step / 2 + self.random() * step / 2

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """How long to wait before the next attempt, or ``None`` to give up now."""
        if attempt >= self.max_attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        return self.backoff(attempt)


#: one attempt, no retry
NO_RETRY = RetryPolicy(max_attempts=1)
