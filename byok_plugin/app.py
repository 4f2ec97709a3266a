"""The composition root: one object that holds the configured services the default hooks use.

Nothing here is global: a host, a test or the CLI builds an :class:`App` from :class:`Settings`
(and a clock) and hands it to :class:`~byok_plugin.defaults.DefaultPlugin`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING

from byok_plugin.settings import Settings

if TYPE_CHECKING:
    from byok_plugin.billing import Billing
    from byok_plugin.catalog import Catalog
    from byok_plugin.platform_keys import PlatformKeyPool
    from byok_plugin.pricing import PriceTable

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

    # -- pricing, billing, hosting (issue 4) ------------------------------------------------

    @cached_property
    def catalog(self) -> Catalog:
        """The hosted-model catalog: shipped, with ``BYOK_CATALOG_FILE`` merged over it."""
        from byok_plugin.catalog import catalog_for

        return catalog_for(self.settings)

    @cached_property
    def prices(self) -> PriceTable:
        """The shipped price table, with ``BYOK_PRICE_FILE`` overriding its entries."""
        from byok_plugin.pricing import prices_for

        return prices_for(self.settings)

    @cached_property
    def billing(self) -> Billing:
        from byok_plugin.billing import Billing

        return Billing(
            prices=self.prices,
            catalog=self.catalog,
            multiplier=self.settings.charge_multiplier,
            allow_unpriced=self.settings.allow_unpriced,
        )

    @cached_property
    def platform_keys(self) -> PlatformKeyPool:
        """The platform's key pool, read from the environment once."""
        from byok_plugin.platform_keys import PlatformKeyPool

        providers = {p.id: p.env_prefixes for p in self.catalog.providers.values()}
        return PlatformKeyPool.from_environ(
            self.settings.environ,
            providers,
            cooldown_seconds=self.settings.key_cooldown_seconds,
        )
