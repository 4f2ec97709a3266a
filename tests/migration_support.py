"""What the tests of a revision share: the differences between a migrated database and the
models, for the tables that revision made."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from byok_plugin.store.migrate import VERSION_TABLE
from byok_plugin.store.tables import metadata


def model_differences(conn: Connection, tables: Collection[str]) -> list[Any]:
    """Alembic's autogenerate comparison of the database on ``conn`` with the models, for
    ``tables`` only (the metadata holds every revision's tables; each test checks its own):
    ``[]`` when the migrations made them as modelled."""
    context = MigrationContext.configure(
        conn,
        opts={
            "compare_type": True,
            "version_table": VERSION_TABLE,
            "include_object": lambda _obj, name, kind, _reflected, _other: (
                kind != "table" or name in tables
            ),
        },
    )
    return list(compare_metadata(context, metadata))
