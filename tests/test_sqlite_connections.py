"""The ``sqlite3`` connections of the direct SQLite readers and writers: shared by the threads, no
more than the calls that ran at once (a process that calls ``asyncio.run`` again and again, each run
with fresh worker threads, must not pile them up), and all closed by ``close()``.

Open connections are counted as the process's open file descriptors on the database file
(``/proc/self/fd``): the real resource, whatever the code keeps track of.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from byok_hookspecs import CredentialRequest, CredentialSource
from keys_support import OPERATOR, make_app, master_key, random_key, service_for

from byok_plugin.store import create_store_engine, ensure_migrated
from byok_plugin.store.sqlite_connections import SqliteConnections

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="counts file descriptors through /proc"
)


CALLS_AT_ONCE = 8


def open_files(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    target = str(path.resolve())
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    return count


def run_in_threads(work: Callable[[], object], threads: int) -> None:
    """``work`` once in each of ``threads`` short-lived threads, one after the other."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    for _ in range(threads):
        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
    assert errors == []


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "byok.db"
    engine = create_store_engine(f"sqlite:///{path}")
    ensure_migrated(engine)
    engine.dispose()
    return path


def select_one(connections: SqliteConnections) -> None:
    conn = connections.acquire()
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        connections.release(conn)


def test_short_lived_threads_share_the_same_connection(database: Path) -> None:
    connections = SqliteConnections(str(database))
    run_in_threads(lambda: select_one(connections), 30)
    gc.collect()
    assert open_files(database) == len(connections) == 1
    connections.close()
    assert open_files(database) == 0


def test_there_are_no_more_connections_than_calls_at_once_and_close_closes_them(
    database: Path,
) -> None:
    connections = SqliteConnections(str(database))
    holding = threading.Barrier(4)
    release = threading.Event()

    def hold() -> None:
        conn = connections.acquire()
        try:
            holding.wait(timeout=10)
            release.wait(timeout=10)
        finally:
            connections.release(conn)

    for _ in range(2):  # the second round reuses the first round's connections
        threads = [threading.Thread(target=hold) for _ in range(3)]
        for thread in threads:
            thread.start()
        holding.wait(timeout=10)
        assert len(connections) == open_files(database) == 3
        release.set()
        for thread in threads:
            thread.join()
        release.clear()
    # close() closes the idle connections, and one in use when it is given back
    busy = connections.acquire()
    connections.close()
    assert open_files(database) == 1
    connections.release(busy)
    assert open_files(database) == len(connections) == 0
    select_one(connections)  # the next call opens a new one
    assert len(connections) == 1
    connections.close()


def test_resolving_from_short_lived_threads_does_not_grow_the_open_connections(
    tmp_path: Path,
) -> None:
    """Thirty ``asyncio.run`` calls, each resolving from the default executor's worker threads
    (which end with the run), then twenty threads one after the other: the files open on the
    database stay what one run needed."""
    database = tmp_path / "byok.db"
    app = make_app(
        f"sqlite:///{database}",
        tmp_path,
        keys=[master_key()],
        extra={"BYOK_KEY_CACHE_SECONDS": "0"},  # every resolution reads the store
    )
    service, pm = service_for(app)
    try:
        key_id = service.set_key(
            OPERATOR, "acme", "openai", random_key("openai"), label="default", test=False
        ).key.id
        request = CredentialRequest("acme", "openai", "gpt-4o", actor=OPERATOR)

        def resolve() -> None:
            credential = pm.hook.byok_resolve_credential(request=request)
            assert (credential.source, credential.key_id) == (CredentialSource.WORKSPACE, key_id)

        async def burst() -> None:
            await asyncio.gather(*(asyncio.to_thread(resolve) for _ in range(CALLS_AT_ONCE)))

        # the engine's files, plus at most one connection per call that ran at once
        bound = open_files(database) + CALLS_AT_ONCE
        for _ in range(30):
            asyncio.run(burst())
        gc.collect()
        assert open_files(database) <= bound
        run_in_threads(resolve, 20)
        assert open_files(database) <= bound
    finally:
        app.close()
