"""Store writes handed off an event loop's thread.

A hook called inline on an asyncio host's event loop (:func:`byok_hookspecs.called_inline`) must
not wait for a lock another process holds on a SQLite store
(:data:`~byok_plugin.store.engine.LOOP_LOCK_WAIT_MS`). An audit event or a key
cooldown that could not be written at once is written here instead, in one background thread
that waits for the lock as long as any other writer: the hook returns, the loop goes on, and the
row lands when the lock is released. A failure is logged, as a failed audit write always was.
:meth:`BackgroundWrites.close` (called by ``App.close``) waits for what is pending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["BackgroundWrites"]

log = logging.getLogger("byok.store")


class BackgroundWrites:
    """One thread, started at the first write handed to it, that runs writes in order."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending = 0

    def __repr__(self) -> str:
        return f"BackgroundWrites(pending={self._pending})"

    @property
    def pending(self) -> int:
        """Writes handed over and not finished yet."""
        return self._pending

    def submit(self, write: Callable[[], object], what: str) -> None:
        """Run ``write()`` in the background thread; ``what`` names it in the log if it fails."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="byok-store-writes"
                )
            self._pending += 1
            future = self._executor.submit(write)

        def done(finished: Future[object]) -> None:
            with self._lock:
                self._pending -= 1
            if finished.cancelled():  # dropped by close(), which said so
                return
            error = finished.exception()
            if error is not None:
                log.error(
                    "%s was not written to the store: %s: %s", what, type(error).__name__, error
                )

        future.add_done_callback(done)

    def close(self, timeout: float = 30.0) -> None:
        """Wait up to ``timeout`` seconds for the pending writes, then stop the thread (a later
        write starts a new one). Writes still queued then (the store locked all along) are
        dropped, and said so in the log; the one running finishes on its own."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is None:
            return
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._pending:
            log.error(
                "%d store writes (audit events, key cooldowns) were still waiting after %.0f s "
                "and are dropped",
                self._pending,
                timeout,
            )
        executor.shutdown(wait=False, cancel_futures=True)
