"""A pooled PostgreSQL connection is pinged before it is lent only after sitting idle (real server).

The store's engine does not use SQLAlchemy's ``pool_pre_ping`` (a ping round trip on every
checkout): a connection given back longer than ``PostgresOptions.ping_idle_seconds`` ago is pinged
and replaced when dead, one used again sooner is lent as it is. What the server ran is read from
``pg_stat_activity`` (the last statement of the connection's backend), not from the client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from byok_plugin.store.engine import PostgresOptions, create_store_engine

pytestmark = pytest.mark.postgres

IDLE = 0.3
PING = ";"


@pytest.fixture
def admin(postgres_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = create_store_engine(postgres_url, postgres=PostgresOptions(ping_idle_seconds=IDLE))
    yield engine
    engine.dispose()


def backend_pid(conn: sa.Connection) -> int:
    """The server process of a checked-out connection, read on the client (no statement)."""
    pid: int = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
    return pid


def last_statement(admin: sa.Engine, pid: int) -> str | None:
    with admin.connect() as conn:
        query = sa.text("SELECT query FROM pg_stat_activity WHERE pid = :pid")
        return conn.execute(query, {"pid": pid}).scalar()


def kill(admin: sa.Engine, pid: int) -> None:
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    deadline = time.monotonic() + 10
    while last_statement(admin, pid) is not None:  # gone from the server, not only signalled
        assert time.monotonic() < deadline, "the backend did not exit"
        time.sleep(0.01)


def use(engine: sa.Engine, marker: str) -> int:
    """Run one statement autocommitted (no ROLLBACK on check-in): the backend's last statement."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        assert conn.execute(sa.text(f"SELECT '{marker}'")).scalar() == marker
        return backend_pid(conn)


def test_a_connection_used_again_at_once_is_lent_without_a_ping(
    engine: sa.Engine, admin: sa.Engine
) -> None:
    pid = use(engine, "first use")
    for _ in range(3):
        with engine.connect() as conn:
            assert backend_pid(conn) == pid  # the same pooled connection
            # checked out, nothing run on it yet: the server's last statement is still ours
            assert last_statement(admin, pid) == "SELECT 'first use'"
            conn.rollback()


def test_a_connection_idle_longer_than_the_threshold_is_pinged(
    engine: sa.Engine, admin: sa.Engine
) -> None:
    pid = use(engine, "before the pause")
    time.sleep(IDLE + 0.1)
    with engine.connect() as conn:
        assert backend_pid(conn) == pid
        # the ping, on checkout (SQLAlchemy's psycopg dialect pings with the empty query ";")
        assert last_statement(admin, pid) == PING
        assert conn.execute(sa.text("SELECT 'after'")).scalar() == "after"


def test_a_connection_killed_while_idle_is_replaced_without_an_error(
    engine: sa.Engine, admin: sa.Engine
) -> None:
    pid = use(engine, "before the kill")
    kill(admin, pid)
    time.sleep(IDLE + 0.1)
    new_pid = use(engine, "after the kill")  # no error: the ping failed, a new connection
    assert new_pid != pid
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert use(engine, "again") == new_pid  # and the new one is pooled as usual


def test_a_connection_killed_within_the_threshold_fails_once_then_the_pool_recovers(
    engine: sa.Engine, admin: sa.Engine
) -> None:
    """Not pinged (it was used a moment ago): its statement meets the disconnect, SQLAlchemy
    invalidates the pool, and the next checkout gets a new connection."""
    pid = use(engine, "before the kill")
    kill(admin, pid)
    with pytest.raises(sa.exc.OperationalError) as raised, engine.connect() as conn:
        conn.execute(sa.text("SELECT 'too soon'"))
    assert raised.value.connection_invalidated
    assert use(engine, "recovered") != pid


def test_an_explicit_pre_ping_still_pings_every_checkout(
    postgres_url: str, admin: sa.Engine
) -> None:
    engine = create_store_engine(postgres_url, pool_pre_ping=True)
    try:
        pid = use(engine, "first use")
        with engine.connect() as conn:
            assert backend_pid(conn) == pid
            assert last_statement(admin, pid) == PING
    finally:
        engine.dispose()
