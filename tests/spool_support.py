"""Helpers for the spool tests: make a real store refuse every ledger write, and let it go.

Not a test module. On PostgreSQL a trigger raises on every insert into the ledger (what the
runner sees when the server refuses writes: an error from the server). On SQLite a trigger
writes into a table that has been dropped, so every insert fails with an ``OperationalError``
(``no such table``), as it does for a read-only or full disk; the file stays readable.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from byok_plugin.store.engine import create_store_engine


def refuse_ledger_writes(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(
                    sa.text(
                        "CREATE FUNCTION byok_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$ BEGIN RAISE EXCEPTION 'the ledger refuses writes (test)'; END $$"
                    )
                )
                conn.execute(
                    sa.text(
                        "CREATE TRIGGER byok_test_refuse BEFORE INSERT ON byok_usage_ledger "
                        "FOR EACH ROW EXECUTE FUNCTION byok_test_refuse()"
                    )
                )
            else:
                conn.execute(sa.text("CREATE TABLE byok_test_gone (k TEXT)"))
                conn.execute(
                    sa.text(
                        "CREATE TRIGGER byok_test_refuse BEFORE INSERT ON byok_usage_ledger "
                        "BEGIN INSERT INTO byok_test_gone VALUES (new.idempotency_key); END"
                    )
                )
                conn.execute(sa.text("DROP TABLE byok_test_gone"))
    finally:
        engine.dispose()


def accept_ledger_writes(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("DROP TRIGGER byok_test_refuse ON byok_usage_ledger"))
                conn.execute(sa.text("DROP FUNCTION byok_test_refuse()"))
            else:
                conn.execute(sa.text("DROP TRIGGER byok_test_refuse"))
    finally:
        engine.dispose()


def make_unwritable(path: Path) -> Callable[[], None]:
    """Make a file unwritable (``chmod``; ``chattr +i`` for root, whom modes do not stop);
    returns the function that undoes it. Where root may not set the immutable flag (no
    ``CAP_LINUX_IMMUTABLE``), the test is skipped, saying why."""
    import pytest

    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o444)
        return lambda: path.chmod(mode)
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a file unwritable as root here: {done.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
