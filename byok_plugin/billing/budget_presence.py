"""Which workspaces have budgets, known in memory while every budget change reaches this worker.

Most workspaces have no budget, and on PostgreSQL asking the store whether one applies costs a
network round trip (and, from an asyncio host, a worker-thread trip) on every provider call. A
worker on PostgreSQL listens for changes (:class:`~byok_plugin.keys.listener.KeyChangeListener`):
a budget written or deleted announces its workspace in the transaction that changes it
(:func:`~byok_plugin.store.key_events.notify_key_change`), so while the listener is connected this
worker can remember that a workspace has no budget, and forget it the moment one is set anywhere.

A workspace's entry is dropped by any announcement of that workspace (a key change too: it costs
one read, never a wrong answer), and every entry is dropped whenever the listener connects or
loses its connection; while it is down nothing is remembered and every reservation asks the store,
as before. A budget set in another worker applies here to the reservations made once the change has
committed and its notification has crossed (about a millisecond on loopback), the same window as
for a key deleted elsewhere. On SQLite nothing is remembered (its reads are local).
"""

from __future__ import annotations

import threading

__all__ = ["BudgetPresence"]

#: entries kept at most (one per workspace seen; dropped all at once past this, then read again)
MAX_WORKSPACES = 100_000


class BudgetPresence:
    """Whether each workspace has budgets, valid while :meth:`set_listening` said ``True``.

    A read of the store made on a miss is kept only if nothing was announced meanwhile (the
    generation taken before the read is still current): a change that committed during the read
    must not leave its stale answer behind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, bool] = {}
        self._generation = 0
        self._listening = False

    def __repr__(self) -> str:
        return f"BudgetPresence(listening={self._listening}, known={len(self._known)})"

    @property
    def listening(self) -> bool:
        """Whether every budget change reaches this worker as it commits."""
        return self._listening

    @property
    def generation(self) -> int:
        """Counts the announcements: taken before a read, passed to :meth:`remember`."""
        return self._generation

    def has_budgets(self, workspace_id: str) -> bool | None:
        """``True`` or ``False`` when known; ``None`` when not (or not listening)."""
        if not self._listening:
            return None
        return self._known.get(workspace_id)

    def remember(self, workspace_id: str, has_budgets: bool, generation: int) -> None:
        """Keep what a read of the store found, if nothing changed since ``generation``."""
        with self._lock:
            if not self._listening or generation != self._generation:
                return
            if len(self._known) >= MAX_WORKSPACES:
                self._known.clear()
            self._known[workspace_id] = has_budgets

    def changed_elsewhere(self, workspace_id: str, provider: str | None = None) -> None:
        """A change of ``workspace_id`` committed (here or in another worker): forget it."""
        with self._lock:
            self._generation += 1
            self._known.pop(workspace_id, None)

    def set_listening(self, listening: bool) -> None:
        """The listener connected (``True``) or lost its connection: forget everything (a change
        may have been missed), and remember from now on only while connected."""
        with self._lock:
            self._generation += 1
            self._known.clear()
            self._listening = listening
