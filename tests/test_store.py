"""The store itself: migrations, SQLite WAL and file modes, an unreachable store, data at rest."""

from __future__ import annotations

import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from byok_hookspecs import Actor, CredentialUnavailable, KeyCheckStatus, Role
from keys_support import (
    OPERATOR,
    Recorder,
    dump_database,
    leaks,
    make_app,
    master_key,
    random_key,
    service_for,
)
from migration_support import model_differences

from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.store import KeyStore, create_store_engine, ensure_migrated, normalize_url
from byok_plugin.store.migrate import (
    VERSION_TABLE,
    alembic_config,
    current_revision,
    head_revision,
    upgrade,
)
from byok_plugin.store.tables import workspace_keys

TABLES = {"byok_workspace_keys", "byok_audit_events", "byok_master_keys", VERSION_TABLE}


def test_migrations_create_the_tables_once_and_match_the_models(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        ensure_migrated(engine)
        ensure_migrated(engine)  # a no-op the second time
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= TABLES
            # this module's tables (later revisions add others, checked by their own tests)
            assert model_differences(conn, TABLES) == []
    finally:
        engine.dispose()


def test_revision_0003_adds_the_cooldown_reason_to_keys_already_stored(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        upgrade(engine, "0002")
        now = datetime.now(UTC)
        row = {
            "id": "key_old",
            "workspace_id": "acme",
            "provider": "openai",
            "label": "default",
            "ciphertext": "byok:v1:k1:AAAA",
            "master_key_id": "k1",
            "hint": "sk-...abcd",
            "fingerprint": "hs256:" + "0" * 32,
            "created_at": now,
            "updated_at": now,
            "cooldown_until": now + timedelta(seconds=30),
        }
        with engine.begin() as conn:
            conn.execute(sa.insert(workspace_keys).values(**row))
        ensure_migrated(engine)
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            until, reason = conn.execute(
                sa.select(workspace_keys.c.cooldown_until, workspace_keys.c.cooldown_reason)
            ).one()
        assert (until, reason) == (row["cooldown_until"], None)  # kept; reason unknown
        with engine.begin() as conn:  # and back down, keeping the row
            command.downgrade(alembic_config(conn), "0002")
        with engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns(workspace_keys.name)}
            assert "cooldown_reason" not in columns
            assert conn.execute(sa.text("SELECT id FROM byok_workspace_keys")).scalars().all() == [
                "key_old"
            ]
    finally:
        engine.dispose()


def test_workers_starting_on_a_fresh_database_migrate_it_once(database_url: str) -> None:
    engines = [create_store_engine(database_url) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(engines))

    def run(engine: sa.Engine) -> None:
        try:
            start.wait(timeout=30)
            ensure_migrated(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        assert current_revision(engines[0]) == head_revision()
    finally:
        for engine in engines:
            engine.dispose()


def test_the_embedded_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'data' / 'byok.db'}", tmp_path, keys=[master_key()])
    try:
        with app.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert stat.S_IMODE((tmp_path / "data" / "byok.db").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    finally:
        app.close()


def test_the_default_database_is_a_sqlite_file_in_byok_home(tmp_path: Path) -> None:
    from byok_plugin.app import App
    from byok_plugin.settings import Settings

    app = App(Settings.from_environ({"BYOK_HOME": str(tmp_path / "home")}))
    try:
        assert app.engine.dialect.name == "sqlite"
        assert (tmp_path / "home" / "byok.db").exists()
    finally:
        app.close()


def test_plain_postgresql_urls_use_psycopg_3() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://byok:secret-pw@127.0.0.1:1/nowhere",
        "sqlite:///{tmp}",  # a directory, not a database file
    ],
    ids=["postgres-down", "sqlite-unopenable"],
)
def test_a_store_that_does_not_answer_is_an_error_not_no_key(url: str, tmp_path: Path) -> None:
    engine = create_store_engine(url.format(tmp=tmp_path), connect_args={})
    store = KeyStore(engine)
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.usable_keys("acme", "openai")
        err = info.value
        assert isinstance(err, CredentialUnavailable)
        assert (err.workspace_id, err.provider) == ("acme", "openai")
        assert "acme" in str(err)
        assert "secret-pw" not in str(err)
    finally:
        engine.dispose()
    # through the app: the first use (migration) fails the same way
    app = make_app(url.format(tmp=tmp_path), tmp_path, keys=[master_key()])
    with pytest.raises(StoreUnavailable):
        _ = app.key_access


def test_no_plaintext_key_at_rest(database_url: str, tmp_path: Path) -> None:
    """The database (SQLite file with its WAL, or every PostgreSQL table) holds no plaintext key
    and no run of one longer than the display hint shows (6 characters)."""
    app = make_app(database_url, tmp_path, keys=[master_key("k1")])
    recorder = Recorder(check=KeyCheckStatus.VALID)
    service, _ = service_for(app, recorder)
    admin = Actor("alice", {"acme": Role.ADMIN, "beta": Role.ADMIN})
    secrets_: list[str] = []
    try:
        for workspace in ("acme", "beta"):
            for provider in ("openai", "anthropic", "google", "mistral", "exa"):
                for label in ("main", "backup"):
                    key = random_key(provider)
                    secrets_.append(key)
                    service.set_key(admin, workspace, provider, key, label=label)
        replacement = random_key("openai")
        secrets_.append(replacement)
        service.set_key(admin, "acme", "openai", replacement, label="main")
        service.disable(admin, "acme", "mistral", label="main")
        service.test_keys(admin, "beta", "exa")
        service.delete_keys(admin, "beta", "google", label="backup")
        key = app.key_access.enabled_keys("acme", "anthropic")[0]
        assert app.key_access.reveal(key).api_key in secrets_
        service.rewrap(OPERATOR)
        assert len(app.audit_store.events()) > 20
    finally:
        app.close()
    dump = dump_database(database_url)
    assert b"byok:v1:k1:" in dump  # the dump does hold the ciphertexts...
    assert leaks(dump, secrets_) == []  # ...and nothing of the keys


def test_a_database_from_a_newer_version_is_refused_clearly(sqlite_url: str) -> None:
    engine = create_store_engine(sqlite_url)
    try:
        ensure_migrated(engine)
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
        with pytest.raises(StoreUnavailable, match=r"revision '9999'.*upgrade byok-plugin"):
            ensure_migrated(engine)
    finally:
        engine.dispose()


def test_many_openers_of_a_fresh_sqlite_file_all_get_a_wal_database(tmp_path) -> None:
    """Switching a fresh file to WAL needs an exclusive lock, and SQLite refuses it at once (no
    busy handler) while another connection opens the same file: every opener must wait it out.
    One round rarely loses the race, so run many."""
    for round_ in range(60):
        url = f"sqlite:///{tmp_path / f'race-{round_}.db'}"
        engines = [create_store_engine(url) for _ in range(4)]
        errors: list[BaseException] = []
        start = threading.Barrier(len(engines))

        def run(engine: sa.Engine, start: threading.Barrier, errors: list[BaseException]) -> None:
            try:
                start.wait(timeout=30)
                with engine.connect() as conn:
                    assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(e, start, errors)) for e in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for engine in engines:
            engine.dispose()
        assert errors == [], f"round {round_}"
