"""A fast read of a (workspace, provider)'s enabled keys from a SQLite store, for resolution.

On a local SQLite file, SQLAlchemy's own work (a pooled connection, ``BEGIN``, the statement,
``ROLLBACK``, result processing) costs several times the point select itself, and resolution
does this read for every call it cannot serve from its cache. This reader runs the same
``SELECT`` (the columns of :class:`~byok_plugin.store.keys_repo.StoredKey`, from the store's own
table definition) on a read-only ``sqlite3`` connection, in autocommit mode so
each read sees every committed write (WAL readers never block writers). Connections are shared
by the threads, one read at a time (:class:`~byok_plugin.store.sqlite_connections.SqliteConnections`),
so short-lived threads leave none behind.

PostgreSQL needs none of this: there the network round trip dominates, and resolution reads
through :class:`~byok_plugin.keys.access.KeyAccess`.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.store.engine import BUSY_TIMEOUT_MS
from byok_plugin.store.keys_repo import KeyInfo, StoredKey
from byok_plugin.store.sqlite_connections import SqliteConnections
from byok_plugin.store.tables import workspace_keys

__all__ = ["SqliteKeyReader", "sqlite_file_of"]

_FIELDS = (*KeyInfo.__dataclass_fields__, "ciphertext")
_DATETIMES = frozenset(name for name in _FIELDS if name.endswith("_at") or name == "cooldown_until")


def sqlite_file_of(engine: Engine) -> Path | None:
    """The database file of a SQLite engine (``None`` for other backends and in-memory ones)."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def _busy_timeout(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(value).replace(tzinfo=UTC)  # SQLAlchemy's naive UTC text


class SqliteKeyReader:
    """``reader(workspace_id, provider) -> list[StoredKey]``, enabled keys, oldest first."""

    def __init__(self, path: Path) -> None:
        self._uri = f"{path.as_uri()}?mode=ro"
        columns = ", ".join(workspace_keys.c[name].name for name in _FIELDS)
        self._sql = (
            f"SELECT {columns} FROM {workspace_keys.name} "  # noqa: S608 (names from the table)
            "WHERE workspace_id = ? AND provider = ? AND status = 'enabled' "
            "ORDER BY created_at, id"
        )
        # read-only connections, borrowed per read: no more than reads that ran at once
        self._connections = SqliteConnections(self._uri, uri=True, prepare=_busy_timeout)

    def __repr__(self) -> str:
        return f"SqliteKeyReader(connections={len(self._connections)})"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def __call__(self, workspace_id: str, provider: str) -> list[StoredKey]:
        try:
            conn = self._connections.acquire()
            try:
                rows = conn.execute(self._sql, (workspace_id, provider)).fetchall()
            finally:
                self._connections.release(conn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                "reading enabled keys",
                workspace_id=workspace_id,
                provider=provider,
                cause=f"{type(exc).__name__}: {str(exc)[:300]}",
            ) from None
        keys = []
        for row in rows:
            values = dict(zip(_FIELDS, row, strict=True))
            for name in _DATETIMES:
                values[name] = _datetime(values[name])
            keys.append(StoredKey(**values))
        return keys

    def close(self) -> None:
        """Close the connections (the next read opens a new one)."""
        self._connections.close()
