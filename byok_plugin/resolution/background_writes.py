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

from byok_hookspecs import called_inline

from byok_plugin.store.engine import store_busy

__all__ = ["BackgroundWrites"]

log = logging.getLogger("byok.store")


class BackgroundWrites:
    """One thread, started at the first write handed to it, that runs writes in order."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._futures: set[Future[object]] = set()

    def __repr__(self) -> str:
        return f"BackgroundWrites(pending={self.pending})"

    @staticmethod
    def takes(error: BaseException) -> bool:
        """Whether a store write that failed with ``error`` is one to hand over: it found the
        store locked by another writer, in a hook called on an event loop."""
        return called_inline() and store_busy(error)

    @property
    def pending(self) -> int:
        """Writes handed over and not finished yet."""
        return len(self._futures)

    def submit(self, write: Callable[[], object], what: str) -> None:
        """Run ``write()`` in the background thread; ``what`` names it in the log if it fails."""

        def done(finished: Future[object]) -> None:
            with self._lock:
                self._futures.discard(finished)
            if finished.cancelled():  # dropped by close(), which said so
                return
            error = finished.exception()
            if error is not None:
                log.error(
                    "%s was not written to the store: %s: %s", what, type(error).__name__, error
                )

        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="byok-store-writes"
                )
            future = self._executor.submit(write)
            self._futures.add(future)
        future.add_done_callback(done)

    def close(self, timeout: float = 30.0) -> None:
        """Wait up to ``timeout`` seconds for the pending writes, then stop the thread (a later
        write starts a new one). Writes still queued then (the store locked all along) are
        dropped, and said so in the log; the one running finishes on its own."""
        with self._lock:
            executor, self._executor = self._executor, None
            mine = set(self._futures)
        if executor is None:
            return
        deadline = time.monotonic() + timeout
        while any(not f.done() for f in mine) and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = [f for f in mine if not f.done() and not f.running()]
        if queued:
            log.error(
                "%d queued store writes (audit events, key cooldowns) were still waiting after "
                "%.1f s and are dropped%s",
                len(queued),
                timeout,
                "; one is still running" if any(f.running() for f in mine) else "",
            )
        executor.shutdown(wait=False, cancel_futures=True)
