"""byok-plugin's built-in hook implementations, registered through the entry point ``byok``.

Every one is ``trylast``: anything a user installs runs before them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cached_property
from types import SimpleNamespace
from typing import Any

from byok_hookspecs import (
    Action,
    Actor,
    AuditEvent,
    BudgetExceeded,
    BudgetHold,
    BudgetReservation,
    BudgetSettlement,
    Charge,
    Credential,
    CredentialRequest,
    KeyCheck,
    RecordedCall,
    Usage,
    UsageRecord,
    WrappedDataKey,
    called_inline,
    hookimpl,
)

from byok_plugin.app import App
from byok_plugin.authorization import role_decision
from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.settings import Settings

audit_log = logging.getLogger("byok.audit")

#: hooks answered from memory (the catalog, the price table, the platform key pool, roles)
_IN_MEMORY_HOOKS = frozenset(
    {
        "byok_manager_ready",
        "byok_is_hosted",
        "byok_platform_key",
        "byok_compute_charge",
        "byok_authorize",
        "byok_key_provider",
    }
)
#: the data-key hooks: non-blocking with the local keyring (a local file), not with a KMS
_LOCAL_KEY_HOOKS = frozenset({"byok_wrap_data_key", "byok_unwrap_data_key", "byok_rewrap_data_key"})
#: audited key changes after which a cooldown not yet written must not be applied any more
_KEY_STATE_CHANGES = frozenset({"key.enabled", "key.disabled", "key.deleted", "key.replaced"})
#: hooks that read or write the store: non-blocking when it is a local SQLite file
_STORE_HOOKS = frozenset(
    {
        "byok_resolve_credential",
        "byok_record_usage",
        "byok_record_usage_batch",
        "byok_record_usage_and_settle",  # on SQLite, waits as byok_record_usage does
        "byok_recorded_calls",
        "byok_audit",
        "byok_prepare",
        "byok_reserve_budget",
        "byok_settle_budget",
        "byok_claim_run",
        "byok_release_run",
    }
)
#: on PostgreSQL, while the resolver is served from memory (its key-change listener connected):
#: resolution, and the audit events it writes (handed to the background writer on an event loop),
#: and the budget reservation (answered from memory for a workspace without budgets; for one with
#: budgets, called on an event loop, it gives up at once and the host reserves off the loop)
_MEMORY_RESOLUTION_HOOKS = frozenset(
    {"byok_resolve_credential", "byok_audit", "byok_reserve_budget"}
)


class DefaultPlugin:
    """The default implementations, bound to one :class:`App` (built lazily when not given)."""

    def __init__(self, app: App | None = None, *, app_factory: Callable[[], App] | None = None):
        if app is None and app_factory is None:
            app_factory = _app_from_environment
        self._app = app
        self._app_factory = app_factory
        self._pm: Any = None

    @hookimpl(trylast=True)
    def byok_manager_ready(self, pm: Any) -> None:
        """Keep the manager, so that the default resolution asks its ``byok_is_hosted``,
        ``byok_platform_key``, ``byok_authorize`` and ``byok_audit`` (any plugin's answers first),
        and envelope encryption its ``byok_wrap_data_key`` and ``byok_unwrap_data_key``.

        The catalog and the price table (with ``BYOK_CATALOG_FILE`` and ``BYOK_PRICE_FILE``) are
        read and checked here, once, as the host starts: a malformed file stops it with one line
        (:class:`~byok_plugin.billing.catalog.CatalogError`, :class:`~byok_plugin.billing.pricing.PriceError`)
        rather than failing a run later, after a provider call."""
        self._pm = pm
        if self._app is not None or "app" in self.__dict__:  # else bound when it is built
            self.app.bind_hooks(pm)
        self.app.load_billing_data()

    def __repr__(self) -> str:
        return "<byok_plugin DefaultPlugin>"

    @property
    def byok_nonblocking_hooks(self) -> frozenset[str]:
        """The implementations an asyncio host may call on its event loop
        (:mod:`byok_hookspecs.blocking`): those answered from memory, and those that use the store
        when it is a local SQLite file (a fraction of a millisecond; no network). On an event
        loop's thread they wait at most 25 ms for a lock another writer holds: then the ledger
        write fails at once (the host retries it off the loop), and an audit event or a cooldown
        is written by a background thread. On PostgreSQL the store hooks are a network round
        trip, except resolution and its audit events while the resolver is served from memory
        (:attr:`~byok_plugin.resolution.resolver.Resolver.served_from_memory`: its key-change listener is
        connected; declared blocking again the moment it is not): its lists come from memory, a
        miss is one indexed read, and on an event loop its audit and cooldown writes go to the
        background writer; so is the budget reservation of a workspace that has no budget
        (:class:`~byok_plugin.billing.budget_presence.BudgetPresence`), while one that has budgets
        gives up at once on the loop and is reserved off it. ``byok_validate_key`` calls the
        provider; the data-key hooks call the KMS, unless the local keyring wraps the data
        keys."""
        try:
            local = self.app.store_is_local
            local_keys = self.app.settings.key_provider == "local"
            resolver = self.app.__dict__.get("resolver")  # built by byok_prepare, not here
            from_memory = resolver is not None and resolver.served_from_memory
        except Exception:  # a configuration error: the hooks will report it, not this hint
            local = local_keys = from_memory = False
        hooks = _IN_MEMORY_HOOKS
        if local or from_memory:
            store_hooks = _STORE_HOOKS if local else _MEMORY_RESOLUTION_HOOKS
            if self.app.settings.key_wait_seconds > 0:  # resolution may wait for a cooling key
                store_hooks = store_hooks - {"byok_resolve_credential"}
            hooks = hooks | store_hooks
        return hooks | _LOCAL_KEY_HOOKS if local_keys else hooks

    @cached_property
    def app(self) -> App:
        if self._app is not None:
            app = self._app
        else:
            assert self._app_factory is not None
            app = self._app_factory()
        if self._pm is not None:
            app.bind_hooks(self._pm)
        return app

    @hookimpl(trylast=True)
    def byok_authorize(self, actor: Actor | None, workspace_id: str, action: Action) -> bool | None:
        return role_decision(actor, workspace_id, action)

    @hookimpl(trylast=True)
    def byok_resolve_credential(self, request: CredentialRequest) -> Credential | None:
        pm = self._pm if self._pm is not None else self._own_hooks
        credential = self.app.resolver.resolve(request, pm)
        if credential is not None and self.app.durable_ledger.recording_down():
            # spend stops when recording stops: the call is not sent
            from byok_plugin.billing.spool import RecordingDown

            if credential.billed_by_platform or not self.app.settings.allow_unrecorded_byok:
                raise RecordingDown(
                    f"workspace {request.workspace_id!r}: the {request.provider} call is refused "
                    f"before it is sent: its usage could be recorded neither in the store nor in "
                    f"the local spool {self.app.durable_ledger.spool.path}"
                    + (
                        ""
                        if credential.billed_by_platform
                        else " (BYOK_ALLOW_UNRECORDED_BYOK=1 lets calls on the workspace's own "
                        "keys run meanwhile)"
                    )
                )
        return credential

    @hookimpl(trylast=True)
    def byok_prepare(self) -> None:
        # the store (opened and migrated), the ledger and its spool, the catalog, the prices,
        # the platform keys: loaded here, off a host's event loop, not by its first call
        _ = self.app.durable_ledger
        _ = self.app.resolver

    @hookimpl(trylast=True)
    def byok_record_usage(self, record: UsageRecord) -> None:
        # into the store, else into the local spool (replayed when the store answers again)
        self.app.durable_ledger.record(record)

    @hookimpl(trylast=True)
    def byok_record_usage_batch(self, records: Sequence[UsageRecord]) -> None:
        # one transaction for the group; if the store refuses it, row by row (store or spool)
        self.app.durable_ledger.record_many(records)

    @hookimpl(trylast=True)
    def byok_record_usage_and_settle(
        self, records: Sequence[UsageRecord], settlements: Sequence[BudgetSettlement]
    ) -> bool | None:
        # on PostgreSQL, the group's rows and its settlements in one transaction (one commit);
        # on a SQLite file, one call's row and its settlement (the runner's calls on its event
        # loop): declined for a group, and when the store does not take the transaction at once
        # (nothing was written: the runner records, into the spool if need be, and settles)
        if self.app.engine.dialect.name != "postgresql":
            if len(records) != 1 or not self.app.budgets.settles_on_sqlite:
                return None
            done: list[list[AuditEvent]] = []
            try:
                written = self.app.ledger.record_with(
                    records[0],
                    lambda conn: done.append(self.app.budgets.settle_on(conn, settlements)[1]),
                )
            except StoreUnavailable:
                return None
            if written is None:
                return None
            self.app.durable_ledger.stored()
            for event in done[0] if done else ():  # thresholds crossed, once committed
                self._announce(event)
            return True
        settled: list[list[AuditEvent]] = []
        self.app.ledger.record_many(
            records,
            also=lambda conn: settled.append(self.app.budgets.settle_in(conn, settlements)[1]),
        )
        for event in settled[0] if settled else ():  # thresholds crossed, once committed
            self._announce(event)
        return True

    @hookimpl(trylast=True)
    def byok_recorded_calls(self, run_id: str) -> tuple[RecordedCall, ...] | None:
        # the ledger's, and the spool's not yet replayed into it (their calls were made too)
        stored = self.app.ledger.recorded_calls(run_id)
        keys = {call.idempotency_key for call in stored}
        spooled = self.app.durable_ledger.spool.recorded_calls(run_id)
        return stored + tuple(c for c in spooled if c.idempotency_key not in keys)

    @hookimpl(trylast=True)
    def byok_claim_run(
        self, run_id: str, workspace_id: str, claimant: str, seconds: float
    ) -> bool | None:
        return self.app.run_claims.claim(run_id, workspace_id, claimant, seconds)

    @hookimpl(trylast=True)
    def byok_release_run(self, run_id: str, claimant: str) -> None:
        self.app.run_claims.release(run_id, claimant)

    @hookimpl(trylast=True)
    def byok_reserve_budget(self, reservation: BudgetReservation) -> BudgetHold | None:
        try:
            return self.app.budgets.reserve(reservation)
        except BudgetExceeded as exc:
            # audited, so that a ``fallback.used`` event of the same call (resolution chose the
            # platform key, then its reservation did not fit) is followed by what became of it
            self._announce(
                AuditEvent(
                    action="budget.refused",
                    workspace_id=reservation.workspace_id,
                    actor_id=None,
                    outcome="denied",
                    provider=reservation.provider,
                    key_id=reservation.key_id,
                    detail=(
                        f"{exc} (run {reservation.run_id or '-'}, "
                        f"block {reservation.block_id or '-'}, {reservation.source.value} key)"
                    ),
                    occurred_at=self.app.clock(),
                )
            )
            raise

    def _announce(self, event: AuditEvent) -> None:
        """An audit event through every ``byok_audit`` implementation when bound to a plugin
        manager, else through this plugin's own."""
        if self._pm is not None:
            self._pm.hook.byok_audit(event=event)
        else:
            self.byok_audit(event)

    @hookimpl(trylast=True)
    def byok_settle_budget(self, settlement: BudgetSettlement) -> bool | None:
        changed, events = self.app.budgets.settle(settlement)
        for event in events:  # thresholds crossed: announced once per period each
            self._announce(event)
        return changed

    @cached_property
    def _own_hooks(self) -> Any:
        audit_log.warning(
            "the default byok plugin is not bound to its plugin manager: resolution uses its own "
            "byok_is_hosted, byok_platform_key, byok_authorize and byok_audit only (build the "
            "manager with byok_hookspecs.add_to(pm) or byok_plugin.plugin_manager_for)"
        )
        return SimpleNamespace(
            hook=SimpleNamespace(
                byok_is_hosted=self.byok_is_hosted,
                byok_platform_key=self.byok_platform_key,
                byok_authorize=self.byok_authorize,
                byok_audit=self.byok_audit,
            )
        )

    @hookimpl(trylast=True)
    def byok_is_hosted(self, provider: str, model: str) -> bool | None:
        # no answer for a model the catalog has never heard of: a host can tell a typo from a
        # model that is known but not hosted, and any plugin may still claim it
        if self.app.catalog.model(provider, model) is None:
            return None
        return self.app.catalog.is_hosted(provider, model)

    @hookimpl(trylast=True)
    def byok_platform_key(self, provider: str, model: str) -> str | None:
        key = self.app.platform_keys.acquire(provider)
        return key.api_key if key is not None else None

    @hookimpl(trylast=True)
    def byok_compute_charge(self, usage: Usage, credential: Credential) -> Charge | None:
        return self.app.billing.charge(usage, credential)

    @hookimpl(trylast=True)
    def byok_validate_key(self, provider: str, api_key: str) -> KeyCheck | None:
        return self.app.key_validator.check(provider, api_key)

    @hookimpl(trylast=True)
    def byok_wrap_data_key(self, workspace_id: str, data_key: bytes) -> WrappedDataKey | None:
        return self.app.key_encryption.wrap(workspace_id, data_key)

    @hookimpl(trylast=True)
    def byok_unwrap_data_key(self, workspace_id: str, wrapped: WrappedDataKey) -> bytes | None:
        return self.app.key_encryption.unwrap(workspace_id, wrapped)

    @hookimpl(trylast=True)
    def byok_rewrap_data_key(
        self, workspace_id: str, wrapped: WrappedDataKey
    ) -> WrappedDataKey | None:
        return self.app.key_encryption.rewrap(workspace_id, wrapped)

    @hookimpl(trylast=True)
    def byok_key_provider(self) -> str | None:
        return self.app.key_encryption.describe()

    @hookimpl(trylast=True)
    def byok_audit(self, event: AuditEvent) -> None:
        if event.action.startswith("key.") and "resolver" in self.app.__dict__:
            # a key changed through this process: resolution must not serve the old list, nor
            # a cooldown it has yet to write for a key an operator has since changed
            self.app.resolver.key_changed(
                event.workspace_id,
                event.provider,
                key_id=event.key_id,
                state_changed=event.action in _KEY_STATE_CHANGES,
            )
        elif event.action.startswith("org.") and "resolver" in self.app.__dict__:
            # attached to an organization, opted out or back in: its key pool changes
            self.app.resolver.key_changed(event.workspace_id, None)
        audit_log.info(
            "%s workspace=%s actor=%s outcome=%s provider=%s key=%s %s",
            event.action,
            event.workspace_id,
            event.actor_id,
            event.outcome,
            event.provider,
            event.key_id,
            event.detail,
        )
        # The audit table. An audit hook runs after the change it records: failing here would
        # report an error for a change that did happen, so a store failure is logged loudly.
        if called_inline() and not self.app.store_is_local:  # on an event loop: no round trip
            self.app.background_writes.submit(
                lambda: self.app.audit_store.record(event),
                f"audit event {event.action} of workspace {event.workspace_id}",
            )
            return
        try:
            self.app.audit_store.record(event)
        except Exception as exc:
            if self.app.background_writes.takes(exc):  # locked: wait for it off the loop
                self.app.background_writes.submit(
                    lambda: self.app.audit_store.record(event),
                    f"audit event {event.action} of workspace {event.workspace_id}",
                )
                return
            audit_log.error(
                "audit event %s of workspace %s not written to the store: %s: %s",
                event.action,
                event.workspace_id,
                type(exc).__name__,
                exc,
            )


def _app_from_environment() -> App:
    return App(Settings.from_environ())
