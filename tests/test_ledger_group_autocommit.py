"""The PostgreSQL group insert on a pooled connection's own psycopg connection (real server).

``Ledger.record_many`` without settlements runs its one statement autocommitted on the pooled
connection's psycopg connection, not through SQLAlchemy's execution machinery. These tests check
what that must not change: one statement and no transaction on the server, the connection given
back as the pool lends it (a later transaction still rolls back), a statement error that leaves it
usable keeps it pooled, and a connection lost under the writer fails that group with
``StoreUnavailable`` and is never lent again (the next group gets a new one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from byok_plugin.app import App
from byok_plugin.billing.ledger import usage_ledger
from byok_plugin.core.errors import StoreRefusedValue, StoreUnavailable
from byok_plugin.settings import Settings
from tests.ledger_support import record_for

pytestmark = pytest.mark.postgres


@pytest.fixture
def app(tmp_path: Path, postgres_url: str) -> Iterator[App]:
    app = App(
        Settings.from_environ({"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": postgres_url})
    )
    app.ledger.count()  # migrated, and one pooled connection open
    yield app
    app.close()


@pytest.fixture
def admin(postgres_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    yield engine
    engine.dispose()


def pooled_pid(app: App) -> int:
    """The backend of the one connection in the app's pool (read on the client)."""
    assert app.engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    with app.engine.connect() as conn:
        pid: int = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        return pid


def server_view(admin: sa.Engine, pid: int) -> tuple[str, str] | None:
    """The backend's last statement and its state (``idle``, ``idle in transaction``)."""
    with admin.connect() as conn:
        row = conn.execute(
            sa.text("SELECT query, state FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        ).first()
    return (row[0], row[1]) if row is not None else None


def test_a_group_is_one_autocommitted_statement_and_its_connection_goes_back_as_lent(
    app: App, admin: sa.Engine
) -> None:
    pid = pooled_pid(app)
    assert app.ledger.record_many([record_for(n) for n in range(3)]) == 3
    assert pooled_pid(app) == pid  # the same pooled connection wrote the group
    view = server_view(admin, pid)
    assert view is not None
    query, state = view
    # its last statement is the insert itself, committed: no BEGIN before it, no COMMIT after
    assert query.startswith("INSERT INTO byok_usage_ledger")
    assert "json_populate_recordset" in query
    assert state == "idle"
    # given back in transactional mode: a transaction on it still rolls back
    with app.engine.connect() as conn:
        assert conn.connection.dbapi_connection.info.backend_pid == pid  # type: ignore[union-attr]
        assert conn.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
        conn.execute(sa.delete(usage_ledger))
        conn.rollback()
    assert app.ledger.count() == 3


def test_a_single_record_is_the_same_one_statement(app: App, admin: sa.Engine) -> None:
    """``Ledger.record`` on PostgreSQL is a group of one: no BEGIN and COMMIT around it."""
    pid = pooled_pid(app)
    assert app.ledger.record(record_for(7)) is True
    view = server_view(admin, pid)
    assert view is not None
    assert view[0].startswith("INSERT INTO byok_usage_ledger")
    assert view[1] == "idle"
    assert app.ledger.record(record_for(7)) is False  # recorded already: skipped
    assert app.ledger.count() == 1
    too_long = replace(record_for(8), workflow_id="w" * 201)  # the column holds 200
    with pytest.raises(StoreRefusedValue, match=too_long.workspace_id) as raised:
        app.ledger.record(too_long)
    assert "StringDataRightTruncation" in str(raised.value)
    assert app.ledger.count() == 1


def test_a_refused_group_keeps_its_connection_when_it_is_still_usable(
    app: App, admin: sa.Engine
) -> None:
    pid = pooled_pid(app)
    too_long = replace(record_for(2), workflow_id="w" * 201)  # the column holds 200
    with pytest.raises(StoreRefusedValue, match="recording usage") as raised:
        app.ledger.record_many([record_for(1), too_long])
    assert "StringDataRightTruncation" in str(raised.value)  # the server's reason, named
    assert app.ledger.count() == 0  # nothing of the group
    assert pooled_pid(app) == pid  # not dropped: the error was the statement's, not the line's
    with app.engine.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
    assert app.ledger.record_many([record_for(1), record_for(2)]) == 2


def test_a_group_whose_connection_was_lost_fails_once_and_the_next_gets_a_new_one(
    app: App, admin: sa.Engine
) -> None:
    pid = pooled_pid(app)
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    # used a moment ago, so lent without a ping: the group meets the closed connection
    with pytest.raises(StoreUnavailable, match="recording usage"):
        app.ledger.record_many([record_for(1), record_for(2)])
    assert app.ledger.record_many([record_for(1), record_for(2)]) == 2
    assert pooled_pid(app) != pid  # the lost one was dropped, not lent again
    assert app.ledger.count() == 2
