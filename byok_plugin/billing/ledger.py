"""The usage ledger: one row per provider call, written once per idempotency key.

What ``byok_record_usage`` writes by default, and the source of truth for billing: who (workspace,
workflow, run, block, attempt), what (provider, model, every token count, tool requests, the cost
the provider reported), which credential source and key served it (and whether it was a
fallback), what it cost at list price, what the workspace was charged and why, under which
price-table version, and when.

Idempotency: ``INSERT ... ON CONFLICT (idempotency_key) DO NOTHING`` (SQLAlchemy's SQLite and
PostgreSQL dialect inserts), so a retried block, a host that records twice, or several processes
racing on the same key leave exactly one row. A key already recorded for another workspace is
refused (:class:`StoreRefusedValue`, field ``idempotency_key``), read back only when an insert
found its key taken: another tenant's row is never taken for this call's. Money is stored exactly: ``NUMERIC(30, 12)`` on
PostgreSQL, and the decimal's text on SQLite (whose numbers are binary floats).

**Speed.** On a SQLite file, a record is one ``INSERT ... ON CONFLICT (idempotency_key) DO
NOTHING`` in autocommit mode on a ``sqlite3`` connection the calling thread borrows (a statement that
writes takes the write lock when it starts, as ``BEGIN IMMEDIATE`` does, and waits for it with
the busy timeout; the row is committed when the statement returns). Going through SQLAlchemy
(pooled connection, ``BEGIN``, the compiled insert, ``COMMIT``, result processing) cost about
three times as much per row (0.2-0.3 ms against 0.08 ms), and every extra driver call hands the
GIL back and forth, which hurts a host that records from worker threads. The values are
converted by the table's own SQLAlchemy bind processors, so the stored text is what a SQLAlchemy
insert would store; the connection has the store engine's pragmas (WAL, ``synchronous =
NORMAL``, busy timeout). On PostgreSQL a record is a group of one (:class:`_PostgresGroupInsert`):
one autocommitted statement on the pooled psycopg connection, one round trip where a SQLAlchemy
transaction took three (``BEGIN``, the insert, ``COMMIT``): 440-460 us of wall, 150-200 us of
client CPU and 140-170 us of the server's against 660-820, 300-420 and 205-250 us (loopback,
2-core Xeon, 2,000 records x 3). In-memory SQLite keeps the SQLAlchemy insert. A call that
holds a budget can have its row and its settlement committed together
(:meth:`Ledger.record_with`: ``BEGIN IMMEDIATE``, the insert, the settlement, ``COMMIT``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from byok_hookspecs import (
    USAGE_COUNTS,
    CredentialSource,
    RecordedCall,
    UsageRecord,
    called_inline,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine

from byok_plugin.billing.charges import money
from byok_plugin.core.errors import StoreRefusedValue, StoreUnavailable
from byok_plugin.keys.reader import sqlite_file_of
from byok_plugin.store.engine import (
    LockBackoff,
    is_disconnect,
    lock_backoff,
    refused_value,
    store_busy,
    store_errors,
    write_transaction,
)
from byok_plugin.store.sqlite_connections import SqliteWriters
from byok_plugin.store.tables import UTCDateTime, metadata

__all__ = ["ExactDecimal", "Ledger", "LedgerRow", "usage_ledger"]

MAX_IDEMPOTENCY_KEY = 255
_TOKEN_FIELDS = USAGE_COUNTS


class ExactDecimal(sa.TypeDecorator[Decimal]):
    """A Decimal stored without loss: NUMERIC(30, 12), or its text on SQLite.

    Values are kept to 12 decimal places (:func:`byok_plugin.billing.charges.money`); what is read back
    equals what was written.
    """

    impl = sa.Numeric(30, 12)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.String(64))
        return dialect.type_descriptor(sa.Numeric(30, 12, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal) or not value.is_finite():
            raise TypeError(f"money must be a finite Decimal, not {value!r}")
        value = money(value)
        return str(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(str(value))


_count = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

usage_ledger = sa.Table(
    "byok_usage_ledger",
    metadata,
    sa.Column("id", _count, primary_key=True, autoincrement=True),
    sa.Column("idempotency_key", sa.String(MAX_IDEMPOTENCY_KEY), nullable=False),
    sa.Column("workspace_id", sa.String(200), nullable=False),
    sa.Column("workflow_id", sa.String(200), nullable=True),
    sa.Column("run_id", sa.String(200), nullable=True),
    sa.Column("block_id", sa.String(200), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("provider", sa.String(40), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("key_id", sa.String(120), nullable=True),
    sa.Column("fallback", sa.Boolean, nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in _TOKEN_FIELDS),
    sa.Column("reported_cost", ExactDecimal, nullable=True),
    sa.Column("list_cost", ExactDecimal, nullable=True),
    sa.Column("amount", ExactDecimal, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("price_version", sa.String(200), nullable=True),
    # [["input", "0.0015"], ...]: the charge's breakdown, amounts as decimal text
    sa.Column("breakdown", sa.Text, nullable=False),
    # {"web_search": 2}: the provider's own tools the call used (revision 0004)
    sa.Column("tool_uses", sa.Text, nullable=False, server_default="{}"),
    # ["cache_write_1h", "tool:web_fetch"]: the parts of the call without a price (revision 0004)
    sa.Column("unpriced", sa.Text, nullable=False, server_default="[]"),
    # complete, interrupted or uncertain (UsageRecord.status; revision 0004)
    sa.Column("status", sa.String(16), nullable=False, server_default="complete"),
    # ["input_tokens"]: the counts estimated from the request (UsageRecord.estimated; rev. 0011)
    sa.Column("estimated", sa.Text, nullable=False, server_default="[]"),
    sa.Column("occurred_at", UTCDateTime, nullable=False),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("idempotency_key"),
    sa.CheckConstraint(
        "source IN ('block', 'workspace', 'organization', 'platform')", name="source"
    ),
    sa.Index(None, "workspace_id", "occurred_at"),
    sa.Index(None, "occurred_at"),
    sa.Index(None, "run_id"),  # byok_recorded_calls: what a run id already recorded
)


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One recorded provider call, as read back from the ledger."""

    id: int
    idempotency_key: str
    workspace_id: str
    workflow_id: str | None
    run_id: str | None
    block_id: str | None
    attempt: int
    provider: str
    model: str
    source: CredentialSource
    key_id: str | None
    fallback: bool
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    tool_requests: int
    reported_cost: Decimal | None
    list_cost: Decimal | None
    amount: Decimal
    currency: str
    reason: str
    price_version: str | None
    breakdown: tuple[tuple[str, Decimal], ...]
    occurred_at: datetime
    recorded_at: datetime
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    tool_uses: tuple[tuple[str, int], ...] = ()
    unpriced: tuple[str, ...] = ()
    status: str = "complete"
    estimated: tuple[str, ...] = ()

    @property
    def is_byok(self) -> bool:
        return self.source in (CredentialSource.WORKSPACE, CredentialSource.ORGANIZATION)


def _row(mapping: Any) -> LedgerRow:
    values = dict(mapping)
    values["source"] = CredentialSource(values["source"])
    values["fallback"] = bool(values["fallback"])
    values["breakdown"] = tuple(
        (str(item), Decimal(amount)) for item, amount in json.loads(values["breakdown"])
    )
    values["tool_uses"] = tuple(
        sorted((str(k), int(v)) for k, v in json.loads(values["tool_uses"]).items())
    )
    values["unpriced"] = tuple(str(item) for item in json.loads(values["unpriced"]))
    values["estimated"] = tuple(str(item) for item in json.loads(values["estimated"]))
    return LedgerRow(**values)


def _check(record: UsageRecord) -> None:
    key = record.idempotency_key
    if not isinstance(key, str) or not key.strip():
        raise ValueError("UsageRecord.idempotency_key must be a non-empty string")
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise ValueError(
            f"UsageRecord.idempotency_key is {len(key)} characters; at most "
            f"{MAX_IDEMPOTENCY_KEY} are stored (hash a longer key first)"
        )
    if not isinstance(record.charge.amount, Decimal):
        raise TypeError("UsageRecord.charge.amount must be a Decimal")
    if record.occurred_at.tzinfo is None:
        raise ValueError("UsageRecord.occurred_at must be an aware datetime")


def _key_of_another_workspace(workspace_id: str) -> StoreRefusedValue:
    """The refusal of a row whose idempotency key the ledger already holds for another workspace:
    taking that row as "already recorded" would leave the call unrecorded and uncharged (a host
    that builds keys from a caller's run id, say). The message names the row's own workspace,
    never the other one."""
    return StoreRefusedValue(
        "recording usage",
        workspace_id=workspace_id,
        field="idempotency_key",
        cause="the idempotency key is already recorded for another workspace",
    )


_OWNERS = sa.select(usage_ledger.c.idempotency_key, usage_ledger.c.workspace_id).where(
    usage_ledger.c.idempotency_key.in_(sa.bindparam("keys", expanding=True))
)


def _refuse_foreign(rows: Sequence[dict[str, Any]], owners: Iterable[Any]) -> None:
    """Refuse the first of ``rows`` whose key ``owners`` (``(key, workspace)`` pairs read back
    from the ledger) holds for another workspace (:func:`_key_of_another_workspace`)."""
    owner = dict(owners)
    for row in rows:
        found = owner.get(row["idempotency_key"])
        if found is not None and found != row["workspace_id"]:
            raise _key_of_another_workspace(str(row["workspace_id"]))


class SqliteLedgerWriter:
    """``writer(values) -> bool``: one autocommit ``INSERT ... ON CONFLICT DO NOTHING`` on a
    borrowed ``sqlite3`` connection; ``False`` when the key was already recorded."""

    def __init__(
        self,
        path: Path,
        dialect: Dialect,
        backoff: LockBackoff | None = None,
        writers: SqliteWriters | None = None,
    ) -> None:
        """:param backoff: the store's memory of being found locked (shared with its other
        writers), so that inline hook calls give up at once for a moment after one wait.
        :param writers: the connections to borrow, shared with the store's other direct writers
        (the budgets); by default the writer's own."""
        self._path = str(path)
        columns = [c for c in usage_ledger.c if c.name != "id"]
        self._names = tuple(c.name for c in columns)
        # the bind processors of the table's own types: the same text as a SQLAlchemy insert
        self._processors = tuple(
            (i, processor)
            for i, c in enumerate(columns)
            if (processor := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        )
        self._sql = (
            f"INSERT INTO {usage_ledger.name} ({', '.join(self._names)}) "  # noqa: S608 (names from the table)
            f"VALUES ({', '.join('?' * len(self._names))}) "
            "ON CONFLICT (idempotency_key) DO NOTHING"
        )
        # connections borrowed per record (autocommit: each INSERT is its own transaction): no
        # more than records that ran at once, whatever threads made them; those lent on an event
        # loop's thread wait LOOP_LOCK_WAIT_MS at most for another writer's lock
        self._owns_writers = writers is None
        self._writers = writers if writers is not None else SqliteWriters(self._path)
        self._backoff = backoff if backoff is not None else LockBackoff()

    def __repr__(self) -> str:
        return f"SqliteLedgerWriter(connections={self.open_connections})"

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    def __call__(
        self, values: dict[str, Any], also: Callable[[sqlite3.Connection], object] | None = None
    ) -> bool:
        """:param also: run on the same connection after the row, in one ``BEGIN IMMEDIATE``
        transaction with it (a budget settlement): both are committed, or neither."""
        row = [values[name] for name in self._names]
        for i, processor in self._processors:
            row[i] = processor(row[i])
        prompt = called_inline()
        if prompt and self._backoff.active:
            # locked a moment ago: do not make the event loop wait again, the host retries off it
            raise StoreUnavailable(
                "recording usage",
                workspace_id=values["workspace_id"],
                cause=str(self._backoff.refusal()),
            )
        pool = self._writers.pool(prompt)
        try:
            conn = pool.acquire()
            try:
                if also is None:
                    inserted = conn.execute(self._sql, row).rowcount == 1
                    if not inserted:
                        self._check_owner(conn, values)
                else:
                    inserted = self._together(conn, values, row, also)
            except sqlite3.Error as exc:
                if store_busy(exc) or isinstance(exc, sqlite3.IntegrityError):
                    pool.release(conn)
                else:  # read-only, I/O error, a stale schema: never lend this one again
                    pool.discard(conn)
                raise
            except BaseException:
                pool.release(conn)  # rolled back
                raise
            pool.release(conn)
            return inserted
        except sqlite3.IntegrityError as exc:  # as SQLAlchemy would raise it: the caller's to read
            raise sa.exc.IntegrityError(self._sql, None, exc) from None
        except sqlite3.Error as exc:
            if prompt and store_busy(exc):
                self._backoff.hit()
            first_line = (str(exc).strip().splitlines() or [""])[0]
            # a value SQLite refuses (a text or blob too big) is the row's own error: writing it
            # again fails again, so it is not the store being down
            error = StoreRefusedValue if refused_value(exc) else StoreUnavailable
            raise error(
                "recording usage",
                workspace_id=values["workspace_id"],
                cause=f"{type(exc).__name__}: {first_line[:300]}",
            ) from None

    def _together(
        self,
        conn: sqlite3.Connection,
        values: dict[str, Any],
        row: list[Any],
        also: Callable[[sqlite3.Connection], object],
    ) -> bool:
        conn.execute("BEGIN IMMEDIATE")
        try:
            inserted: bool = conn.execute(self._sql, row).rowcount == 1
            if not inserted:  # (before the settlement: another workspace's key settles nothing)
                self._check_owner(conn, values)
            also(conn)
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:  # never lend it on with a transaction open
                conn.execute("ROLLBACK")
        return inserted

    @staticmethod
    def _check_owner(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
        """A row not inserted: its key is recorded already, for its workspace or another's."""
        owners = conn.execute(
            f"SELECT idempotency_key, workspace_id FROM {usage_ledger.name} "  # noqa: S608
            "WHERE idempotency_key = ?",
            (values["idempotency_key"],),
        ).fetchall()
        _refuse_foreign([values], owners)

    def close(self) -> None:
        """Close the connections, if they are the writer's own (the next record opens a new
        one)."""
        if self._owns_writers:
            self._writers.close()


class _PostgresGroupInsert:
    """``insert(conn, rows) -> new rows``: a group of ledger rows as one PostgreSQL statement
    whose text and parameters do not depend on the group's size: ``INSERT ... SELECT ... FROM
    json_populate_recordset(NULL::byok_usage_ledger, <the rows as one JSON text>) ON CONFLICT
    (idempotency_key) DO NOTHING RETURNING id``.

    A multi-row ``VALUES`` list (SQLAlchemy's "insertmanyvalues") has a new text for every group
    size, too long for psycopg's query cache: psycopg parsed it again for every group (0.46 ms of
    a 3-row group's 0.68 ms of CPU, profiled); one array parameter per column costs psycopg's
    array dumpers about as much. This text is parsed once and prepared by the server after a few
    uses, and its one parameter is a string. Each value is what the columns' own bind processors
    make of it, written as JSON text (numbers as decimal text, times in ISO 8601 with their
    offset); the server reads it with each column's type and length, so a value too long for its
    column fails as a plain INSERT fails, and a decimal is not rounded through a float."""

    def __init__(self, dialect: Dialect) -> None:
        columns = [c for c in usage_ledger.c if c.name != "id"]
        self._names = tuple(c.name for c in columns)
        self._processors = tuple(
            (c.name, processor)
            for c in columns
            if (processor := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        )
        names = ", ".join(self._names)
        self._sql = (
            f"INSERT INTO {usage_ledger.name} ({names}) "  # noqa: S608 (names from the table)
            f"SELECT {names} FROM json_populate_recordset(NULL::{usage_ledger.name}, %(rows)s) "
            "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
        )

    def _text(self, rows: Sequence[dict[str, Any]]) -> str:
        group = []
        for row in rows:
            values = {name: row[name] for name in self._names}
            for name, processor in self._processors:
                values[name] = processor(values[name])
            group.append(values)
        return json.dumps(group, default=_json_value, separators=(",", ":"))

    def __call__(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
        """The group in ``conn``'s transaction (with the group's budget settlements)."""
        return len(conn.exec_driver_sql(self._sql, {"rows": self._text(rows)}).all())

    def autocommitted(self, engine: Engine, rows: Sequence[dict[str, Any]]) -> int:
        """The group as one autocommitted statement on a pooled connection's own psycopg
        connection: one round trip, without SQLAlchemy's connection, execution context and
        result around it (70-90 us of the writer thread's CPU per group of two, 35 %; the
        statement and its answer are the same). Errors are SQLAlchemy's, as from
        :meth:`__call__` (an ``IntegrityError`` passes through :func:`store_errors`), and a
        connection the error left unusable (lost, or stuck waiting for an answer) is dropped
        from the pool, as SQLAlchemy drops it."""
        from psycopg.pq import TransactionStatus

        text = self._text(rows)
        dialect = engine.dialect
        try:
            pooled = engine.raw_connection()  # the pool's checkout: the idle ping, if due
        except dialect.loaded_dbapi.Error as exc:  # no connection: as SQLAlchemy wraps it
            raise sa.exc.DBAPIError.instance(
                None, None, exc, dialect.loaded_dbapi.Error, dialect=dialect
            ) from None
        try:
            conn: Any = pooled.driver_connection  # a psycopg.Connection
            try:
                conn.autocommit = True  # client-side only: the pool lends an idle connection
                inserted = len(conn.execute(self._sql, {"rows": text}).fetchall())
            except BaseException as exc:
                usable = (
                    not conn.closed
                    and conn.info.transaction_status == TransactionStatus.IDLE
                    and not is_disconnect(dialect, exc, conn)
                )
                if usable:
                    conn.autocommit = False
                else:  # lost, or mid-protocol: never lend it again
                    pooled.invalidate(exc if isinstance(exc, Exception) else None)
                if isinstance(exc, dialect.loaded_dbapi.Error):
                    raise sa.exc.DBAPIError.instance(
                        self._sql,
                        None,
                        exc,
                        dialect.loaded_dbapi.Error,
                        hide_parameters=True,
                        connection_invalidated=not usable,
                        dialect=dialect,
                    ) from None
                raise
            conn.autocommit = False  # as the pool lends it
            return inserted
        finally:
            pooled.close()  # back to the pool (or closed, when invalidated)


def _json_value(value: object) -> str:
    """A ledger value JSON has no type for, as the text PostgreSQL reads it from: a Decimal's
    exact digits, an aware datetime's ISO 8601 form (with its offset)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise TypeError("a ledger time must be aware")
        return value.isoformat()
    raise TypeError(f"a ledger value of type {type(value).__name__} has no JSON form")


class Ledger:
    """Writes and reads ``byok_usage_ledger``."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        writers: SqliteWriters | None = None,
    ) -> None:
        """:param writers: on a SQLite file, the connections the ledger's direct writer borrows,
        shared with the store's other writers (:class:`~byok_plugin.billing.budgets.BudgetStore`:
        see :mod:`byok_plugin.store.sqlite_connections`); by default its own."""
        self._engine = engine
        self._clock = clock
        dialect = engine.dialect.name
        if dialect == "postgresql":
            insert: Any = postgresql.insert(usage_ledger)
        elif dialect == "sqlite":
            insert = sqlite.insert(usage_ledger)
        else:  # pragma: no cover - other backends are not supported by the store
            raise ValueError(f"the ledger supports SQLite and PostgreSQL, not {dialect}")
        # RETURNING tells a new row from a conflict on every backend (PostgreSQL's rowcount for a
        # single-row insert is not reliable once SQLAlchemy adds its own RETURNING)
        self._insert = insert.on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(
            usage_ledger.c.id
        )
        self._group_insert = (
            _PostgresGroupInsert(engine.dialect) if dialect == "postgresql" else None
        )
        path = sqlite_file_of(engine)
        self._writer = (
            SqliteLedgerWriter(path, engine.dialect, lock_backoff(engine), writers)
            if path is not None
            else None
        )

    def __repr__(self) -> str:
        return f"Ledger(dialect={self._engine.dialect.name!r})"

    @staticmethod
    def values(record: UsageRecord, recorded_at: datetime) -> dict[str, Any]:
        usage, charge = record.usage, record.charge
        return {
            "idempotency_key": record.idempotency_key,
            "workspace_id": record.workspace_id,
            "workflow_id": record.workflow_id,
            "run_id": record.run_id,
            "block_id": record.block_id,
            "attempt": record.attempt,
            "provider": usage.provider,
            "model": usage.model,
            "source": CredentialSource(record.source).value,
            "key_id": record.key_id,
            "fallback": bool(record.fallback),
            **{name: getattr(usage, name) for name in _TOKEN_FIELDS},
            "reported_cost": usage.reported_cost,
            "list_cost": charge.list_cost,
            "amount": charge.amount,
            "currency": charge.currency,
            "reason": charge.reason,
            "price_version": charge.price_version,
            "breakdown": json.dumps([[item, str(amount)] for item, amount in charge.breakdown]),
            "tool_uses": json.dumps(dict(usage.tool_uses)),
            "unpriced": json.dumps(list(charge.unpriced)),
            "status": record.status,
            "estimated": json.dumps(list(record.estimated)),
            "occurred_at": record.occurred_at,
            "recorded_at": recorded_at,
        }

    def record(self, record: UsageRecord) -> bool:
        """Write one call; ``False`` when a row with its idempotency key already exists.

        :raises StoreUnavailable: the store did not answer (the host should retry: retrying is
            safe, the write is idempotent).
        """
        _check(record)
        values = self.values(record, self._clock())
        if self._writer is not None:
            return self._writer(values)
        if self._group_insert is not None:
            # PostgreSQL: a group of one, autocommitted: one round trip, where a transaction
            # took three (psycopg's BEGIN, the INSERT, COMMIT)
            with store_errors("recording usage", workspace_id=record.workspace_id):
                if self._group_insert.autocommitted(self._engine, [values]) == 1:
                    return True
            self._check_owners(None, [values])
            return False
        with (
            store_errors("recording usage", workspace_id=record.workspace_id),
            write_transaction(self._engine) as conn,
        ):
            inserted = conn.execute(self._insert, values).first()
            if inserted is None:
                self._check_owners(conn, [values])
        return inserted is not None

    def record_with(
        self, record: UsageRecord, also: Callable[[sqlite3.Connection], object]
    ) -> bool | None:
        """On a SQLite file, :meth:`record` and ``also`` on the same ``sqlite3`` connection, in
        one transaction (the call's budget settlement): both are committed, or neither.

        :returns: whether the row was new; ``None`` (nothing done) on another store.
        :raises StoreUnavailable: the store did not take the transaction (nothing written).
        """
        if self._writer is None:
            return None
        _check(record)
        return self._writer(self.values(record, self._clock()), also)

    def record_many(
        self, records: Sequence[UsageRecord], *, also: Callable[[Connection], object] | None = None
    ) -> int:
        """Write several calls in one transaction (a group commit: the calls that finished
        together); a key already recorded is skipped, as :meth:`record` skips it. ``also`` runs
        in the same transaction, after the rows (the group's budget settlements).

        :returns: how many rows were new.
        :raises StoreUnavailable: the store did not take the transaction: no row of it is
            written (the caller writes them one by one, and spools those the store refuses).
        """
        if not records:
            return 0
        if self._writer is not None and also is None and len(records) == 1:
            # a group of one (the runner's group commit when calls do not overlap): on SQLite,
            # the direct writer, as record() writes it, at a third of a SQLAlchemy
            # transaction's CPU; same row, same errors, same answer
            return int(self.record(records[0]))
        for record in records:
            _check(record)
        now = self._clock()
        rows = [self.values(record, now) for record in records]
        workspaces = sorted({record.workspace_id for record in records})
        what = store_errors("recording usage", workspace_id=",".join(workspaces)[:200])
        group = self._group_insert
        if group is not None and also is None:
            # one statement is atomic by itself: autocommitted, the group costs one round trip
            # (a transaction would add a BEGIN and a COMMIT of its own)
            with what:
                inserted = group.autocommitted(self._engine, rows)
            if inserted < len(rows):
                self._check_owners(None, rows)  # (the others' rows are written: they are theirs)
            return inserted
        with what, write_transaction(self._engine) as conn:
            # one statement for the group; RETURNING gives the rows that were new (a key
            # already recorded returns nothing)
            if group is not None:
                inserted = group(conn, rows)
            else:
                inserted = len(conn.execute(self._insert, rows).all())
            if inserted < len(rows):  # before the settlements: nothing of the group commits
                self._check_owners(conn, rows)
            if also is not None:
                also(conn)
        return inserted

    def _check_owners(self, conn: Connection | None, rows: Sequence[dict[str, Any]]) -> None:
        """Rows some of which were not inserted (their keys are recorded already): refuse them
        (:class:`StoreRefusedValue`) when a key is recorded for another workspace than the
        row's. Read in ``conn``'s transaction, or on a connection of its own."""
        keys = [row["idempotency_key"] for row in rows]
        workspaces = ",".join(sorted({row["workspace_id"] for row in rows}))[:200]
        with (
            store_errors("recording usage", workspace_id=workspaces),
            nullcontext(conn) if conn is not None else self._engine.connect() as reading,
        ):
            owners = reading.execute(_OWNERS, {"keys": keys}).all()
        _refuse_foreign(rows, owners)

    def close(self) -> None:
        """Release the direct SQLite writer's connections (the engine is its owner's to close)."""
        if self._writer is not None:
            self._writer.close()

    def get(self, idempotency_key: str) -> LedgerRow | None:
        query = sa.select(usage_ledger).where(usage_ledger.c.idempotency_key == idempotency_key)
        with store_errors("reading the ledger"), self._engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _row(row) if row is not None else None

    def rows(
        self,
        *,
        workspaces: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
        batch: int = 2000,
    ) -> Iterator[LedgerRow]:
        """The calls of the given workspaces (all when empty) with ``since <= occurred_at <
        until``, oldest first, read in batches."""
        t = usage_ledger
        query = sa.select(t)
        if workspaces:
            query = query.where(t.c.workspace_id.in_(list(workspaces)))
        if since is not None:
            query = query.where(t.c.occurred_at >= since)
        if until is not None:
            query = query.where(t.c.occurred_at < until)
        query = query.order_by(t.c.occurred_at, t.c.id)
        with store_errors("reading the ledger"), self._engine.connect() as conn:
            result = conn.execution_options(yield_per=batch).execute(query).mappings()
            for mapping in result:
                yield _row(mapping)

    def recorded_calls(self, run_id: str) -> tuple[RecordedCall, ...]:
        """The calls recorded under ``run_id``, of any workspace, oldest first."""
        t = usage_ledger
        query = (
            sa.select(t.c.idempotency_key, t.c.workspace_id, t.c.block_id, t.c.attempt)
            .where(t.c.run_id == run_id)
            .order_by(t.c.id)
        )
        with store_errors("reading the ledger"), self._engine.connect() as conn:
            return tuple(
                RecordedCall(
                    idempotency_key=row.idempotency_key,
                    workspace_id=row.workspace_id,
                    block_id=row.block_id,
                    attempt=row.attempt,
                )
                for row in conn.execute(query)
            )

    def count(self) -> int:
        with store_errors("counting the ledger"), self._engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(usage_ledger)).scalar_one()
            )
