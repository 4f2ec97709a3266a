"""Reading the audit log, under authorization: what ``byok audit``, the HTTP route and the
settings page show.

The audit log says who changed which key, who was refused, when the platform key stood in; so it
is for the people who manage a workspace's keys: its admins (``keys.manage``, asked of
``byok_authorize``) and operators. Every workspace's log at once is for operators only. A refusal
is itself audited (``access.denied``), as for keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pluggy
from byok_hookspecs import Action, Actor, AuditEvent, NotAuthorized

from byok_plugin.core.errors import InvalidInput
from byok_plugin.core.key_format import check_workspace_id
from byok_plugin.store.audit_repo import AuditStore

__all__ = [
    "ALL_WORKSPACES",
    "DEFAULT_LIMIT",
    "MAX_CURSOR",
    "MAX_LIMIT",
    "AuditPage",
    "AuditQuery",
    "event_json",
    "read_audit_log",
    "read_audit_page",
]

#: how many events a reader gets unless it asks for another number
DEFAULT_LIMIT = 100
#: the most events one read returns
MAX_LIMIT = 1000
#: the largest ``before`` cursor (the audit table's ids are 64-bit)
MAX_CURSOR = 2**63 - 1
#: the workspace id a refusal to read every workspace's log is recorded under
ALL_WORKSPACES = "*"


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which events to read.

    :param workspace_id: one workspace's events; ``None`` for every workspace's (operators only).
    :param since: only events at or after this timezone-aware time.
    :param limit: at most this many, newest first (1 to :data:`MAX_LIMIT`).
    :param before: the cursor of an older page, as :class:`AuditPage` gave it.
    """

    workspace_id: str | None = None
    since: datetime | None = None
    limit: int = DEFAULT_LIMIT
    before: int | None = None

    def __post_init__(self) -> None:
        if self.workspace_id is not None:
            check_workspace_id(self.workspace_id)
        if self.since is not None and self.since.tzinfo is None:
            raise InvalidInput("the since time must carry a timezone (or end in Z for UTC)")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            raise InvalidInput("the limit must be a whole number")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidInput(f"the limit must be between 1 and {MAX_LIMIT}, not {self.limit}")
        if self.before is not None and (
            isinstance(self.before, bool)
            or not isinstance(self.before, int)
            or not 1 <= self.before <= MAX_CURSOR
        ):
            raise InvalidInput(f"the before cursor must be a whole number from 1 to {MAX_CURSOR}")


@dataclass(frozen=True, slots=True)
class AuditPage:
    """Events newest first, and ``older``: the cursor of the next, older page (``None`` when
    there is none), to pass as :attr:`AuditQuery.before`."""

    events: list[AuditEvent]
    older: int | None


def _utc_now() -> datetime:
    return datetime.now(UTC)


def read_audit_log(
    pm: pluggy.PluginManager,
    store: AuditStore,
    actor: Actor,
    query: AuditQuery,
    *,
    clock: Callable[[], datetime] = _utc_now,
) -> list[AuditEvent]:
    """The events ``query`` asks for, newest first, if ``actor`` may read them (see
    :func:`read_audit_page`)."""
    return read_audit_page(pm, store, actor, query, clock=clock).events


def read_audit_page(
    pm: pluggy.PluginManager,
    store: AuditStore,
    actor: Actor,
    query: AuditQuery,
    *,
    clock: Callable[[], datetime] = _utc_now,
) -> AuditPage:
    """The events ``query`` asks for, newest first, and the cursor of the older ones, if
    ``actor`` may read them. ``clock`` (the app's) dates a refusal's event.

    :raises NotAuthorized: when the actor is not an admin of the workspace nor an operator (or,
        for every workspace, not an operator); the refusal is audited.
    """
    workspace = query.workspace_id
    if workspace is None:
        allowed = actor.operator
    else:
        allowed = (
            pm.hook.byok_authorize(actor=actor, workspace_id=workspace, action=Action.MANAGE_KEYS)
            is True
        )
    if not allowed:
        denied_in = workspace if workspace is not None else ALL_WORKSPACES
        pm.hook.byok_audit(
            event=AuditEvent(
                action="access.denied",
                workspace_id=denied_in,
                actor_id=actor.id,
                outcome="denied",
                detail="read the audit log",
                occurred_at=clock(),
            )
        )
        raise NotAuthorized(actor.id, denied_in, "read the audit log")
    events, older = store.page(workspace, since=query.since, before=query.before, limit=query.limit)
    return AuditPage(events, older)


def event_json(event: AuditEvent) -> dict[str, Any]:
    """One event as JSON: every field, the time in ISO 8601 (UTC)."""
    return {
        "occurred_at": event.occurred_at.isoformat(),
        "action": event.action,
        "workspace_id": event.workspace_id,
        "actor_id": event.actor_id,
        "outcome": event.outcome,
        "provider": event.provider,
        "key_id": event.key_id,
        "detail": event.detail,
    }
