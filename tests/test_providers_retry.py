"""Retry-After parsing and the backoff schedule (pure functions; no sleeping)."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from byok_plugin.host.providers import RetryPolicy, parse_retry_after


def test_retry_after_in_seconds_milliseconds_and_http_date():
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    date = format_datetime(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC), usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=lambda: now) == 30.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "-3"}) == 0.0


def test_backoff_is_exponential_capped_and_jittered_deterministically():
    low = RetryPolicy(base_delay=1, max_delay=5, max_attempts=10, random=lambda: 0.0)
    high = RetryPolicy(base_delay=1, max_delay=5, max_attempts=10, random=lambda: 0.999)
    assert [low.delay(n, None) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 2.5]
    assert all(
        h > lo
        for h, lo in zip(
            (high.delay(n, None) for n in (1, 2, 3, 4)), (0.5, 1.0, 2.0, 2.5), strict=True
        )
    )
    assert high.delay(4, None) < 5.0


def test_retry_after_wins_and_attempts_are_bounded():
    retry = RetryPolicy(max_attempts=3, max_retry_after=30, random=lambda: 0.5)
    assert retry.delay(1, 12.0) == 12.0
    assert retry.delay(1, 31.0) is None
    assert retry.delay(3, None) is None
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_each_policy_has_its_own_random_source():
    a, b = RetryPolicy(), RetryPolicy()
    assert a.random is not b.random
