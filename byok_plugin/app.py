"""The composition root: one object that holds the configured services the default hooks use.

Nothing here is global: a host, a test or the CLI builds an :class:`App` from :class:`Settings`
(and a clock) and hands it to :class:`~byok_plugin.defaults.DefaultPlugin`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from byok_plugin.settings import Settings

if TYPE_CHECKING:
    import pluggy
    from byok_hookspecs import UsageRecord
    from sqlalchemy.engine import Engine

    from byok_plugin.billing.budgets import BudgetStore
    from byok_plugin.billing.catalog import Catalog
    from byok_plugin.billing.charges import Billing
    from byok_plugin.billing.ledger import Ledger
    from byok_plugin.billing.pricing import PriceTable
    from byok_plugin.billing.run_claims import RunClaims
    from byok_plugin.billing.spool import DurableLedger
    from byok_plugin.core.crypto import Keyring
    from byok_plugin.keys.access import KeyAccess
    from byok_plugin.keys.envelope import BuiltinKeyEncryption, DataKeys
    from byok_plugin.keys.service import KeyService
    from byok_plugin.keys.validation import KeyValidator
    from byok_plugin.resolution.background_writes import BackgroundWrites
    from byok_plugin.resolution.organizations import Organizations, OrganizationStore
    from byok_plugin.resolution.platform_keys import PlatformKeyPool
    from byok_plugin.resolution.resolver import Resolver
    from byok_plugin.resolution.workspace_settings import WorkspaceSettingsStore
    from byok_plugin.store import AuditStore, KeyStore
    from byok_plugin.store.sqlite_connections import SqliteWriters

log = logging.getLogger("byok")


def utc_now() -> datetime:
    return datetime.now(UTC)


class App:
    """The configured services of one byok-plugin instance."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self.clock = clock
        # the plugin manager whose byok_wrap_data_key / byok_unwrap_data_key hooks envelope
        # encryption asks (bind_hooks); until bound, the configured built-in provider alone
        self._hooks: Any = None

    def bind_hooks(self, pm: Any) -> None:
        """Ask ``pm``'s hooks (any plugin's first) for wrapping and unwrapping data keys."""
        self._hooks = pm

    def key_hooks(self) -> Any:
        """The hooks envelope encryption asks: the bound manager's, else the built-in ones."""
        if self._hooks is not None:
            return self._hooks
        from types import SimpleNamespace

        kek = self.key_encryption
        return SimpleNamespace(
            hook=SimpleNamespace(
                byok_wrap_data_key=kek.wrap,
                byok_unwrap_data_key=kek.unwrap,
                byok_rewrap_data_key=kek.rewrap,
                byok_key_provider=kek.describe,
            )
        )

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
        from byok_plugin.store.engine import PostgresOptions

        s = self.settings
        postgres = PostgresOptions(
            pool_size=s.db_pool_size,
            max_overflow=s.db_max_overflow,
            pool_timeout=s.db_pool_timeout,
            statement_timeout=s.db_statement_timeout,
            connect_timeout=s.db_connect_timeout,
            tcp_timeout=s.db_tcp_timeout,
        )
        engine = create_store_engine(s.database_url, postgres=postgres)
        try:
            ensure_migrated(engine)
        except BaseException:
            engine.dispose()
            raise
        return engine

    @cached_property
    def keyring(self) -> Keyring:
        """The master keys (``BYOK_ENCRYPTION_KEYS``, else the key file); raises
        :class:`~byok_plugin.core.errors.NoMasterKey` saying how to create one."""
        from byok_plugin.core.crypto import Keyring

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
        """What credential resolution reads stored keys through (see :mod:`byok_plugin.keys.access`)."""
        from byok_plugin.keys.access import KeyAccess

        return KeyAccess(
            self.key_store, lambda: self.keyring, clock=self.clock, data_keys=self.data_keys
        )

    @cached_property
    def key_encryption(self) -> BuiltinKeyEncryption:
        """The built-in key-encryption provider ``BYOK_KEY_PROVIDER`` names (``local``,
        ``vault-transit``, ``aws-kms``); the local keyring still unwraps what it wrapped."""
        from byok_plugin.keys.envelope import BuiltinKeyEncryption, LocalKeyEncryption

        local = LocalKeyEncryption(lambda: self.keyring)
        provider, env = self.settings.key_provider, self.settings.environ
        active: Any = local
        if provider == "vault-transit":
            from byok_plugin.keys.kms import VaultTransitKeyEncryption

            active = VaultTransitKeyEncryption.from_environ(env, self.settings.kms_timeout)
        elif provider == "aws-kms":
            from byok_plugin.keys.kms import AwsKmsKeyEncryption

            active = AwsKmsKeyEncryption.from_environ(env, self.settings.kms_timeout)
        return BuiltinKeyEncryption(
            active, local, accept_local=self.settings.key_provider_migration
        )

    @cached_property
    def data_keys(self) -> DataKeys:
        """The workspaces' data keys (envelope encryption), unwrapped through the hooks and
        cached for ``BYOK_DATA_KEY_CACHE_SECONDS``."""
        from byok_plugin.keys.envelope import DataKeys
        from byok_plugin.store.data_keys_repo import DataKeyStore

        return DataKeys(
            DataKeyStore(self.engine, clock=self.clock),
            self.key_hooks,
            cache_seconds=self.settings.data_key_cache_seconds,
            provider_migration=self.settings.key_provider_migration,
        )

    @cached_property
    def key_validator(self) -> KeyValidator:
        """The default live key check (``byok_validate_key``)."""
        from byok_plugin.keys.validation import KeyValidator

        return KeyValidator.from_settings(self.settings)

    def key_service(self, pm: pluggy.PluginManager) -> KeyService:
        """The key management service, deciding and auditing through ``pm``'s hooks."""
        from byok_plugin.keys.service import KeyService

        return KeyService.for_app(self, pm)

    @cached_property
    def organization_store(self) -> OrganizationStore:
        """Organizations and their workspaces (the keys they inherit)."""
        from byok_plugin.resolution.organizations import OrganizationStore

        return OrganizationStore(self.engine, clock=self.clock)

    def organizations(self, pm: pluggy.PluginManager) -> Organizations:
        """Organizations, deciding and auditing through ``pm``'s hooks."""
        from byok_plugin.resolution.organizations import Organizations

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
        self.__dict__.pop("durable_ledger", None)
        ledger = self.__dict__.pop("ledger", None)
        if ledger is not None:
            ledger.close()
        budgets = self.__dict__.pop("budgets", None)
        if budgets is not None:
            budgets.close()
        writers = self.__dict__.pop("sqlite_writers", None)
        if writers is not None:
            writers.close()
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.dispose()

    # -- pricing, billing, hosting (issue 4) ------------------------------------------------

    @cached_property
    def catalog(self) -> Catalog:
        """The hosted-model catalog: shipped, with ``BYOK_CATALOG_FILE`` merged over it."""
        from byok_plugin.billing.catalog import catalog_for

        return catalog_for(self.settings)

    @cached_property
    def prices(self) -> PriceTable:
        """The shipped price table, with ``BYOK_PRICE_FILE`` overriding its entries."""
        from byok_plugin.billing.pricing import prices_for

        return prices_for(self.settings)

    def load_billing_data(self) -> None:
        """Read and check the catalog and the price table now (each is read once).

        :raises CatalogError: ``BYOK_CATALOG_FILE`` cannot be used (one line: file, JSON path).
        :raises PriceError: ``BYOK_PRICE_FILE`` cannot be used (one line: file, JSON path).
        """
        _ = self.billing

    @cached_property
    def billing(self) -> Billing:
        from byok_plugin.billing.charges import Billing

        return Billing(
            prices=self.prices,
            catalog=self.catalog,
            multiplier=self.settings.charge_multiplier,
            allow_unpriced=self.settings.allow_unpriced,
        )

    @cached_property
    def platform_keys(self) -> PlatformKeyPool:
        """The platform's key pool, read from the environment once."""
        from byok_plugin.resolution.platform_keys import PlatformKeyPool

        providers = {p.id: p.env_prefixes for p in self.catalog.providers.values()}
        return PlatformKeyPool.from_environ(
            self.settings.environ,
            providers,
            cooldown_seconds=self.settings.key_cooldown_seconds,
        )

    @cached_property
    def workspace_settings(self) -> WorkspaceSettingsStore:
        """Per-workspace settings in the store (the fallback policy)."""
        from byok_plugin.resolution.workspace_settings import WorkspaceSettingsStore

        return WorkspaceSettingsStore(self.engine, clock=self.clock)

    @cached_property
    def ledger(self) -> Ledger:
        """The usage ledger (``byok_record_usage``)."""
        from byok_plugin.billing.ledger import Ledger

        return Ledger(self.engine, clock=self.clock, writers=self.sqlite_writers)

    @cached_property
    def durable_ledger(self) -> DurableLedger:
        """The ledger with the local spool behind it (``byok_record_usage``): a record the store
        refuses is kept in ``BYOK_LEDGER_SPOOL`` and replayed when the store answers again."""
        from byok_plugin.billing.spool import DurableLedger, LedgerSpool

        path = self.settings.ledger_spool or self.settings.home / "ledger-spool.db"
        return DurableLedger(
            self.ledger.record,
            LedgerSpool(path),
            background=self.background_writes.submit,
            write_many=self.ledger.record_many,
            settle=self._settle_replayed,
        )

    def _settle_replayed(self, record: UsageRecord) -> None:
        """The budget hold of a call whose spooled record a replay just wrote, settled with its
        charge through ``byok_settle_budget`` (every plugin's, once bound; idempotent: nothing
        changes when it was settled already or held nothing). An uncertain call's record is
        charged nothing and keyed apart from its call: it settles nothing."""
        from decimal import Decimal

        from byok_hookspecs import BudgetSettlement

        if record.status == "uncertain":
            return
        settlement = BudgetSettlement(
            idempotency_key=record.idempotency_key,
            workspace_id=record.workspace_id,
            amount=record.charge.amount,
            list_cost=record.charge.list_cost or Decimal(0),
            source=record.source,
        )
        if self._hooks is not None:
            self._hooks.hook.byok_settle_budget(settlement=settlement)
            return
        _, events = self.budgets.settle(settlement)
        for event in events:  # thresholds crossed, once committed
            self.audit_store.record(event)

    @cached_property
    def run_claims(self) -> RunClaims:
        """Run ids claimed by runs in flight, across workers (``byok_claim_run``)."""
        from byok_plugin.billing.run_claims import RunClaims

        return RunClaims(self.engine, clock=self.clock)

    @cached_property
    def budgets(self) -> BudgetStore:
        """Workspace budgets (``byok_reserve_budget``, ``byok_settle_budget``)."""
        from byok_plugin.billing.budgets import BudgetStore

        return BudgetStore(self.engine, clock=self.clock, writers=self.sqlite_writers)

    @cached_property
    def sqlite_writers(self) -> SqliteWriters | None:
        """On a SQLite file, the ``sqlite3`` connections the ledger and the budgets both write
        with (one page cache for a call's reservation and its record: see
        :mod:`byok_plugin.store.sqlite_connections`); ``None`` on other stores."""
        from byok_plugin.keys.reader import sqlite_file_of
        from byok_plugin.store.sqlite_connections import SqliteWriters

        path = sqlite_file_of(self.engine)
        return SqliteWriters(str(path)) if path is not None else None

    @cached_property
    def background_writes(self) -> BackgroundWrites:
        """Audit events and cooldowns that a hook on an event loop could not write at once."""
        from byok_plugin.resolution.background_writes import BackgroundWrites

        return BackgroundWrites()

    @cached_property
    def resolver(self) -> Resolver:
        """The default resolution policy (``byok_resolve_credential``)."""
        from byok_plugin.keys.reader import SqliteKeyReader, sqlite_file_of
        from byok_plugin.resolution.platform_cooldowns import PlatformCooldowns
        from byok_plugin.resolution.resolver import Resolver

        path = sqlite_file_of(self.engine)
        resolver = Resolver(
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
            platform_cooldowns=PlatformCooldowns(self.engine),
            organizations=self.organization_store,
        )
        if self.engine.dialect.name == "postgresql":  # key changes announced at commit
            # the budget store's memory of which workspaces have budgets follows the same news,
            # and so do the cached data keys (a workspace deleted: its data key destroyed)
            resolver.listen_for_changes(
                self.engine.url, followers=(self.budgets.presence, self.data_keys)
            )
        return resolver
