"""Shared fixtures: an isolated user directory, and real databases (SQLite file, PostgreSQL).

PostgreSQL tests read ``BYOK_TEST_POSTGRES_URL`` (a role that may ``CREATE DATABASE``). Without it
they are skipped with a reason, on a laptop; with ``BYOK_REQUIRE_POSTGRES=1`` (set by ``.ci/run``)
a missing or unreachable server fails them instead.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import settings
from sqlalchemy.engine import make_url

pytest_plugins = ["byok_plugin.host.emulator.testing"]

# On a laptop hypothesis explores anew each run and remembers what failed; in CI (CI=true) the
# examples are derived from each test, so a landing is never decided by a lucky draw. No deadline
# on either: the machines are shared and noisy, and speed is the benchmarks' business.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")

POSTGRES_URL_VAR = "BYOK_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VAR = "BYOK_REQUIRE_POSTGRES"


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Never touch the real user directory, keyring or database; never call a real provider."""
    home = tmp_path_factory.mktemp("byok-home")
    monkeypatch.setenv("BYOK_HOME", str(home))
    for name in list(os.environ):
        if name in {
            "BYOK_DATABASE_URL",
            "BYOK_ENCRYPTION_KEYS",
            "BYOK_KEY_FILE",
            "BYOK_BLOCK_KEY_ENV_ALLOW",
        } or (
            name.startswith("BYOK_PLATFORM_KEYS_")
            or name.endswith("_API_KEY")
            or "_API_KEY_" in name
        ):
            monkeypatch.delenv(name)
    return home


def _postgres_unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_POSTGRES_VAR) == "1":
        pytest.fail(f"PostgreSQL is required here ({REQUIRE_POSTGRES_VAR}=1) but {reason}")
    pytest.skip(f"PostgreSQL test skipped: {reason}")


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """The URL of the PostgreSQL server the tests may create databases on."""
    url = os.environ.get(POSTGRES_URL_VAR)
    if not url:
        _postgres_unavailable(f"{POSTGRES_URL_VAR} is not set (see .ci/run for how CI sets it)")
    assert url is not None
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        _postgres_unavailable(f"the server at {make_url(url).host} does not answer ({exc.orig})")
    finally:
        engine.dispose()
    return url


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"byok_t_{secrets.token_hex(6)}"
    admin = sa.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            _drop_database(admin, name)
        finally:
            admin.dispose()


def _drop_database(admin: sa.Engine, name: str) -> None:
    """``DROP DATABASE ... WITH (FORCE)``, tried again for a few seconds: FORCE must terminate
    every session on the database, and a non-superuser may not terminate an autovacuum worker
    that has just started on it (InsufficientPrivilege); the worker is gone a moment later."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except sa.exc.DBAPIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A new SQLite database file for one test."""
    return f"sqlite:///{tmp_path / 'byok.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each storage test runs on a real SQLite file and on a real PostgreSQL database."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")
