"""Each worker's ear on PostgreSQL: ``LISTEN byok_keys``, so a key change anywhere reaches it at once.

A worker on PostgreSQL keeps each (workspace, provider)'s key list in memory
(:class:`~byok_plugin.resolution.resolver.KeyListCache`). Every write that changes what resolution serves
sends ``NOTIFY byok_keys`` in its own transaction (:mod:`byok_plugin.store.key_events`);
:class:`KeyChangeListener` holds one dedicated connection per process (outside the engine's pool)
in one daemon thread, and drops the cached list named by each notification as it arrives: a key
deleted, disabled or cooled down in any worker is not served here once the change has committed
and the notification has crossed (measured by ``tests/test_key_listener.py``: about a
millisecond on loopback).

While it listens, the cache keeps lists for ``listening_seconds`` (60 s): they are dropped on
change, not on a clock. When the connection is lost (server restart, network, an administrator's
``pg_terminate_backend``) it says so in the log (``byok.resolution``, a warning), the cache drops
every list and falls back to ``BYOK_KEY_CACHE_SECONDS``, its safety net: other workers' changes
then reach this one within that interval. It reconnects, backing off up to 30 s; once listening
again it drops every list once more (a change may have been missed meanwhile) and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import URL, make_url

from byok_plugin.store.key_events import KEY_CHANNEL, parse_key_change

__all__ = ["KeyChangeListener"]

log = logging.getLogger("byok.resolution")

#: how often a quiet connection is checked (one ``SELECT 1``): a silent network loss shows here
HEARTBEAT_SECONDS = 10.0
#: the longest wait between two connection attempts
MAX_RETRY_SECONDS = 30.0


def libpq_url(url: str | URL) -> str:
    """A SQLAlchemy ``postgresql+psycopg://`` URL as libpq takes it (kept in memory only)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class KeyChangeListener:
    """One thread and one connection that turn ``byok_keys`` notifications into cache drops.

    :param url: the store's SQLAlchemy URL (never logged).
    :param changed: called with ``(workspace_id, provider or None)`` for each notification.
    :param listening: called with ``True`` once ``LISTEN`` is in place (again), ``False`` when the
        connection is lost; the resolver drops every cached list and picks its TTL on both.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        changed: Callable[[str, str | None], None],
        listening: Callable[[bool], None],
        retry_seconds: float = 1.0,
    ) -> None:
        self._conninfo = libpq_url(url)
        self._changed = changed
        self._listening = listening
        self._retry = retry_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[object] | None = None
        self.is_listening = False
        #: notifications received and acted on (for tests and diagnostics)
        self.received = 0
        #: times the connection was lost
        self.losses = 0
        #: the backend pid of the listening connection (``pg_terminate_backend`` in tests)
        self.backend_pid: int | None = None

    def __repr__(self) -> str:
        return f"KeyChangeListener(listening={self.is_listening}, received={self.received})"

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="byok-key-listener", daemon=True)
        self._thread.start()

    def wait_listening(self, timeout: float = 10.0) -> bool:
        """Wait until ``LISTEN`` is in place; whether it is."""
        deadline = time.monotonic() + timeout
        while not self.is_listening and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.is_listening

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening and close the connection."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._retry
        failing_since: float | None = None
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {KEY_CHANNEL}")
                    self.backend_pid = conn.info.backend_pid
                    self.is_listening = True
                    self._listening(True)
                    if failing_since is not None:
                        log.warning(
                            "key change notifications restored after %.1f s: every cached key "
                            "list was dropped (changes made meanwhile are read afresh)",
                            time.monotonic() - failing_since,
                        )
                    failing_since, delay = None, self._retry
                    self._listen(conn)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    break
                if self.is_listening:
                    self.losses += 1
                    self.is_listening = False
                    self._listening(False)
                    failing_since = time.monotonic()
                    log.warning(
                        "key change notifications lost (%s); this worker now sees other "
                        "workers' key changes within BYOK_KEY_CACHE_SECONDS only, until the "
                        "connection is back",
                        _first_line(exc),
                    )
                elif failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "cannot listen for key change notifications (%s); other workers' key "
                        "changes reach this worker within BYOK_KEY_CACHE_SECONDS; retrying",
                        _first_line(exc),
                    )
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, MAX_RETRY_SECONDS)
        if self.is_listening:
            self.is_listening = False
            self._listening(False)

    def _listen(self, conn: psycopg.Connection[object]) -> None:
        quiet_since = time.monotonic()
        while not self._stop.is_set():
            for notice in conn.notifies(timeout=0.5):
                quiet_since = time.monotonic()
                change = parse_key_change(notice.payload)
                if change is None:  # not ours: drop every list rather than guess
                    self._listening(True)
                else:
                    self._changed(*change)
                self.received += 1  # counted once acted on: a test that sees it sees the drop
            if time.monotonic() - quiet_since >= HEARTBEAT_SECONDS:
                conn.execute("SELECT 1")  # raises if the connection is gone
                quiet_since = time.monotonic()


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:200]}"
