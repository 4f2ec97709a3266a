"""Key-change notifications on PostgreSQL: ``NOTIFY byok_keys`` in the transaction that changes.

Every write that changes what resolution serves (a key stored, replaced, deleted, enabled or
disabled, put in or out of cooldown, rewrapped; a workspace's keys shredded; its fallback
policy; its organization membership or opt-out) calls :func:`notify_key_change` inside its own transaction. PostgreSQL delivers the
notification to every listening connection when, and only when, that transaction commits, so a
worker's :class:`~byok_plugin.keys.listener.KeyChangeListener` drops the cached list as soon as
the change is visible, and never for a change that rolled back. On SQLite it does nothing: the
workers of a SQLite file share one machine and rely on the cache's few seconds.

The payload names the workspace and provider (``{"w": "acme", "p": "openai"}``; ``"p"`` is
``null`` for every provider of the workspace); never a key, a ciphertext or an actor.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection

__all__ = ["KEY_CHANNEL", "notify_key_change", "notify_keys_changed", "parse_key_change"]

#: the PostgreSQL channel the key changes are announced on
KEY_CHANNEL = "byok_keys"

_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")


def notify_key_change(conn: Connection, workspace_id: str, provider: str | None) -> None:
    """Announce, when ``conn``'s transaction commits, that the keys of ``workspace_id`` (for
    ``provider``, or all of them when ``None``) changed. A no-op on SQLite."""
    if conn.dialect.name != "postgresql":
        return
    payload = json.dumps({"w": workspace_id, "p": provider}, separators=(",", ":"))
    conn.execute(_NOTIFY, {"channel": KEY_CHANNEL, "payload": payload})


def parse_key_change(payload: str) -> tuple[str, str | None] | None:
    """``(workspace_id, provider or None)`` from a notification's payload; ``None`` when it is not
    one this module wrote (then the listener drops every cached list, to be safe)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    workspace_id, provider = data.get("w"), data.get("p")
    if not isinstance(workspace_id, str) or not (provider is None or isinstance(provider, str)):
        return None
    return workspace_id, provider


def notify_keys_changed(conn: Connection, key_ids: list[str]) -> None:
    """:func:`notify_key_change` for the (workspace, provider) of each of ``key_ids`` (read in
    ``conn``'s transaction). A no-op on SQLite."""
    if conn.dialect.name != "postgresql" or not key_ids:
        return
    from byok_plugin.store.tables import workspace_keys as t

    slots = conn.execute(
        sa.select(t.c.workspace_id, t.c.provider).where(t.c.id.in_(key_ids)).distinct()
    ).all()
    for workspace_id, provider in sorted(slots):
        notify_key_change(conn, workspace_id, provider)
