"""The composition root: one object that holds the configured services the default hooks use.

Nothing here is global: a host, a test or the CLI builds an :class:`App` from :class:`Settings`
(and a clock) and hands it to :class:`~byok_plugin.defaults.DefaultPlugin`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from byok_plugin.settings import Settings

log = logging.getLogger("byok")


def utc_now() -> datetime:
    return datetime.now(UTC)


class App:
    """The configured services of one byok-plugin instance."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self.clock = clock

    def __repr__(self) -> str:
        return f"App(database={self.settings.database_url.split('://', 1)[0]!r})"
