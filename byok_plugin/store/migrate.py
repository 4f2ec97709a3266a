"""Running the Alembic migrations from code: on first use of a store, and by ``byok init``.

There is no ``alembic.ini``: the configuration is built here, with ``script_location`` pointing
into the package. The revision history is recorded in ``byok_alembic_version`` (not Alembic's
default ``alembic_version``), so a host's own migrations in the same database are untouched.

Several processes may start on a fresh database at once: on PostgreSQL the upgrade runs under a
session advisory lock, on SQLite inside a ``BEGIN IMMEDIATE`` transaction, so exactly one of
them creates the tables and the others find them done.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.store.engine import LOCK_NAMESPACE, is_postgres, store_errors, write_transaction

__all__ = [
    "VERSION_TABLE",
    "alembic_config",
    "current_revision",
    "ensure_migrated",
    "head_revision",
    "upgrade",
]

log = logging.getLogger("byok.store")

VERSION_TABLE = "byok_alembic_version"
SCRIPT_LOCATION = "byok_plugin:migrations"
_MIGRATION_LOCK = 1


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for this package's migrations (optionally bound to a connection)."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to ``revision``, one process at a time."""
    with store_errors("migrating the database"):
        if is_postgres(engine):
            with engine.connect() as conn:
                conn.execute(
                    sa.text("SELECT pg_advisory_lock(:ns, :key)"),
                    {"ns": LOCK_NAMESPACE, "key": _MIGRATION_LOCK},
                )
                conn.commit()
                try:
                    with conn.begin():
                        command.upgrade(alembic_config(conn), revision)
                finally:
                    conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:ns, :key)"),
                        {"ns": LOCK_NAMESPACE, "key": _MIGRATION_LOCK},
                    )
                    conn.commit()
        else:
            # a migration waits for other writers, even when it starts inside a hook called on
            # an event loop (the store opens at first use)
            with write_transaction(engine, prompt=False) as conn:
                command.upgrade(alembic_config(conn), revision)


def ensure_migrated(engine: Engine) -> None:
    """Bring the database to the newest revision if it is not there yet (first use)."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    with store_errors("reading the schema version"):
        current = current_revision(engine)
    if current == head:
        return
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise StoreUnavailable(
            "checking the schema version",
            cause=(
                f"the database is at schema revision {current!r}, which this version of "
                f"byok-plugin does not know (its newest is {head!r}); upgrade byok-plugin"
            ),
        )
    log.info("migrating the byok store from revision %s to %s", current, head)
    upgrade(engine)
