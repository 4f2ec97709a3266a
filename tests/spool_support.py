"""Helpers for the spool tests: make a real store refuse every ledger write, and let it go.

Not a test module. On PostgreSQL a trigger raises on every insert into the ledger (what the
runner sees when the server refuses writes: an error from the server). On SQLite a trigger
writes into a table that has been dropped, so every insert fails with an ``OperationalError``
(``no such table``), as it does for a read-only or full disk; the file stays readable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from byok_plugin.store.engine import create_store_engine


def refuse_ledger_writes(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(
                    sa.text(
                        "CREATE FUNCTION byok_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$ BEGIN RAISE EXCEPTION 'the ledger refuses writes (test)'; END $$"
                    )
                )
                conn.execute(
                    sa.text(
                        "CREATE TRIGGER byok_test_refuse BEFORE INSERT ON byok_usage_ledger "
                        "FOR EACH ROW EXECUTE FUNCTION byok_test_refuse()"
                    )
                )
            else:
                conn.execute(sa.text("CREATE TABLE byok_test_gone (k TEXT)"))
                conn.execute(
                    sa.text(
                        "CREATE TRIGGER byok_test_refuse BEFORE INSERT ON byok_usage_ledger "
                        "BEGIN INSERT INTO byok_test_gone VALUES (new.idempotency_key); END"
                    )
                )
                conn.execute(sa.text("DROP TABLE byok_test_gone"))
    finally:
        engine.dispose()


def accept_ledger_writes(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("DROP TRIGGER byok_test_refuse ON byok_usage_ledger"))
                conn.execute(sa.text("DROP FUNCTION byok_test_refuse()"))
            else:
                conn.execute(sa.text("DROP TRIGGER byok_test_refuse"))
    finally:
        engine.dispose()


def make_unwritable(path: Path) -> Callable[[], None]:
    """Make a file unwritable (``chmod``; ``chattr +i`` for root, whom modes do not stop);
    returns the function that undoes it. Where root may not set the immutable flag (no
    ``CAP_LINUX_IMMUTABLE``), the test is skipped, saying why."""
    import pytest

    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o444)
        return lambda: path.chmod(mode)
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a file unwritable as root here: {done.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


class TcpProxy:
    """A loopback TCP proxy to a database server: :meth:`kill` closes every connection and
    refuses new ones (the server gone, as a restart or a crash looks to a client), :meth:`start`
    listens again on the same port; :meth:`freeze` stops forwarding (a silent server). Threads, one pair per connection; for tests only."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()

    def freeze(self) -> None:
        """Stop forwarding, connections left open (a server that stops answering, without a
        reset): what is sent waits here, and is delivered after :meth:`thaw`."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def url(self, database_url: str) -> str:
        from sqlalchemy.engine import make_url

        parsed = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)
