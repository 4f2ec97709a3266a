"""The ``sqlite3`` connections of the direct readers and writers of the store's SQLite file
(:mod:`byok_plugin.keys.reader`, :mod:`byok_plugin.billing.ledger`,
:mod:`byok_plugin.billing.budgets`), shared by every thread.

A ``sqlite3`` connection must not be used by two threads at once, so a thread borrows one for a
statement and gives it back: there are never more connections than calls that ran at the same
time, whatever threads made them. A process that calls ``asyncio.run`` again and again, each run
with its own short-lived worker threads, thus keeps the same few connections; a connection per
thread would pile up one per thread it ever had.

The ledger and the budgets borrow from the same :class:`SqliteWriters`: a call's reservation,
and then its ledger row with its settlement, run on one connection of the event loop's thread.
SQLite empties a connection's page cache whenever another connection has written the file since
that connection's last transaction, so with a connection each, every reservation and every
settlement read the pages they need again (measured: a reservation 59 -> 121 us, a settlement
54 -> 113 us, when another connection wrote in between).

Connections are kept open rather than closed as threads end: SQLite keeps the file descriptor of
a connection closed while another connection of the process holds a lock on the same file (the
engine's, in WAL mode), so closing connections does not give their descriptors back either.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

from byok_plugin.store.engine import (
    BUSY_TIMEOUT_MS,
    LOOP_LOCK_WAIT_MS,
    prepare_sqlite_connection,
)

__all__ = ["SqliteConnections", "SqliteWriters"]


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


def _prepare_prompt(conn: sqlite3.Connection) -> None:
    prepare_sqlite_connection(conn)
    conn.execute(f"PRAGMA busy_timeout = {LOOP_LOCK_WAIT_MS}")


class SqliteWriters:
    """The connections the direct writers of one store file borrow (see the module's text): those
    lent to a caller on an event loop's thread (:attr:`prompt`, which wait at most
    :data:`~byok_plugin.store.engine.LOOP_LOCK_WAIT_MS` for another writer's lock) and those
    lent to the others (:attr:`waiting`). All have the store's pragmas."""

    def __init__(self, path: str) -> None:
        self.waiting = SqliteConnections(path, prepare=prepare_sqlite_connection)
        self.prompt = SqliteConnections(path, prepare=_prepare_prompt)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.prompt)

    def __repr__(self) -> str:
        return f"SqliteWriters(waiting={self.waiting!r}, prompt={self.prompt!r})"

    def pool(self, prompt: bool) -> SqliteConnections:
        """The connections for a caller on an event loop's thread (``prompt``), or another."""
        return self.prompt if prompt else self.waiting

    def close(self) -> None:
        """Close both pools' connections (a later borrower opens new ones)."""
        self.waiting.close()
        self.prompt.close()
