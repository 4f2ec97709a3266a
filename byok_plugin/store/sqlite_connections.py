"""The ``sqlite3`` connections of the direct readers and writers of the store's SQLite file
(:mod:`byok_plugin.keys.reader`, :mod:`byok_plugin.billing.ledger`), shared by every thread.

A ``sqlite3`` connection must not be used by two threads at once, so a thread borrows one for a
statement and gives it back: there are never more connections than calls that ran at the same
time, whatever threads made them. A process that calls ``asyncio.run`` again and again, each run
with its own short-lived worker threads, thus keeps the same few connections; a connection per
thread would pile up one per thread it ever had.

Connections are kept open rather than closed as threads end: SQLite keeps the file descriptor of
a connection closed while another connection of the process holds a lock on the same file (the
engine's, in WAL mode), so closing connections does not give their descriptors back either.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

from byok_plugin.store.engine import BUSY_TIMEOUT_MS

__all__ = ["SqliteConnections"]


class SqliteConnections:
    """Borrow a connection to ``database`` with :meth:`acquire`, give it back with
    :meth:`release`; new ones are opened when all are in use.

    :param database: a file path, or a ``file:`` URI with ``uri=True``.
    :param prepare: run on each new connection (pragmas).

    Connections are in autocommit mode (``isolation_level=None``: each statement is its own
    transaction unless the caller says ``BEGIN``), wait up to 30 s for a lock, and may be used by
    any thread, one at a time.
    """

    def __init__(
        self,
        database: str,
        *,
        uri: bool = False,
        prepare: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self._database = database
        self._uri = uri
        self._prepare = prepare
        self._idle: list[sqlite3.Connection] = []
        self._open: set[sqlite3.Connection] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many connections are open (at most as many as calls ran at once)."""
        return len(self._open)

    def __repr__(self) -> str:
        return f"SqliteConnections(open={len(self)}, idle={len(self._idle)})"

    def acquire(self) -> sqlite3.Connection:
        """An idle connection, or a new one; :meth:`release` it when the statement is done."""
        try:
            return self._idle.pop()  # atomic: no two threads get the same connection
        except IndexError:
            pass
        conn = sqlite3.connect(
            self._database,
            uri=self._uri,
            isolation_level=None,
            check_same_thread=False,  # borrowed by any thread, one at a time
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        try:
            if self._prepare is not None:
                self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._open.add(conn)
        return conn

    def release(self, conn: sqlite3.Connection) -> None:
        """Give a connection back (closed instead, if :meth:`close` ran meanwhile)."""
        with self._lock:
            if conn in self._open:
                self._idle.append(conn)
                return
        conn.close()

    def discard(self, conn: sqlite3.Connection) -> None:
        """Close a borrowed connection instead of giving it back: one that failed for another
        reason than a lock (opened read-only while the file was unwritable, an I/O error) is
        never lent again; the next :meth:`acquire` opens a fresh one."""
        with self._lock:
            self._open.discard(conn)
        conn.close()

    def close(self) -> None:
        """Close the idle connections now, and those in use when they are given back."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._open.clear()
        for conn in idle:
            conn.close()
