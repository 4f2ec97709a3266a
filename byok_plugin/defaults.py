"""byok-plugin's built-in hook implementations, registered through the entry point ``byok``.

Every one is ``trylast``: anything a user installs runs before them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cached_property
from types import SimpleNamespace
from typing import Any

from byok_hookspecs import (
    Action,
    Actor,
    AuditEvent,
    Charge,
    Credential,
    CredentialRequest,
    KeyCheck,
    RecordedCall,
    Usage,
    UsageRecord,
    hookimpl,
)

from byok_plugin.app import App
from byok_plugin.authorization import role_decision
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
    }
)
#: audited key changes after which a cooldown not yet written must not be applied any more
_KEY_STATE_CHANGES = frozenset({"key.enabled", "key.disabled", "key.deleted", "key.replaced"})
#: hooks that read or write the store: non-blocking when it is a local SQLite file
_STORE_HOOKS = frozenset(
    {"byok_resolve_credential", "byok_record_usage", "byok_recorded_calls", "byok_audit"}
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
        ``byok_platform_key``, ``byok_authorize`` and ``byok_audit`` (any plugin's answers first)."""
        self._pm = pm

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
        trip. ``byok_validate_key`` calls the provider."""
        try:
            local = self.app.store_is_local
        except Exception:  # a configuration error: the hooks will report it, not this hint
            local = False
        if not local:
            return _IN_MEMORY_HOOKS
        if self.app.settings.key_wait_seconds > 0:  # resolution may wait for a cooling key
            return _IN_MEMORY_HOOKS | (_STORE_HOOKS - {"byok_resolve_credential"})
        return _IN_MEMORY_HOOKS | _STORE_HOOKS

    @cached_property
    def app(self) -> App:
        if self._app is not None:
            return self._app
        assert self._app_factory is not None
        return self._app_factory()

    @hookimpl(trylast=True)
    def byok_authorize(self, actor: Actor | None, workspace_id: str, action: Action) -> bool | None:
        return role_decision(actor, workspace_id, action)

    @hookimpl(trylast=True)
    def byok_resolve_credential(self, request: CredentialRequest) -> Credential | None:
        pm = self._pm if self._pm is not None else self._own_hooks
        return self.app.resolver.resolve(request, pm)

    @hookimpl(trylast=True)
    def byok_record_usage(self, record: UsageRecord) -> None:
        self.app.ledger.record(record)

    @hookimpl(trylast=True)
    def byok_recorded_calls(self, run_id: str) -> tuple[RecordedCall, ...] | None:
        return self.app.ledger.recorded_calls(run_id)

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
