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
    import pluggy
    from sqlalchemy.engine import Engine

    from byok_plugin.background_writes import BackgroundWrites
    from byok_plugin.billing import Billing
    from byok_plugin.catalog import Catalog
    from byok_plugin.crypto import Keyring
    from byok_plugin.key_access import KeyAccess
    from byok_plugin.keys import KeyService
    from byok_plugin.ledger import Ledger
    from byok_plugin.organizations import Organizations, OrganizationStore
    from byok_plugin.platform_keys import PlatformKeyPool
    from byok_plugin.pricing import PriceTable
    from byok_plugin.resolution import Resolver
    from byok_plugin.store import AuditStore, KeyStore
    from byok_plugin.validation import KeyValidator
    from byok_plugin.workspace_settings import WorkspaceSettingsStore

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

    @property
    def store_is_local(self) -> bool:
        """Whether the store is a SQLite database on this machine (its reads and writes never
        wait on the network), not a PostgreSQL server."""
        scheme = self.settings.database_url.split(":", 1)[0]
        return scheme.split("+", 1)[0] == "sqlite"

    # -- key store (issue 3) ----------------------------------------------------------------

    @cached_property
    def engine(self) -> Engine:
        """The store's engine, migrated to the newest revision on first use."""
        from byok_plugin.store import create_store_engine, ensure_migrated

        engine = create_store_engine(self.settings.database_url)
        try:
            ensure_migrated(engine)
        except BaseException:
            engine.dispose()
            raise
        return engine

    @cached_property
    def keyring(self) -> Keyring:
        """The master keys (``BYOK_ENCRYPTION_KEYS``, else the key file); raises
        :class:`~byok_plugin.key_errors.NoMasterKey` saying how to create one."""
        from byok_plugin.crypto import Keyring

        return Keyring.load(
            encryption_keys=self.settings.encryption_keys, key_file=self.settings.key_file
        )

    @cached_property
    def key_store(self) -> KeyStore:
        from byok_plugin.store import KeyStore

        return KeyStore(self.engine, clock=self.clock)

    @cached_property
    def audit_store(self) -> AuditStore:
        from byok_plugin.store import AuditStore

        return AuditStore(self.engine)

    @cached_property
    def key_access(self) -> KeyAccess:
        """What credential resolution reads stored keys through (see :mod:`byok_plugin.key_access`)."""
        from byok_plugin.key_access import KeyAccess

        return KeyAccess(self.key_store, lambda: self.keyring, clock=self.clock)

    @cached_property
    def key_validator(self) -> KeyValidator:
        """The default live key check (``byok_validate_key``)."""
        from byok_plugin.validation import KeyValidator

        return KeyValidator.from_settings(self.settings)

    def key_service(self, pm: pluggy.PluginManager) -> KeyService:
        """The key management service, deciding and auditing through ``pm``'s hooks."""
        from byok_plugin.keys import KeyService

        return KeyService.for_app(self, pm)

    @cached_property
    def organization_store(self) -> OrganizationStore:
        """Organizations and their workspaces (the keys they inherit)."""
        from byok_plugin.organizations import OrganizationStore

        return OrganizationStore(self.engine, clock=self.clock)

    def organizations(self, pm: pluggy.PluginManager) -> Organizations:
        """Organizations, deciding and auditing through ``pm``'s hooks."""
        from byok_plugin.organizations import Organizations

        return Organizations(self.organization_store, self.key_service(pm), self.key_store)

    def close(self) -> None:
        """Wait for the writes handed to the background, then release the store's connections
        (if it was ever opened)."""
        background = self.__dict__.get("background_writes")
        if background is not None:
            background.close()
        resolver = self.__dict__.pop("resolver", None)
        if resolver is not None:
            resolver.close()
        ledger = self.__dict__.pop("ledger", None)
        if ledger is not None:
            ledger.close()
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.dispose()

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

    @cached_property
    def workspace_settings(self) -> WorkspaceSettingsStore:
        """Per-workspace settings in the store (the fallback policy)."""
        from byok_plugin.workspace_settings import WorkspaceSettingsStore

        return WorkspaceSettingsStore(self.engine, clock=self.clock)

    @cached_property
    def ledger(self) -> Ledger:
        """The usage ledger (``byok_record_usage``)."""
        from byok_plugin.ledger import Ledger

        return Ledger(self.engine, clock=self.clock)

    @cached_property
    def background_writes(self) -> BackgroundWrites:
        """Audit events and cooldowns that a hook on an event loop could not write at once."""
        from byok_plugin.background_writes import BackgroundWrites

        return BackgroundWrites()

    @cached_property
    def resolver(self) -> Resolver:
        """The default resolution policy (``byok_resolve_credential``)."""
        from byok_plugin.key_reader import SqliteKeyReader, sqlite_file_of
        from byok_plugin.resolution import Resolver

        path = sqlite_file_of(self.engine)
        return Resolver(
            keys=self.key_access,
            reader=SqliteKeyReader(path) if path is not None else None,
            engine=self.engine,
            workspace_settings=self.workspace_settings,
            billing=self.billing,
            platform_keys=self.platform_keys,
            clock=self.clock,
            cooldown_seconds=self.settings.key_cooldown_seconds,
            max_wait_seconds=self.settings.key_wait_seconds,
            cache_seconds=self.settings.key_cache_seconds,
            background=self.background_writes,
            organizations=self.organization_store,
        )
