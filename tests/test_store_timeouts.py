"""PostgreSQL waits are bounded and its pool is sized by Settings (real PostgreSQL).

A statement the server cannot finish (a row lock another session holds, what a frozen or
overloaded database looks like to a worker) fails within ``BYOK_DB_STATEMENT_TIMEOUT`` as
:class:`StoreUnavailable`, the usage goes to the local spool, and the store answers again as
soon as the lock is gone. A process that needs more connections than ``BYOK_DB_POOL_SIZE`` +
``BYOK_DB_MAX_OVERFLOW`` waits ``BYOK_DB_POOL_TIMEOUT`` and gets a clear error, never hangs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from byok_plugin.app import App
from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.settings import Settings, SettingsError
from byok_plugin.store.engine import create_store_engine, store_errors
from tests.ledger_support import record_for
from tests.spool_support import TcpProxy

pytestmark = pytest.mark.postgres


def app_for(home: Path, url: str, **env: str) -> App:
    return App(Settings.from_environ({"BYOK_HOME": str(home), "BYOK_DATABASE_URL": url, **env}))


def test_a_statement_blocked_by_a_lock_fails_within_the_timeout_and_recovers(
    tmp_path: Path, postgres_url: str
) -> None:
    app = app_for(tmp_path, postgres_url, BYOK_DB_STATEMENT_TIMEOUT="0.5")
    holder = create_store_engine(postgres_url)
    try:
        app.ledger.record(record_for(0))
        with app.engine.connect() as conn:
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar_one() == "500ms"
        with holder.connect() as locker:
            # the whole ledger locked by another session, as a stuck migration or a frozen
            # transaction would leave it
            locker.execute(sa.text("LOCK TABLE byok_usage_ledger IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="statement timeout"):
                app.ledger.record(record_for(1))
            assert time.monotonic() - started < 10  # not for as long as the lock is held
            # through the plugin's path the call is kept in the spool, not lost
            assert app.durable_ledger.record(record_for(2)) is True
            assert app.durable_ledger.spool.pending() == 1
            locker.rollback()
        assert app.durable_ledger.record(record_for(1)) is True  # and replays the spool
        assert app.ledger.count() == 3
        assert app.durable_ledger.spool.pending() == 0
    finally:
        holder.dispose()
        app.close()


def in_thread(fn: Callable[[], object]) -> tuple[object, BaseException | None]:
    """``fn()`` in a thread, given up on after a minute (it must not hang the suite)."""
    outcome: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "still waiting for a server that stopped answering"
    return (outcome[0] if outcome else None), (errors[0] if errors else None)


def test_a_server_that_stops_answering_fails_calls_within_the_timeouts_and_recovers(
    tmp_path: Path, postgres_url: str
) -> None:
    target = make_url(postgres_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    proxy.start()
    app = app_for(
        tmp_path,
        proxy.url(postgres_url),
        BYOK_DB_STATEMENT_TIMEOUT="1",
        BYOK_DB_TCP_TIMEOUT="1",
        BYOK_DB_CONNECT_TIMEOUT="1",
    )
    try:
        assert app.durable_ledger.record(record_for(0)) is True
        proxy.freeze()  # connections stay open, nothing comes back
        _, error = in_thread(lambda: app.ledger.record(record_for(1)))
        assert isinstance(error, StoreUnavailable), error
        assert "recording usage" in str(error)
        # through the plugin the usage is kept in the spool meanwhile
        spooled, error = in_thread(lambda: app.durable_ledger.record(record_for(2)))
        assert (spooled, error) == (True, None)
        assert app.durable_ledger.spool.pending() == 1
        proxy.thaw()
        # record 1 failed on the client, but its one autocommitted INSERT may have reached the
        # server before the answers stopped: tried again, it is there exactly once either way
        assert app.durable_ledger.record(record_for(1)) in (True, False)
        assert app.durable_ledger.record(record_for(3)) is True  # and the spool is replayed
        assert app.durable_ledger.spool.pending() == 0
        assert app.ledger.count() == 4
    finally:
        proxy.thaw()
        app.close()
        proxy.kill()


def test_the_pool_size_comes_from_settings_and_an_exhausted_pool_fails_clearly(
    tmp_path: Path, postgres_url: str
) -> None:
    app = app_for(
        tmp_path,
        postgres_url,
        BYOK_DB_POOL_SIZE="2",
        BYOK_DB_MAX_OVERFLOW="1",
        BYOK_DB_POOL_TIMEOUT="0.3",
    )
    try:
        engine = app.engine
        assert engine.pool.size() == 2  # type: ignore[attr-defined]
        held = [engine.connect() for _ in range(3)]
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="QueuePool limit"):
                app.ledger.record(record_for(1))
            assert time.monotonic() - started < 10
        finally:
            for conn in held:
                conn.close()
        assert app.ledger.record(record_for(1)) is True
    finally:
        app.close()


def test_many_threads_share_a_small_pool_without_losing_a_record(
    tmp_path: Path, postgres_url: str
) -> None:
    app = app_for(tmp_path, postgres_url, BYOK_DB_POOL_SIZE="2", BYOK_DB_MAX_OVERFLOW="0")
    try:
        app.ledger.count()

        def work(start: int) -> None:
            for n in range(start, start + 20):
                app.durable_ledger.record(record_for(n))

        threads = [threading.Thread(target=work, args=(i * 20,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert app.ledger.count() == 160
        with store_errors("counting"), app.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        app.close()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("BYOK_DB_POOL_SIZE", "0", "BYOK_DB_POOL_SIZE must be a whole number from 1 to 1000"),
        ("BYOK_DB_MAX_OVERFLOW", "many", "BYOK_DB_MAX_OVERFLOW must be a whole number"),
        (
            "BYOK_DB_STATEMENT_TIMEOUT",
            "-1",
            "BYOK_DB_STATEMENT_TIMEOUT must be a number of seconds from 0 to",
        ),
        ("BYOK_DB_TCP_TIMEOUT", "0", "BYOK_DB_TCP_TIMEOUT must be a number of seconds > 0"),
    ],
)
def test_bad_pool_and_timeout_settings_name_the_variable(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_environ({"BYOK_HOME": "/tmp/x", name: value})
