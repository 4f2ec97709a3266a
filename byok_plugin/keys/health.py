"""Key health: test every enabled stored key live, record the result, disable dead keys.

:func:`check_key_health` is the schedulable job (``byok keys check`` runs it; a host calls it from
cron or its own scheduler). For every enabled key of every workspace and organization (or of the
owners given) it decrypts the key, asks ``byok_validate_key``, and records the outcome in
``byok_key_health`` (one row per key: last check, status, message, consecutive auth refusals).
After ``disable_after`` consecutive ``invalid`` answers (the provider refused the key: revoked,
deleted) the key is disabled through :class:`~byok_plugin.keys.service.KeyService` (audited
``key.disabled``) and a ``key.unhealthy`` audit event (outcome ``error``) says why, for an admin
to be notified from. ``no_credit`` (OpenAI ``insufficient_quota``, Anthropic's credit balance),
``unreachable`` and ``skipped`` answers never count toward it, and reset nothing but the streak
of auth refusals on a valid answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from byok_hookspecs import Actor, ByokError, KeyCheck, KeyCheckStatus

from byok_plugin.keys.validation import redact
from byok_plugin.store.engine import store_errors, write_transaction
from byok_plugin.store.tables import UTCDateTime, metadata, workspace_keys

__all__ = ["HEALTH_ACTOR", "KeyHealth", "check_key_health", "key_health"]

#: who disables a key that keeps failing (the local operator's job)
HEALTH_ACTOR = Actor(id="byok-key-health", operator=True)
DEFAULT_DISABLE_AFTER = 3

key_health = sa.Table(
    "byok_key_health",
    metadata,
    sa.Column("key_id", sa.String(80), primary_key=True),
    sa.Column("checked_at", UTCDateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("message", sa.String(500), nullable=False),
    # consecutive ``invalid`` answers, the last one included
    sa.Column("auth_failures", sa.Integer, nullable=False),
)


@dataclass(frozen=True, slots=True)
class KeyHealth:
    """One key's check: what the provider said, the streak of auth refusals, and whether the key
    was disabled for it."""

    key_id: str
    owner_id: str
    provider: str
    label: str
    hint: str
    status: str
    message: str
    auth_failures: int
    disabled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in KeyHealth.__dataclass_fields__}


def _pairs(engine: sa.Engine, owners: Iterable[str] | None) -> list[tuple[str, str]]:
    t = workspace_keys
    query = sa.select(t.c.workspace_id, t.c.provider).where(t.c.status == "enabled").distinct()
    if owners is not None:
        query = query.where(t.c.workspace_id.in_(list(owners)))
    with store_errors("listing keys to check"), engine.connect() as conn:
        return sorted((r.workspace_id, r.provider) for r in conn.execute(query))


def check_key_health(
    app: Any,
    pm: Any,
    *,
    owners: Iterable[str] | None = None,
    disable_after: int = DEFAULT_DISABLE_AFTER,
    clock: Callable[[], datetime] | None = None,
) -> list[KeyHealth]:
    """Check every enabled key (of ``owners`` only, when given: workspace ids or ``org:<id>``).

    :param app: the :class:`~byok_plugin.app.App` whose store holds the keys.
    :param pm: the plugin manager whose ``byok_validate_key``, ``byok_audit`` and
        ``byok_authorize`` hooks are used.
    :param disable_after: disable a key after this many consecutive ``invalid`` answers (>= 1).
    :param clock: what dates the checks; the app's clock when not given.
    :returns: one :class:`KeyHealth` per key checked, by owner, provider and age.
    """
    if disable_after < 1:
        raise ValueError("disable_after must be at least 1")
    service = app.key_service(pm)
    results: list[KeyHealth] = []
    for owner, provider in _pairs(app.engine, owners):
        for key in app.key_access.enabled_keys(owner, provider):
            try:
                api_key = app.key_access.reveal(key).api_key
            except ByokError as exc:  # does not decrypt: the operator's problem, not the key's
                check = KeyCheck(provider, KeyCheckStatus.UNREACHABLE, f"not checked: {exc}")
            else:
                answer = pm.hook.byok_validate_key(provider=provider, api_key=api_key)
                check = answer or KeyCheck(provider, KeyCheckStatus.SKIPPED, "no check answered")
                check = KeyCheck(provider, check.status, redact(check.message, api_key))
            failures = _record(app.engine, key.id, check, (clock or app.clock)())
            disabled = False
            if check.status is KeyCheckStatus.INVALID and failures >= disable_after:
                service.disable(HEALTH_ACTOR, owner, provider, key_id=key.id)
                service.audit(
                    "key.unhealthy",
                    HEALTH_ACTOR,
                    owner,
                    outcome="error",
                    provider=provider,
                    key_id=key.id,
                    detail=(
                        f"disabled after {failures} consecutive auth refusals by {provider}: "
                        f"{check.message}"
                    )[:500],
                )
                resolver = app.__dict__.get("resolver")  # this process's, if it has one
                if resolver is not None:
                    resolver.key_changed(owner, provider, key_id=key.id, state_changed=True)
                disabled = True
            results.append(
                KeyHealth(
                    key.id,
                    owner,
                    provider,
                    key.label,
                    key.hint,
                    check.status.value,
                    check.message,
                    failures,
                    disabled,
                )
            )
    return results


def _record(engine: sa.Engine, key_id: str, check: KeyCheck, now: datetime) -> int:
    """Store the check; returns the streak of consecutive ``invalid`` answers."""
    t = key_health
    with store_errors("recording a key check", key_id=key_id), write_transaction(engine) as conn:
        previous = conn.execute(sa.select(t.c.auth_failures).where(t.c.key_id == key_id)).first()
        if check.status is KeyCheckStatus.INVALID:
            failures = (previous.auth_failures if previous is not None else 0) + 1
        elif check.status is KeyCheckStatus.VALID:
            failures = 0
        else:  # unreachable, skipped, no credit: says nothing about the key's validity
            failures = previous.auth_failures if previous is not None else 0
        values = {
            "checked_at": now,
            "status": check.status.value,
            "message": check.message[:500],
            "auth_failures": failures,
        }
        if previous is None:
            conn.execute(t.insert().values(key_id=key_id, **values))
        else:
            conn.execute(t.update().where(t.c.key_id == key_id).values(**values))
    return failures
