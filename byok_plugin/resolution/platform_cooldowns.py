"""Platform-key cooldowns shared through the store (revision 0005).

A platform key the provider refused (429, auth) is skipped by the worker that saw the refusal
(:class:`~byok_plugin.resolution.platform_keys.PlatformKeyPool`) and, through this table, by every other
worker on the same store: each reads the cooldowns at most once per key-cache interval before it
hands out a platform key. Keys are named by their safe reference (``env:OPENAI_API_KEY_2``), never
by their value, so workers must name their platform keys the same way (the same environment).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from byok_plugin.store.engine import store_errors, write_transaction
from byok_plugin.store.tables import UTCDateTime, metadata

__all__ = ["PlatformCooldowns", "platform_key_cooldowns"]

platform_key_cooldowns = sa.Table(
    "byok_platform_key_cooldowns",
    metadata,
    sa.Column("provider", sa.String(40), primary_key=True),
    sa.Column("key_id", sa.String(200), primary_key=True),
    sa.Column("cooldown_until", UTCDateTime, nullable=False),
    sa.Column("reason", sa.String(16), nullable=False),
)


class PlatformCooldowns:
    """Reads and writes ``byok_platform_key_cooldowns``."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        dialect = engine.dialect.name
        self._insert = (
            postgresql.insert(platform_key_cooldowns)
            if dialect == "postgresql"
            else sqlite.insert(platform_key_cooldowns)
        )

    def __repr__(self) -> str:
        return f"PlatformCooldowns(dialect={self._engine.dialect.name!r})"

    def cool_down(self, provider: str, key_id: str, until: datetime, reason: str) -> None:
        """Skip ``key_id`` until ``until`` in every worker (a later cooldown already stored
        stays).

        :raises StoreUnavailable: the store did not take it.
        """
        t = platform_key_cooldowns
        insert = self._insert.values(
            provider=provider, key_id=key_id, cooldown_until=until, reason=reason
        )
        statement = insert.on_conflict_do_update(
            index_elements=[t.c.provider, t.c.key_id],
            set_={"cooldown_until": insert.excluded.cooldown_until, "reason": reason},
            where=t.c.cooldown_until < insert.excluded.cooldown_until,
        )
        with (
            store_errors(f"writing the cooldown of platform key {key_id}", provider=provider),
            write_transaction(self._engine) as conn,
        ):
            conn.execute(statement)

    def active(self, provider: str, now: datetime) -> dict[str, datetime]:
        """key id -> until, for the provider's keys cooling down at ``now``.

        :raises StoreUnavailable: the store did not answer.
        """
        t = platform_key_cooldowns
        query = sa.select(t.c.key_id, t.c.cooldown_until).where(
            t.c.provider == provider, t.c.cooldown_until > now
        )
        with (
            store_errors("reading platform key cooldowns", provider=provider),
            self._engine.connect() as conn,
        ):
            return {row.key_id: row.cooldown_until for row in conn.execute(query)}
