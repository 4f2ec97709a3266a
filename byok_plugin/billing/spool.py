"""The local ledger spool: usage the store could not take, kept on this machine until it can.

A provider call that completed has cost money; its usage must not be lost because the store
(PostgreSQL restarting, a full disk, a read-only SQLite file) refused the row. When
:class:`DurableLedger` cannot write a record to the store, it writes it to a SQLite file in
``BYOK_HOME`` (``BYOK_LEDGER_SPOOL``) whose every commit is fsynced (``synchronous = FULL``), one
row per idempotency key. The spool is replayed into the store, idempotently (the ledger writes
one row per key; a spooled row is deleted only once the store has it), by the next record that
succeeds in any process using that spool, by every new process at its first record, and by
``byok ledger replay``.

A row the store refuses for the row's own sake (:func:`row_refused`: a NUL character PostgreSQL
cannot store, a number out of its column's range...) would fail at every replay; it is *held*:
moved aside in the spool (the ``held_usage`` table, with the store's error), listed by ``byok
ledger spool``, tried again only on request (``byok ledger replay --retry-held``), never deleted.
The replay goes on with the other rows. A row that fails because the store is down
(:class:`~byok_plugin.core.errors.StoreUnavailable`) still stops the replay: the rows wait.

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
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from byok_hookspecs import (
    ByokError,
    Charge,
    CredentialSource,
    RecordedCall,
    Usage,
    UsageRecord,
    called_inline,
)

from byok_plugin.core.errors import StoreRefusedValue, StoreUnavailable
from byok_plugin.store.engine import BUSY_TIMEOUT_MS, store_busy, unstorable_text

__all__ = [
    "DurableLedger",
    "HeldRow",
    "LedgerSpool",
    "RecordingDown",
    "ReplayResult",
    "SpoolUnavailable",
    "record_from_json",
    "record_to_json",
    "refused_fields",
    "row_refused",
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


# --- a row the store refuses for its own sake ----------------------------------------------------

_INT64 = range(-(2**63), 2**63)


def row_refused(error: BaseException) -> bool:
    """Whether writing a record failed for the record's own sake, so that writing it again
    fails again: the store refused one of its values (:class:`StoreRefusedValue`), a constraint
    (``IntegrityError``), the driver could not send a value (a lone surrogate:
    ``UnicodeEncodeError``; an integer too large for SQLite: ``OverflowError``), or the record
    is not valid (``ValueError``). Not a store that is down (:class:`StoreUnavailable`)."""
    if isinstance(error, StoreUnavailable):
        return False
    return isinstance(error, ValueError | OverflowError | sa.exc.IntegrityError)


def refused_fields(record: UsageRecord) -> tuple[str, ...]:
    """The ledger columns of ``record`` whose value no store takes: a text with a NUL character
    or a lone surrogate, or longer than its column, an integer beyond 64 bits."""
    from byok_plugin.billing.ledger import Ledger, usage_ledger

    found = []
    for name, value in Ledger.values(record, record.occurred_at).items():
        if isinstance(value, str):
            length = getattr(usage_ledger.c[name].type, "length", None)
            if unstorable_text(value) or (length is not None and len(value) > length):
                found.append(name)
        elif isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
            found.append(name)
    return tuple(found)


def _refusal(record: UsageRecord, error: BaseException) -> StoreRefusedValue:
    """``error`` (the store or its driver refusing a value of ``record``) as a
    :class:`StoreRefusedValue` naming the record, its workspace and the field."""
    if isinstance(error, StoreRefusedValue):
        field, cause = error.field, error.cause
    else:
        first_line = (str(error).strip().splitlines() or [""])[0]
        field, cause = None, f"{type(error).__name__}: {first_line[:300]}"
    return StoreRefusedValue(
        f"recording usage {_safe(record.idempotency_key)}",
        workspace_id=_safe(record.workspace_id),
        field=field or ", ".join(refused_fields(record)) or None,
        cause=cause,
    )


def _safe(text: str) -> str:
    """``text`` as SQLite and UTF-8 take it (a lone surrogate escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- the spool file ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What one replay did: rows the store took, rows it already had, rows still spooled."""

    replayed: int
    already_recorded: int
    remaining: int
    error: str | None = None
    #: rows this replay set aside, held: the store refused them for their own sake
    held: int = 0


@dataclass(frozen=True, slots=True)
class HeldRow:
    """A spooled row the store refused for its own sake, kept aside with the store's error."""

    idempotency_key: str
    workspace_id: str
    error: str
    held_at: datetime


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spooled_usage (
    idempotency_key TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    record TEXT NOT NULL,
    spooled_at REAL NOT NULL,
    cause TEXT NOT NULL
)
"""
_HELD_SCHEMA = """
CREATE TABLE IF NOT EXISTS held_usage (
    idempotency_key TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    record TEXT NOT NULL,
    spooled_at REAL NOT NULL,
    held_at REAL NOT NULL,
    error TEXT NOT NULL
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
            conn.execute(_HELD_SCHEMA)
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
                    _safe(record.idempotency_key),
                    _safe(record.workspace_id),
                    record_to_json(record),
                    time.time(),
                    _safe(cause[:500]),
                ),
            )
            return cursor.rowcount == 1

    def hold(self, record: UsageRecord, error: str) -> None:
        """Keep ``record``, which the store refused for its own sake, aside with ``error`` (as a
        replay holds a spooled row); on disk when it returns.

        :raises SpoolUnavailable: the file cannot be written.
        """
        with self._connect(f"holding {_safe(record.idempotency_key)}") as conn:
            now = time.time()
            conn.execute(
                "INSERT OR REPLACE INTO held_usage VALUES (?, ?, ?, ?, ?, ?)",
                (
                    _safe(record.idempotency_key),
                    _safe(record.workspace_id),
                    record_to_json(record),
                    now,
                    now,
                    _safe(error[:1000]),
                ),
            )

    def held(self) -> list[HeldRow]:
        """The rows held aside (the store refused them), oldest first."""
        if not self.exists():
            return []
        with self._connect("reading its held rows") as conn:
            rows = conn.execute(
                "SELECT idempotency_key, workspace_id, error, held_at FROM held_usage "
                "ORDER BY held_at"
            ).fetchall()
        return [
            HeldRow(key, ws, error, datetime.fromtimestamp(at, UTC)) for key, ws, error, at in rows
        ]

    def retry_held(self) -> int:
        """Put the held rows back among the spooled ones, for the next replay to try again (once
        what made the store refuse them is fixed). :returns: how many."""
        if not self.exists():
            return 0
        with self._connect("releasing its held rows") as conn:
            conn.execute("BEGIN IMMEDIATE")
            moved = conn.execute(
                "INSERT OR IGNORE INTO spooled_usage "
                "SELECT idempotency_key, workspace_id, record, spooled_at, error FROM held_usage"
            ).rowcount
            conn.execute("DELETE FROM held_usage")
            conn.execute("COMMIT")
        return int(moved)

    def probe(self) -> None:
        """Take and release the spool's write lock.

        :raises SpoolUnavailable: the file cannot be written.
        """
        with self._connect("checking it can be written") as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM spooled_usage WHERE 0")
            conn.execute("COMMIT")

    def pending(self) -> int:
        """Rows spooled and not yet in the store, held rows apart (0 when there is no spool
        file)."""
        if not self.exists():
            return 0
        with self._connect("counting its rows") as conn:
            return int(conn.execute("SELECT count(*) FROM spooled_usage").fetchone()[0])

    def records(self) -> list[UsageRecord]:
        """Every spooled record, held ones included, oldest first (a held row that is not a
        record any more is left out: ``byok ledger spool`` lists it)."""
        if not self.exists():
            return []
        with self._connect("reading it") as conn:
            rows = conn.execute(
                "SELECT record FROM (SELECT record, spooled_at FROM spooled_usage "
                "UNION ALL SELECT record, spooled_at FROM held_usage) ORDER BY spooled_at"
            ).fetchall()
        records = []
        for (text,) in rows:
            try:
                records.append(record_from_json(text))
            except Exception:  # noqa: S112 (held already, with its error)
                continue
        return records

    def recorded_calls(self, run_id: str) -> tuple[RecordedCall, ...]:
        """The spooled calls of ``run_id`` (of any workspace, held ones included), oldest first:
        recorded, not yet in the store (a run id with calls here is as used as one with calls in
        the ledger)."""
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
        for a key already there), deleting each once written. A record the store refuses for
        its own sake (:func:`row_refused`) is held aside, and the replay goes on. Stops at any
        other error (the store down), which it returns: the rows not written stay spooled."""
        replayed = already = held = 0
        if not self.exists():
            return ReplayResult(0, 0, 0)
        with self._connect("replaying it") as conn:
            while True:
                rows = conn.execute(
                    "SELECT idempotency_key, record FROM spooled_usage ORDER BY spooled_at LIMIT ?",
                    (REPLAY_BATCH,),
                ).fetchall()
                if not rows:
                    return ReplayResult(replayed, already, 0, held=held)
                for key, text in rows:
                    try:
                        record = record_from_json(text)
                    except Exception as exc:  # not a record (any more): never one to write
                        self._hold_spooled(
                            conn, key, f"the spooled row is not a usage record: {exc!r}"[:1000]
                        )
                        held += 1
                        continue
                    try:
                        new = write(record)
                    except Exception as exc:
                        if row_refused(exc):
                            self._hold_spooled(conn, key, str(_refusal(record, exc)))
                            held += 1
                            continue
                        remaining = int(
                            conn.execute("SELECT count(*) FROM spooled_usage").fetchone()[0]
                        )
                        return ReplayResult(
                            replayed, already, remaining, f"{type(exc).__name__}: {exc}", held
                        )
                    conn.execute("DELETE FROM spooled_usage WHERE idempotency_key = ?", (key,))
                    if new:
                        replayed += 1
                    else:
                        already += 1

    @staticmethod
    def _hold_spooled(conn: sqlite3.Connection, key: str, error: str) -> None:
        """Move the spooled row ``key`` to the held rows, with ``error`` (one transaction)."""
        log.error("the spooled usage row %s is held aside: %s", key, error)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT OR REPLACE INTO held_usage SELECT idempotency_key, workspace_id, record, "
            "spooled_at, ?, ? FROM spooled_usage WHERE idempotency_key = ?",
            (time.time(), _safe(error[:1000]), key),
        )
        conn.execute("DELETE FROM spooled_usage WHERE idempotency_key = ?", (key,))
        conn.execute("COMMIT")


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
        settle: Callable[[UsageRecord], object] | None = None,
    ) -> None:
        """:param background: runs a replay off an event loop's thread
        (:meth:`byok_plugin.resolution.background_writes.BackgroundWrites.submit`); without it, a record
        made on an event loop never replays.
        :param write_many: the store's write of several records in one transaction
        (:meth:`byok_plugin.billing.ledger.Ledger.record_many`), for :meth:`record_many`.
        :param settle: settles the budget hold of a record a replay wrote (idempotent): the call
        ran while the store was down, so its settlement most likely failed too, and its hold
        would lapse without spending what the call cost."""
        self._write = write
        self._write_many = write_many
        self._settle = settle
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
        :raises StoreRefusedValue: the store (or its driver) refused a value of the record (a
            NUL character, a number out of range...): not spooled, since it would fail again,
            but held aside in the spool (``byok ledger spool`` lists it); the message names the
            workspace and the field.
        """
        try:
            inserted = self._write(record)
        except StoreUnavailable as exc:
            if called_inline() and store_busy(exc):
                raise
            return self._spool(record, exc)
        except (StoreRefusedValue, UnicodeEncodeError, OverflowError) as exc:
            raise self._refused(record, exc) from None
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
        :raises StoreRefusedValue: the store refused a value of some record (as :meth:`record`),
            once every other record was written.
        """
        # on an event loop's thread, row by row: each write then gives up at once on a lock
        if self._write_many is not None and not called_inline():
            try:
                written = self._write_many(records)
            except (StoreUnavailable, StoreRefusedValue, UnicodeEncodeError, OverflowError) as exc:
                # (a value one record holds fails the group: the others are still written)
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
            except (StoreUnavailable, SpoolUnavailable, StoreRefusedValue) as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return added

    def _refused(self, record: UsageRecord, error: BaseException) -> StoreRefusedValue:
        """The error to raise for ``record``, which the store refused for its own sake, once it
        is held aside in the spool (when the spool can take it)."""
        refusal = _refusal(record, error)
        try:
            self.spool.hold(record, str(refusal))
        except SpoolUnavailable as exc:
            log.error("%s; and it could not be held aside: %s", refusal, exc)
            return refusal
        log.error("%s; the row is held aside in %s", refusal, self.spool.path)
        return refusal

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

    def _write_replayed(self, record: UsageRecord) -> bool:
        """A spooled record into the store, then its budget hold settled (a settlement that
        fails is logged: the hold then lapses, as it would have)."""
        new = self._write(record)
        if self._settle is not None:
            try:
                self._settle(record)
            except Exception as exc:
                log.warning(
                    "the budget hold of replayed call %s of workspace %r is not settled (it "
                    "lapses at its expiry): %s: %s",
                    record.idempotency_key,
                    record.workspace_id,
                    type(exc).__name__,
                    exc,
                )
        return new

    def replay(self) -> ReplayResult:
        """Write the spooled rows to the store (one replay at a time in this process; another
        process replaying the same rows at once is harmless: the ledger is idempotent)."""
        if not self._replaying.acquire(blocking=False):
            return ReplayResult(0, 0, -1, "a replay is already running in this process")
        try:
            result = self.spool.replay_into(self._write_replayed)
        except SpoolUnavailable as exc:
            # unreadable (damaged pages, not SQLite): its rows may be the only trace of completed
            # calls, so this is said loudly, not only to whoever asked for the replay
            log.error("the local ledger spool could not be replayed: %s", exc)
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
