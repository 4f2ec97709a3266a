"""Clocks for tests whose outcome must not depend on the moment they run at. Not a test module.

A budget's period (a UTC day or month), "today" in a usage report and a ledger row's day are read
off the app's clock. A test that spends twice and reads the sum, or records a call and asks for
today's, fails when a UTC midnight or a month's first day falls between its steps; on the wall
clock it does so once a day or once a month, at night. These tests give the app a clock that is
far from any such boundary instead.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

#: noon on the 15th of a 31-day month: 12 hours from a UTC day's boundary, two weeks from a month's
SAFE_NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


class ShiftedClock:
    """The wall clock moved to read :data:`SAFE_NOW` (or ``start``) when it is made.

    It runs at the wall clock's pace, so holds, cooldowns and caches lapse as they do in
    production, while no day or month begins during a test (one would take 12 hours). Several
    processes share one reading by passing it (it pickles): each reads the same shifted time.
    """

    def __init__(self, start: datetime = SAFE_NOW) -> None:
        self.offset: timedelta = start - datetime.now(UTC)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def __repr__(self) -> str:
        return f"ShiftedClock(now={self().isoformat()})"
