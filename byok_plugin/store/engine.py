"""The SQLAlchemy engine of the key store: a SQLite file in WAL mode, or PostgreSQL via psycopg 3.

- ``postgresql://`` and ``postgres://`` URLs are read as ``postgresql+psycopg://`` (psycopg 3; the
  psycopg2 driver SQLAlchemy would pick by default is not a dependency).
- A SQLite file gets its directory created (mode 0700) and the file itself created with mode 0600
  before SQLite opens it; it runs in WAL mode with a busy timeout, and writers take the write lock
  when their transaction begins (``BEGIN IMMEDIATE``), so a read-then-write transaction never
  fails half-way with "database is locked".
- In a hook a host calls on its event loop (:func:`byok_hookspecs.called_inline`) a SQLite
  writer waits at most :data:`LOOP_LOCK_WAIT_MS` for another writer's lock
  (:func:`write_transaction`, the ledger's direct writer) instead of the usual 30 s, and fails
  with "database is locked": the work is retried off the loop, where waiting stalls nothing (the
  runner retries a record in a worker thread; audit events and cooldowns go to the app's
  background writer). Everything else (migrations, key management, an async host's own calls)
  waits as usual.
- A value the store refuses for its own sake (``DataError``: a NUL character, a lone surrogate,
  a number out of range, a text too long) surfaces as
  :class:`~byok_plugin.core.errors.StoreRefusedValue`, naming the field when the store says it;
  any other database error other than a constraint violation surfaces as
  :class:`~byok_plugin.core.errors.StoreUnavailable`, a ``CredentialUnavailable``: a store that
  does not answer is an error, never "no key".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from byok_hookspecs import called_inline
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url

from byok_plugin.core.errors import StoreRefusedValue, StoreUnavailable

__all__ = [
    "BUSY_BACKOFF_SECONDS",
    "BUSY_TIMEOUT_MS",
    "LOOP_LOCK_WAIT_MS",
    "LockBackoff",
    "PostgresOptions",
    "advisory_lock_key",
    "create_store_engine",
    "describe_url",
    "is_disconnect",
    "is_postgres",
    "lock_backoff",
    "normalize_url",
    "prepare_sqlite_connection",
    "read_connection",
    "refused_field",
    "refused_value",
    "retry_deadlocks",
    "store_busy",
    "store_errors",
    "write_transaction",
]

_SQLITE_BEGIN_OPTION = "byok_sqlite_begin"
#: how long a SQLite writer waits for another writer's lock: off an event loop, and on one
BUSY_TIMEOUT_MS = 30_000
LOOP_LOCK_WAIT_MS = 25
#: after a write in an inline hook call found the file locked, how long the next such writes
#: give up at once (one 25 ms wait per lock, not one per write)
BUSY_BACKOFF_SECONDS = 0.5


class LockBackoff:
    """One SQLite store's memory of being found locked by a write in an inline hook call."""

    def __init__(self) -> None:
        self._until = 0.0

    def __repr__(self) -> str:
        return f"LockBackoff(active={self.active})"

    @property
    def active(self) -> bool:
        return time.monotonic() < self._until

    def hit(self) -> None:
        self._until = time.monotonic() + BUSY_BACKOFF_SECONDS

    def refusal(self) -> sqlite3.OperationalError:
        return sqlite3.OperationalError("database is locked (by another writer, a moment ago)")


def lock_backoff(engine: Engine) -> LockBackoff | None:
    """The back-off of a SQLite store engine made by :func:`create_store_engine`."""
    return getattr(engine, "_byok_lock_backoff", None)


#: the first half of every PostgreSQL advisory lock key this package takes
LOCK_NAMESPACE = struct.unpack(">i", hashlib.sha256(b"byok-plugin").digest()[:4])[0]


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; plain PostgreSQL URLs get the psycopg 3 driver."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def describe_url(url: str | URL) -> str:
    """The URL with its password hidden, for messages."""
    return normalize_url(url).render_as_string(hide_password=True)


def is_postgres(bind: Engine | Connection) -> bool:
    return bind.dialect.name == "postgresql"


def _prepare_sqlite_file(database: str) -> None:
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process created it first
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _enable_wal(cursor: Any, timeout: float = 30.0) -> None:
    """Switch the database to WAL (persistent, so once per file), waiting out other openers.

    Changing the journal mode needs an exclusive lock, and SQLite answers "database is locked"
    at once, without its busy handler, when another connection is opening the same fresh file.
    """
    deadline = time.monotonic() + timeout
    while True:
        (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005 + random.random() * 0.02)  # noqa: S311 (jitter, not a secret)


def prepare_sqlite_connection(dbapi_connection: sqlite3.Connection) -> None:
    """The store's settings on a ``sqlite3`` connection: autocommit (``BEGIN`` is emitted by the
    caller), busy timeout, WAL, ``synchronous = NORMAL``, foreign keys. Used by the engine's
    connections and by the direct ``sqlite3`` readers and writers of the store's file."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We emit BEGIN ourselves (below), so that writers can ask for BEGIN IMMEDIATE.
        prepare_sqlite_connection(dbapi_connection)

    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> None:
        # a connection opened while the file was unwritable stays read-only (and one that hit an
        # I/O error may stay broken): the pool drops it instead of lending it again
        error = context.original_exception
        if isinstance(error, sqlite3.Error) and _stuck(error):
            context.is_disconnect = True

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _stuck(error: BaseException) -> bool:
    """Whether a SQLite error may stay with the connection that raised it (read-only, I/O)."""
    text = str(error).lower()
    return "readonly" in text or "read-only" in text or "disk i/o error" in text


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """How a PostgreSQL store engine bounds its waits and its connections (see the README's
    deployment section for sizing them against ``max_connections``).

    :param pool_size: connections kept open per process.
    :param max_overflow: more connections opened under load, closed when given back.
    :param pool_timeout: seconds a thread waits for a free connection before the store is
        reported unavailable.
    :param statement_timeout: seconds the server lets one statement run (lock waits included)
        before it cancels it; 0 for no limit.
    :param connect_timeout: seconds a new connection may take.
    :param tcp_timeout: seconds of network silence after which the connection is dropped: TCP
        keepalive probes start after a third of it, and data the server has not acknowledged
        for that long fails the connection (``tcp_user_timeout``).
    :param ping_idle_seconds: a pooled connection given back longer ago than this is pinged
        (SQLAlchemy's ``do_ping``: an empty query) before it is lent again, and replaced when the ping fails; one used
        again sooner is lent without a ping (see :func:`_install_idle_ping`).
    """

    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout: float = 30.0
    statement_timeout: float = 30.0
    connect_timeout: float = 10.0
    tcp_timeout: float = 30.0
    ping_idle_seconds: float = 5.0

    @property
    def answer_timeout(self) -> float | None:
        """Seconds a client waits for any answer of the server: the statement timeout (which
        the server enforces) plus the TCP timeout; ``None`` when statements are unbounded."""
        if self.statement_timeout <= 0:
            return None
        return self.statement_timeout + self.tcp_timeout

    def engine_arguments(self) -> dict[str, Any]:
        """``connect_args`` and pool arguments for :func:`sqlalchemy.create_engine`."""
        idle = max(1, round(self.tcp_timeout / 3))
        connect_args: dict[str, Any] = {
            "connect_timeout": max(1, round(self.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": idle,
            "keepalives_interval": max(1, round(self.tcp_timeout / 9)),
            "keepalives_count": 3,
            "tcp_user_timeout": max(1, round(self.tcp_timeout * 1000)),
        }
        if self.statement_timeout > 0:
            ms = max(1, round(self.statement_timeout * 1000))
            connect_args["options"] = f"-c statement_timeout={ms}"
        return {
            "connect_args": connect_args,
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.pool_timeout,
        }


def create_store_engine(
    url: str | URL, *, postgres: PostgresOptions | None = None, **kwargs: Any
) -> Engine:
    """An engine for the store at ``url`` (no migration here: see
    :func:`byok_plugin.store.migrate.ensure_migrated`).

    :param postgres: timeouts and pool sizes of a PostgreSQL engine (defaults when ``None``).
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        try:
            _prepare_sqlite_file(parsed.database or "")
        except OSError as exc:
            raise StoreUnavailable(
                f"creating the database file {parsed.database}",
                cause=f"{type(exc).__name__}: {exc.strerror or exc}",
            ) from None
        connect_args = {"timeout": BUSY_TIMEOUT_MS / 1000, **kwargs.pop("connect_args", {})}
        engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
        _install_sqlite_hooks(engine)
        engine._byok_lock_backoff = LockBackoff()  # type: ignore[attr-defined]
        return engine
    if parsed.get_backend_name() == "postgresql":
        arguments = (postgres or PostgresOptions()).engine_arguments()
        connect_args = {**arguments.pop("connect_args"), **kwargs.pop("connect_args", {})}
        kwargs = {**arguments, **kwargs}
        engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
        options = postgres or PostgresOptions()
        _install_postgres_hooks(engine, options.answer_timeout)
        if not kwargs.get("pool_pre_ping"):  # a caller's pool_pre_ping=True pings every checkout
            _install_idle_ping(engine, options.ping_idle_seconds)
        return engine
    return sa.create_engine(parsed, **kwargs)


def is_disconnect(dialect: Any, error: BaseException, dbapi_connection: Any) -> bool:
    """Whether a DB-API ``error`` raised on ``dbapi_connection`` (outside SQLAlchemy's execute)
    leaves it unusable: what the dialect calls a disconnect, or, on PostgreSQL, an answer not
    received within the answer timeout (the connection is mid-protocol); as the engine's
    ``handle_error`` hook decides for statements run through SQLAlchemy."""
    if getattr(dbapi_connection, "closed", False):
        return True
    if dialect.name == "postgresql" and _unanswered(error):
        return True
    return bool(dialect.is_disconnect(error, dbapi_connection, None))


def _unanswered(error: BaseException) -> bool:
    """Whether psycopg gave up waiting for the server's answer (the answer timeout of
    :func:`_install_postgres_hooks`): the connection is mid-protocol, never to be lent again."""
    import psycopg

    return isinstance(error, psycopg.errors._WaitTimeout)


def _install_postgres_hooks(engine: Engine, answer_timeout: float | None) -> None:
    """A server that stops answering without closing the connection (frozen, or a network
    path that still acknowledges packets) fails a statement after ``answer_timeout`` seconds
    instead of hanging its thread; the connection is then dropped from the pool."""
    if answer_timeout is None:
        return
    import psycopg

    class _AnsweringConnection(psycopg.Connection):
        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            return super().wait(gen, interval, answer_timeout if timeout is None else timeout)

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        return _AnsweringConnection.connect(*cargs, **cparams)

    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> None:
        if _unanswered(context.original_exception):
            context.is_disconnect = True  # mid-protocol: never lend this connection again


#: ``connection_record.info`` key: when the connection was last given back to the pool
_IDLE_SINCE = "byok_idle_since"


def _install_idle_ping(engine: Engine, idle_seconds: float) -> None:
    """Ping a pooled connection before lending it only when it sat idle for ``idle_seconds``.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: one more round trip (and the
    server's CPU for it) on every short transaction, 0.1 ms of wall and 0.06 ms of client CPU
    per checkout on loopback. A connection that went back to the pool a moment ago is very
    unlikely to be dead; one idle for seconds may have been closed by a server restart, an
    administrator, or a network device. This is SQLAlchemy's "pessimistic disconnect handling
    with a custom check": a pool ``checkout`` event pings a connection idle for longer than
    ``idle_seconds`` (its check-in time is kept in ``connection_record.info``, which is cleared
    with the connection), and raises :class:`sqlalchemy.exc.DisconnectionError` when the ping
    fails, so that the pool replaces the connection and lends a fresh one without an error. A
    connection lost while in use, or within ``idle_seconds`` of its last use, fails its
    statement as before: SQLAlchemy sees the disconnect and invalidates the pool, and the
    caller gets :class:`StoreUnavailable` once (the ledger's spool keeps a usage row)."""
    dbapi_error = engine.dialect.loaded_dbapi.Error

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < idle_seconds:
            return  # a new connection, or one given back a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except dbapi_error as exc:
            raise sa.exc.DisconnectionError(
                f"an idle pooled connection failed its ping: {type(exc).__name__}"
            ) from None


@contextmanager
def write_transaction(engine: Engine, *, prompt: bool | None = None) -> Iterator[Connection]:
    """A transaction that will write: on SQLite it holds the write lock from its first statement.

    :param prompt: wait at most :data:`LOOP_LOCK_WAIT_MS` for that lock (SQLite); by default, in
        a hook called inline on a host's event loop (:func:`byok_hookspecs.called_inline`).
    """
    with engine.connect() as conn:
        if conn.dialect.name != "sqlite":
            with conn.begin():
                yield conn
            return
        conn = conn.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        if prompt is None:
            prompt = called_inline()
        backoff = lock_backoff(engine) if prompt else None
        if backoff is not None and backoff.active:
            raise sa.exc.OperationalError("BEGIN IMMEDIATE", None, backoff.refusal())
        if prompt:  # on the DB-API connection: SQLAlchemy must not begin a transaction for it
            conn.connection.dbapi_connection.execute(  # type: ignore[union-attr]
                f"PRAGMA busy_timeout = {LOOP_LOCK_WAIT_MS}"
            )
        try:
            with conn.begin():
                yield conn
        except sa.exc.OperationalError as exc:
            if backoff is not None and store_busy(exc):
                backoff.hit()
            raise
        finally:
            if prompt and conn.connection.dbapi_connection is not None:
                conn.connection.dbapi_connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection for reads (its implicit transaction is rolled back at the end)."""
    with engine.connect() as conn:
        yield conn


def advisory_lock_key(*parts: str) -> int:
    """A signed 32-bit key for ``pg_advisory_xact_lock(LOCK_NAMESPACE, key)`` from text parts.

    Two different parts may share a key: that only makes two writers wait for each other.
    """
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    key: int = struct.unpack(">i", digest[:4])[0]
    return key


def lock_in_transaction(conn: Connection, *parts: str) -> None:
    """Serialize writers on ``parts`` until the transaction ends (PostgreSQL advisory lock; on
    SQLite the ``BEGIN IMMEDIATE`` of :func:`write_transaction` already serializes writers)."""
    if is_postgres(conn):
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:ns, :key)"),
            {"ns": LOCK_NAMESPACE, "key": advisory_lock_key(*parts)},
        )


def _cause(exc: sa.exc.SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    source: BaseException = orig if isinstance(orig, BaseException) else exc
    first_line = (str(source).strip().splitlines() or [""])[0]
    return f"{type(source).__name__}: {first_line[:300]}"


#: PostgreSQL's "deadlock detected" and "could not serialize access": the server rolled the
#: transaction back, and running it again may succeed
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
DEADLOCK_TRIES = 5
_R = TypeVar("_R")


def is_deadlock(error: BaseException) -> bool:
    """Whether ``error`` made this transaction a deadlock (or serialization) victim."""
    orig = getattr(error, "orig", error)
    return getattr(orig, "sqlstate", None) in _RETRYABLE_SQLSTATES


def retry_deadlocks(transaction: Callable[[], _R], *, tries: int = DEADLOCK_TRIES) -> _R:
    """Run ``transaction()`` (a whole transaction that may be repeated) again when PostgreSQL
    chose it as a deadlock victim, after a short random pause; other errors pass through.

    Multi-row updates take their row locks in one order (sorted key ids) so that two of them
    do not deadlock; this covers what another order (a foreign key, an index page) still can."""
    for attempt in range(1, tries + 1):
        try:
            return transaction()
        except sa.exc.DBAPIError as exc:
            if attempt == tries or not is_deadlock(exc):
                raise
            time.sleep(random.uniform(0.005, 0.02) * attempt)  # noqa: S311 (jitter)
    raise AssertionError("unreachable")  # pragma: no cover


def store_busy(error: BaseException) -> bool:
    """Whether ``error`` says a SQLite store was locked by another writer (worth waiting for off
    the event loop), rather than broken."""
    text = str(error).lower()
    return "database is locked" in text or "database table is locked" in text


def refused_value(error: BaseException) -> bool:
    """Whether ``error`` is the store refusing a value of the statement (the DB-API's
    ``DataError``: PostgreSQL's SQLSTATE class 22, "data exception", such as a NUL character,
    a lone surrogate, a number out of range or a text too long; SQLite's "string or blob too
    big"; psycopg's own refusal to send a NUL character), rather than the store being down.
    Sending the same value again fails again."""
    if isinstance(error, StoreRefusedValue | sa.exc.DataError | sqlite3.DataError):
        return True
    orig = getattr(error, "orig", None)
    if isinstance(orig, sqlite3.DataError):
        return True
    sqlstate = getattr(orig if orig is not None else error, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith("22")


#: a JSON member name in PostgreSQL's context of a JSON error ("JSON data, line 1: ..."): the
#: last one before the error is the field whose value it refused
_JSON_MEMBER = re.compile(r'"([A-Za-z_][A-Za-z0-9_]{0,62})"\s*:')


def refused_field(error: BaseException) -> str | None:
    """The column whose value the store refused, when the error says it: PostgreSQL's column
    name, or the last member name of the JSON text it was reading (the ledger's group insert)."""
    orig = getattr(error, "orig", error)
    diag = getattr(orig, "diag", None)
    if diag is None:
        return None
    column = getattr(diag, "column_name", None)
    if column:
        return str(column)
    context = getattr(diag, "context", None) or ""
    if not context.startswith("JSON data"):
        return None
    members = _JSON_MEMBER.findall(context)
    return members[-1] if members else None


def unstorable_text(text: str) -> bool:
    """Whether ``text`` holds a character a store refuses: a NUL (PostgreSQL's text types) or a
    lone surrogate (no UTF-8 form: the driver cannot send it)."""
    return "\x00" in text or any("\ud800" <= c <= "\udfff" for c in text)


@contextmanager
def store_errors(
    what: str, *, workspace_id: str = "*", provider: str = "*", key_id: str | None = None
) -> Iterator[None]:
    """Turn a database failure into :class:`StoreUnavailable` naming what was being done, or,
    for a value the store refused (:func:`refused_value`) or the driver could not encode (a
    lone surrogate), :class:`StoreRefusedValue` naming the field when the store says which:
    the row's own error, not an outage.

    Constraint violations (``IntegrityError``) pass through: they are the caller's to interpret.
    """
    try:
        yield
    except sa.exc.IntegrityError:
        raise
    except UnicodeEncodeError as exc:  # the driver cannot send a text (a lone surrogate)
        raise StoreRefusedValue(
            what,
            workspace_id=workspace_id,
            provider=provider,
            key_id=key_id,
            cause=f"UnicodeEncodeError: {exc.reason} (character {exc.start})",
        ) from None
    except sa.exc.SQLAlchemyError as exc:
        if refused_value(exc):
            raise StoreRefusedValue(
                what,
                workspace_id=workspace_id,
                provider=provider,
                key_id=key_id,
                field=refused_field(exc),
                cause=_cause(exc),
            ) from None
        raise StoreUnavailable(
            what, workspace_id=workspace_id, provider=provider, key_id=key_id, cause=_cause(exc)
        ) from None
