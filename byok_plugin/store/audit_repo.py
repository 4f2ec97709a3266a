"""The audit trail table: one row per :class:`~byok_hookspecs.AuditEvent` (never a secret)."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from byok_hookspecs import AuditEvent
from sqlalchemy.engine import Engine

from byok_plugin.store.engine import store_errors, unstorable_text, write_transaction
from byok_plugin.store.tables import audit_events

__all__ = ["AuditStore", "storable"]

#: the audit table's text columns, and how many characters each holds (``None``: any)
_TEXT_COLUMNS = {
    c.name: getattr(c.type, "length", None) for c in audit_events.c if isinstance(c.type, sa.String)
}


def storable(text: str, length: int | None) -> str:
    """``text`` as every store takes it into a column of ``length`` characters: a NUL and a lone
    surrogate (which PostgreSQL or the driver refuse) written as escapes, and a text too long
    cut and ended with ``~`` and 16 hex digits of its SHA-256, so that two long values stay
    apart. An audit event is evidence: it must land whatever a host or a user put in it (an
    actor id longer than the column, a label with a NUL), not be refused with its change."""
    if unstorable_text(text):
        text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    if length is not None and len(text) > length:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        text = text[: length - 17] + "~" + digest
    return text


class AuditStore:
    """Writes and reads ``byok_audit_events``."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __repr__(self) -> str:
        return f"AuditStore(dialect={self._engine.dialect.name!r})"

    def record(self, event: AuditEvent) -> None:
        with (
            store_errors("writing an audit event", workspace_id=event.workspace_id),
            write_transaction(self._engine) as conn,
        ):
            values: dict[str, Any] = {
                "action": event.action,
                "workspace_id": event.workspace_id,
                "actor_id": event.actor_id,
                "outcome": event.outcome,
                "provider": event.provider,
                "key_id": event.key_id,
                "detail": event.detail,
            }
            for name, value in values.items():
                if isinstance(value, str):
                    values[name] = storable(value, _TEXT_COLUMNS[name])
            conn.execute(sa.insert(audit_events).values(occurred_at=event.occurred_at, **values))

    def events(
        self,
        workspace_id: str | None = None,
        *,
        action: str | None = None,
        since: datetime | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        """The newest events first (by time, then by the order they were written).

        :param workspace_id: one workspace's events; ``None`` for every workspace's.
        :param action: only this action (``key.created``...).
        :param since: only events at or after this (timezone-aware) time.
        :param limit: at most this many events.
        """
        events, _ = self.page(workspace_id, action=action, since=since, limit=limit)
        return events

    def page(
        self,
        workspace_id: str | None = None,
        *,
        action: str | None = None,
        since: datetime | None = None,
        before: int | None = None,
        limit: int = 1000,
    ) -> tuple[list[AuditEvent], int | None]:
        """One page of the newest events first, in the order of :meth:`events`, and the cursor
        of the next (older) page: pass it back as ``before``; ``None`` when there is no more.

        :param action: only this action (``key.created``...).
        :param before: a cursor a previous page returned: only the events after it in this
            order (older, or as old and written before it). An unknown cursor gives no events.
        """
        if since is not None and since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        table = audit_events
        query = sa.select(table)
        if workspace_id is not None:
            query = query.where(table.c.workspace_id == workspace_id)
        if action is not None:
            query = query.where(table.c.action == action)
        if since is not None:
            query = query.where(table.c.occurred_at >= since)
        if before is not None:
            at = sa.select(table.c.occurred_at).where(table.c.id == before).scalar_subquery()
            query = query.where(
                sa.or_(
                    table.c.occurred_at < at,
                    sa.and_(table.c.occurred_at == at, table.c.id < before),
                )
            )
        # one more than asked for, to know whether an older page exists
        query = query.order_by(table.c.occurred_at.desc(), table.c.id.desc()).limit(limit + 1)
        with store_errors("reading audit events"), self._engine.connect() as conn:
            rows = conn.execute(query).all()
        older = rows[limit - 1].id if len(rows) > limit else None
        return [_event(row) for row in rows[:limit]], older


def _event(row: sa.Row[Any]) -> AuditEvent:
    return AuditEvent(
        action=row.action,
        workspace_id=row.workspace_id,
        actor_id=row.actor_id,
        outcome=row.outcome,
        provider=row.provider,
        key_id=row.key_id,
        detail=row.detail,
        occurred_at=row.occurred_at,
    )
