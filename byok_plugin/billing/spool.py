"""The local ledger spool: usage the store could not take, kept on this machine until it can.

A provider call that completed has cost money; its usage must not be lost because the store
(PostgreSQL restarting, a full disk, a read-only SQLite file) refused the row. When
:class:`DurableLedger` cannot write a record to the store, it writes it to a SQLite file in
``BYOK_HOME`` (``BYOK_LEDGER_SPOOL``) whose every commit is fsynced (``synchronous = FULL``), one
row per idempotency key. The spool is replayed into the store, idempotently (the ledger writes
one row per key; a spooled row is deleted only once the store has it), by the next record that
succeeds in any process using that spool, by every new process at its first record, and by
``byok ledger replay``.

While neither the store nor the spool can take a row, :meth:`DurableLedger.recording_down` is
true and the default resolution refuses platform-billed calls before they are sent (and BYOK
calls too, unless ``BYOK_ALLOW_UNRECORDED_BYOK=1``): spend stops when recording stops.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from byok_hookspecs import (
    ByokError,
    Charge,
    CredentialSource,
    RecordedCall,
    Usage,
    UsageRecord,
    called_inline,
)

from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.store.engine import BUSY_TIMEOUT_MS, store_busy

__all__ = [
    "DurableLedger",
    "LedgerSpool",
    "RecordingDown",
    "ReplayResult",
    "SpoolUnavailable",
    "record_from_json",
    "record_to_json",
]

log = logging.getLogger("byok.ledger")

#: how often a process whose recording is down tries the spool again (at most)
PROBE_SECONDS = 1.0
#: how often a process looks for rows another process spooled (at most), after a record
CHECK_SECONDS = 5.0
#: rows replayed per batch (one store write and one spool delete each)
REPLAY_BATCH = 200


class SpoolUnavailable(ByokError):
    """The local spool could not take a record either; the message names the file."""


class RecordingDown(ByokError):
    """A call refused before it was sent: its usage could be recorded neither in the store nor
    in the local spool."""


# --- a record as JSON, without loss ----------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, CredentialSource):
        return value.value
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "$decimal" in value:
            return Decimal(value["$decimal"])
        if "$datetime" in value:
            return datetime.fromisoformat(value["$datetime"])
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: _encode(getattr(obj, f.name)) for f in fields(obj)}


def record_to_json(record: UsageRecord) -> str:
    """Every field of ``record`` (and of its usage and charge) as JSON; money as decimal text."""
    doc = _fields(record)
    doc["usage"] = _fields(record.usage)
    doc["charge"] = _fields(record.charge)
    return json.dumps(doc, sort_keys=True)


def record_from_json(text: str) -> UsageRecord:
    """The record :func:`record_to_json` wrote, equal to the original."""
    doc = json.loads(text)
    usage = Usage(**{k: _decode(v) for k, v in doc.pop("usage").items()})
    charge = Charge(**{k: _decode(v) for k, v in doc.pop("charge").items()})
    values = {k: _decode(v) for k, v in doc.items()}
    values["source"] = CredentialSource(values["source"])
    return UsageRecord(usage=usage, charge=charge, **values)


# --- the spool file ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What one replay did: rows the store took, rows it already had, rows still spooled."""

    replayed: int
    already_recorded: int
    remaining: int
    error: str | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spooled_usage (
    idempotency_key TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    record TEXT NOT NULL,
    spooled_at REAL NOT NULL,
    cause TEXT NOT NULL
)
"""


class LedgerSpool:
    """The spool file: ``add`` (fsynced before it returns), ``pending``, ``replay_into``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"LedgerSpool({str(self.path)!r})"

    @contextmanager
    def _connect(self, what: str) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = None
        try:
            if not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, mode=0o700)
            if not self.path.exists():
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.close(fd)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
            conn.isolation_level = None
            conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
            conn.execute(_SCHEMA)
            yield conn
        except (sqlite3.Error, OSError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SpoolUnavailable(
                f"the local ledger spool {self.path} could not be used while {what}: "
                f"{type(exc).__name__}: {detail}"
            ) from None
        finally:
            if conn is not None:
                conn.close()

    def exists(self) -> bool:
        return self.path.is_file()

    def add(self, record: UsageRecord, cause: str) -> bool:
        """Keep ``record`` (``False`` when its key is already spooled); on disk when it returns.

        :raises SpoolUnavailable: the file cannot be written.
        """
        with self._connect(f"spooling {record.idempotency_key}") as conn:
            cursor = conn.execute(
                "INSERT INTO spooled_usage VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (idempotency_key) DO NOTHING",
                (
                    record.idempotency_key,
                    record.workspace_id,
                    record_to_json(record),
                    time.time(),
                    cause[:500],
                ),
            )
            return cursor.rowcount == 1

    def probe(self) -> None:
        """Take and release the spool's write lock.

        :raises SpoolUnavailable: the file cannot be written.
        """
        with self._connect("checking it can be written") as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM spooled_usage WHERE 0")
            conn.execute("COMMIT")

    def pending(self) -> int:
        """Rows spooled and not yet in the store (0 when there is no spool file)."""
        if not self.exists():
            return 0
        with self._connect("counting its rows") as conn:
            return int(conn.execute("SELECT count(*) FROM spooled_usage").fetchone()[0])

    def records(self) -> list[UsageRecord]:
        """Every spooled record, oldest first."""
        if not self.exists():
            return []
        with self._connect("reading it") as conn:
            rows = conn.execute("SELECT record FROM spooled_usage ORDER BY spooled_at").fetchall()
        return [record_from_json(text) for (text,) in rows]

    def recorded_calls(self, run_id: str) -> tuple[RecordedCall, ...]:
        """The spooled calls of ``run_id`` (of any workspace), oldest first: recorded, not yet in
        the store (a run id with calls here is as used as one with calls in the ledger)."""
        return tuple(
            RecordedCall(
                idempotency_key=r.idempotency_key,
                workspace_id=r.workspace_id,
                block_id=r.block_id,
                attempt=r.attempt,
            )
            for r in self.records()
            if r.run_id == run_id
        )

    def replay_into(self, write: Callable[[UsageRecord], bool]) -> ReplayResult:
        """Write every spooled record with ``write`` (``True`` for a new ledger row, ``False``
        for a key already there), deleting each once written. Stops at the first error, which
        it returns: the rows not written stay spooled."""
        replayed = already = 0
        if not self.exists():
            return ReplayResult(0, 0, 0)
        with self._connect("replaying it") as conn:
            while True:
                rows = conn.execute(
                    "SELECT idempotency_key, record FROM spooled_usage ORDER BY spooled_at LIMIT ?",
                    (REPLAY_BATCH,),
                ).fetchall()
                if not rows:
                    return ReplayResult(replayed, already, 0)
                for key, text in rows:
                    try:
                        new = write(record_from_json(text))
                    except Exception as exc:
                        remaining = int(
                            conn.execute("SELECT count(*) FROM spooled_usage").fetchone()[0]
                        )
                        return ReplayResult(
                            replayed, already, remaining, f"{type(exc).__name__}: {exc}"
                        )
                    conn.execute("DELETE FROM spooled_usage WHERE idempotency_key = ?", (key,))
                    if new:
                        replayed += 1
                    else:
                        already += 1


# --- the store, with the spool behind it -------------------------------------------------------


class DurableLedger:
    """``record(record)``: into the store, else into the spool; never lost once it returns.

    :param write: the store's write (:meth:`byok_plugin.billing.ledger.Ledger.record`).
    :param spool: where records the store refused are kept.
    :param clock: a monotonic clock (probe and check intervals).
    """

    def __init__(
        self,
        write: Callable[[UsageRecord], bool],
        spool: LedgerSpool,
        *,
        clock: Callable[[], float] = time.monotonic,
        background: Callable[[Callable[[], object], str], None] | None = None,
        write_many: Callable[[Sequence[UsageRecord]], int] | None = None,
    ) -> None:
        """:param background: runs a replay off an event loop's thread
        (:meth:`byok_plugin.resolution.background_writes.BackgroundWrites.submit`); without it, a record
        made on an event loop never replays.
        :param write_many: the store's write of several records in one transaction
        (:meth:`byok_plugin.billing.ledger.Ledger.record_many`), for :meth:`record_many`."""
        self._write = write
        self._write_many = write_many
        self._background = background
        self.spool = spool
        self._clock = clock
        self._replaying = threading.Lock()
        self._state = threading.Lock()
        # when the spool could not take a row either (None: recording works), and last probed
        self._down_since: float | None = None
        self._probed_at = 0.0
        # when this process last looked for spooled rows (-inf: at its first record)
        self._checked_at = float("-inf")
        self._spooled_here = False
        #: rows this instance spooled, and replayed into the store (for reports and load tests)
        self.spooled = 0
        self.replayed = 0

    def __repr__(self) -> str:
        return f"DurableLedger(spool={self.spool!r}, down={self._down_since is not None})"

    def record(self, record: UsageRecord) -> bool:
        """Write ``record`` to the store; when the store refuses it, to the spool.

        :returns: ``True`` for a new ledger row or a newly spooled one.
        :raises StoreUnavailable: on an event loop's thread, a store locked by another writer
            (the host retries off the loop, where the write may wait and spooling is decided).
        :raises SpoolUnavailable: neither the store nor the spool took it (the call's usage is
            in the caller's hands only; platform-billed calls are refused from now on).
        """
        try:
            inserted = self._write(record)
        except StoreUnavailable as exc:
            if called_inline() and store_busy(exc):
                raise
            return self._spool(record, exc)
        self._recovered()
        self._replay_if_due()
        return inserted

    def record_many(self, records: Sequence[UsageRecord]) -> int:
        """Write ``records`` to the store in one transaction; when the store refuses it (or on an
        event loop's thread), each record as :meth:`record` does (into the store, else into the
        spool).

        :returns: how many rows (or spooled rows) were new.
        :raises SpoolUnavailable: some record was taken by neither (the first such error, once
            every record was tried): those records' usage is in the caller's hands.
        """
        # on an event loop's thread, row by row: each write then gives up at once on a lock
        if self._write_many is not None and not called_inline():
            try:
                written = self._write_many(records)
            except StoreUnavailable as exc:
                log.warning(
                    "the group commit of %d usage rows failed (%s); writing them one by one",
                    len(records),
                    exc,
                )
            else:
                self._recovered()
                self._replay_if_due()
                return written
        added, failure = 0, None
        for record in records:  # one by one: a row the store refuses goes to the spool
            try:
                added += bool(self.record(record))
            except (StoreUnavailable, SpoolUnavailable) as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return added

    def _spool(self, record: UsageRecord, cause: StoreUnavailable) -> bool:
        try:
            added = self.spool.add(record, str(cause))
        except SpoolUnavailable as exc:
            with self._state:
                if self._down_since is None:
                    self._down_since = self._clock()
                self._probed_at = self._clock()
            log.error(
                "the completed %s call %s of workspace %r could not be recorded: %s; and %s",
                record.usage.provider,
                record.idempotency_key,
                record.workspace_id,
                cause,
                exc,
            )
            raise SpoolUnavailable(f"{cause}; and {exc}") from None
        self._spooled_here = True
        self.spooled += added
        self._recovered()
        log.warning(
            "usage %s of workspace %r kept in the local spool %s: %s",
            record.idempotency_key,
            record.workspace_id,
            self.spool.path,
            cause,
        )
        return added

    def stored(self) -> None:
        """A record the store took by another way than :meth:`record` (its row and its budget
        settlement in one transaction): what :meth:`record` does after a write, so that the
        spool is still replayed once the store answers again."""
        self._recovered()
        self._replay_if_due()

    def _recovered(self) -> None:
        if self._down_since is not None:
            with self._state:
                self._down_since = None

    def recording_down(self) -> bool:
        """Whether the last record could be written neither to the store nor to the spool (the
        spool is tried again at most every :data:`PROBE_SECONDS`)."""
        if self._down_since is None:
            return False
        with self._state:
            if self._down_since is None or self._clock() - self._probed_at < PROBE_SECONDS:
                return self._down_since is not None
            self._probed_at = self._clock()
        try:
            self.spool.probe()
        except SpoolUnavailable:
            return True
        self._recovered()
        return False

    def _replay_if_due(self) -> None:
        """After a record the store took: replay the spool, when this process spooled rows or
        has not looked for a while (never on an event loop's thread: it may take long)."""
        now = self._clock()
        if not self._spooled_here and now - self._checked_at < CHECK_SECONDS:
            return
        self._checked_at = now
        if not self._spooled_here and not self.spool.exists():
            return
        if not called_inline():
            self.replay()
        elif self._background is not None:
            self._background(self.replay, "replaying the local ledger spool")

    def replay(self) -> ReplayResult:
        """Write the spooled rows to the store (one replay at a time in this process; another
        process replaying the same rows at once is harmless: the ledger is idempotent)."""
        if not self._replaying.acquire(blocking=False):
            return ReplayResult(0, 0, -1, "a replay is already running in this process")
        try:
            result = self.spool.replay_into(self._write)
        except SpoolUnavailable as exc:
            return ReplayResult(0, 0, -1, str(exc))
        finally:
            self._replaying.release()
        self.replayed += result.replayed
        if result.error is None:
            self._spooled_here = False
        if result.replayed or result.already_recorded:
            log.warning(
                "replayed %d spooled usage rows into the store (%d were already there), "
                "%d still spooled",
                result.replayed,
                result.already_recorded,
                result.remaining,
            )
        return result
