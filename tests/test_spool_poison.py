"""A row the store refuses for its own sake never blocks the ledger spool (real SQLite, real
PostgreSQL).

A value the store cannot take (PostgreSQL: a NUL character in a text; SQLite's driver: a lone
surrogate, which it cannot encode; both: an integer beyond 64 bits) is the row's own error, not the
store being down: recording it raises :class:`StoreRefusedValue` naming the workspace and the
field, and a replay holds such a spooled row aside (listed by ``byok ledger spool``, never
deleted) and writes the rows after it. A store that is down still stops the replay.

SQLite stores a NUL character as any other, so the SQLite cases use the lone surrogate.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from byok_hookspecs import BudgetReservation, CredentialSource, UsageRecord
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from byok_plugin.app import App
from byok_plugin.billing.spool import LedgerSpool, refused_fields, row_refused
from byok_plugin.cli import main
from byok_plugin.core.errors import StoreRefusedValue, StoreUnavailable
from byok_plugin.settings import Settings
from byok_plugin.store.engine import create_store_engine, store_errors
from tests.ledger_support import record_for
from tests.spool_support import TcpProxy, accept_ledger_writes, refuse_ledger_writes


def app_for(home: Path, database_url: str, **env: str) -> App:
    return App(
        Settings.from_environ({"BYOK_HOME": str(home), "BYOK_DATABASE_URL": database_url, **env})
    )


def ledger_keys(app: App) -> list[str]:
    return sorted(r.idempotency_key for r in app.ledger.rows())


def poison(database_url: str, n: int = 50) -> UsageRecord:
    """A record whose workflow id this store refuses: a NUL character on PostgreSQL, a lone
    surrogate on SQLite (which takes a NUL)."""
    bad = "wf\x00x" if database_url.startswith("postgresql") else "wf\ud800x"
    return dataclasses.replace(record_for(n), workflow_id=bad)


def too_many_tokens(n: int = 60) -> UsageRecord:
    """A record with a token count beyond 64 bits: refused by both stores."""
    record = record_for(n)
    return dataclasses.replace(record, usage=dataclasses.replace(record.usage, input_tokens=2**63))


def test_the_fields_no_store_takes_are_found_in_the_record() -> None:
    assert refused_fields(record_for(1)) == ()
    assert refused_fields(dataclasses.replace(record_for(1), workflow_id="a\x00")) == (
        "workflow_id",
    )
    assert refused_fields(dataclasses.replace(record_for(1), block_id="b\udc80")) == ("block_id",)
    assert refused_fields(too_many_tokens()) == ("input_tokens",)
    long_model = dataclasses.replace(
        record_for(1), usage=dataclasses.replace(record_for(1).usage, model="m" * 5000)
    )
    assert refused_fields(long_model) == ("model",)


def _refused_statement(conn: sa.Connection) -> None:
    with store_errors("reading budgets", workspace_id="w"):
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT CAST(:v AS text)"), {"v": "a\x00b"})
        else:  # SQLite's "string or blob too big" (beyond SQLITE_MAX_LENGTH)
            conn.execute(sa.text("SELECT zeroblob(2000000000)"))


def _missing_table(conn: sa.Connection) -> None:
    with store_errors("reading budgets"):
        conn.execute(sa.text("SELECT * FROM no_such_table"))


def test_a_value_the_store_refuses_is_not_the_store_being_down(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        with engine.connect() as conn, pytest.raises(StoreRefusedValue) as refused:
            _refused_statement(conn)
        assert not isinstance(refused.value, StoreUnavailable)
        assert "the key store refused a value while reading budgets for workspace 'w'" in str(
            refused.value
        )
        assert "DataError" in str(refused.value)
        # a table that is not there is the store's trouble, as before
        with engine.connect() as conn, pytest.raises(StoreUnavailable):
            _missing_table(conn)
    finally:
        engine.dispose()


def test_recording_a_refused_row_names_workspace_and_field_and_holds_it(
    tmp_path: Path, database_url: str
) -> None:
    app = app_for(tmp_path, database_url)
    try:
        bad = poison(database_url)
        with pytest.raises(StoreRefusedValue) as refused:
            app.durable_ledger.record(bad)
        message = str(refused.value)
        assert f"workspace {bad.workspace_id!r}" in message
        assert "(field workflow_id)" in message
        assert bad.idempotency_key in message
        assert "did not answer" not in message
        spool = app.durable_ledger.spool
        # not spooled as an outage (it would fail every replay), but kept: never lost in silence
        assert spool.pending() == 0
        assert [r.idempotency_key for r in spool.held()] == [bad.idempotency_key]
        assert "(field workflow_id)" in spool.held()[0].error
        # its run id counts as used, as a spooled call's does
        assert [c.idempotency_key for c in spool.recorded_calls(bad.run_id or "")] == [
            bad.idempotency_key
        ]
        # the store still answers: later rows are written at once
        assert app.durable_ledger.record(record_for(1)) is True
        assert ledger_keys(app) == [record_for(1).idempotency_key]
        assert not app.durable_ledger.recording_down()
    finally:
        app.close()


def test_a_group_with_one_refused_row_writes_the_others(tmp_path: Path, database_url: str) -> None:
    app = app_for(tmp_path, database_url)
    try:
        good = [record_for(1), record_for(2)]
        with pytest.raises(StoreRefusedValue) as refused:
            app.durable_ledger.record_many([good[0], too_many_tokens(), good[1]])
        assert "(field input_tokens)" in str(refused.value)
        assert ledger_keys(app) == sorted(r.idempotency_key for r in good)
        assert [r.idempotency_key for r in app.durable_ledger.spool.held()] == [
            too_many_tokens().idempotency_key
        ]
        assert app.durable_ledger.spool.pending() == 0
    finally:
        app.close()


def test_a_replay_holds_a_refused_row_and_writes_every_row_after_it(
    tmp_path: Path, database_url: str
) -> None:
    app = app_for(tmp_path, database_url)
    try:
        spool = app.durable_ledger.spool
        # what an outage left in the spool: refused rows first, then good ones
        bad = [poison(database_url), too_many_tokens()]
        good = [record_for(n) for n in range(1, 6)]
        for record in [*bad, *good]:
            assert spool.add(record, "the key store did not answer (test)") is True
        result = app.durable_ledger.replay()
        assert (result.replayed, result.already_recorded, result.remaining, result.error) == (
            5,
            0,
            0,
            None,
        )
        assert result.held == 2
        assert ledger_keys(app) == sorted(r.idempotency_key for r in good)
        held = {row.idempotency_key: row for row in spool.held()}
        assert sorted(held) == sorted(r.idempotency_key for r in bad)
        assert "(field workflow_id)" in held[bad[0].idempotency_key].error
        assert "(field input_tokens)" in held[bad[1].idempotency_key].error
        assert all(f"workspace {r.workspace_id!r}" in held[r.idempotency_key].error for r in bad)
        assert spool.pending() == 0
        # a second replay does not try them again; they stay held, run ids still used
        again = app.durable_ledger.replay()
        assert (again.replayed, again.held, again.error) == (0, 0, None)
        assert len(spool.held()) == 2
        assert {c.idempotency_key for c in spool.recorded_calls(bad[0].run_id or "")} >= {
            bad[0].idempotency_key
        }
    finally:
        app.close()


def test_a_store_that_is_down_still_stops_the_replay(tmp_path: Path, database_url: str) -> None:
    app = app_for(tmp_path, database_url)
    try:
        spool = app.durable_ledger.spool
        bad = poison(database_url)
        for record in (record_for(1), bad, record_for(2)):
            spool.add(record, "the key store did not answer (test)")
        refuse_ledger_writes(database_url)
        result = app.durable_ledger.replay()
        # the first row meets the store refusing every write: the replay stops, nothing is held
        assert (result.replayed, result.held, result.remaining) == (0, 0, 3)
        assert "StoreUnavailable" in (result.error or "")
        assert spool.pending() == 3
        assert spool.held() == []
        accept_ledger_writes(database_url)
        result = app.durable_ledger.replay()
        assert (result.replayed, result.held, result.remaining, result.error) == (2, 1, 0, None)
        assert ledger_keys(app) == sorted(record_for(n).idempotency_key for n in (1, 2))
        assert [r.idempotency_key for r in spool.held()] == [bad.idempotency_key]
    finally:
        app.close()


def test_the_cli_says_what_is_held_and_exits_1_until_it_is_resolved(
    tmp_path: Path, database_url: str
) -> None:
    app = app_for(tmp_path, database_url)
    bad = poison(database_url)
    try:
        for record in (bad, record_for(1)):
            app.durable_ledger.spool.add(record, "the key store did not answer (test)")
    finally:
        app.close()
    env = {"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": database_url}
    runner = CliRunner()
    done = runner.invoke(main, ["ledger", "replay"], env=env)
    assert done.exit_code == 1, done.output
    assert "replayed 1 usage rows into the store (0 were already there); 0 still spooled" in (
        done.stdout
    )
    assert "1 held aside (1 by this replay)" in done.stdout
    assert "1 usage rows are held aside: the store refused them" in done.stderr
    assert "Traceback" not in done.output
    # the spool alone is read: the store need not answer
    shown = runner.invoke(
        main,
        ["ledger", "spool", "--json"],
        env={"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"},
    )
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert doc["pending"] == 0
    assert [h["idempotency_key"] for h in doc["held"]] == [bad.idempotency_key]
    assert doc["held"][0]["workspace_id"] == bad.workspace_id
    assert "(field workflow_id)" in doc["held"][0]["error"]
    text = runner.invoke(main, ["ledger", "spool"], env=env)
    assert text.exit_code == 0, text.output
    assert "0 usage rows waiting" in text.stdout
    assert "1 usage rows held aside" in text.stdout
    assert bad.idempotency_key in text.stdout
    # tried again on request: the store still refuses it, it is still held, not lost
    retried = runner.invoke(main, ["ledger", "replay", "--retry-held", "--json"], env=env)
    assert retried.exit_code == 1, retried.output
    doc = json.loads(retried.stdout.splitlines()[0])
    assert (doc["replayed"], doc["remaining"], doc["held"], doc["error"]) == (0, 0, 1, None)
    assert len(LedgerSpool(tmp_path / "ledger-spool.db").held()) == 1


def test_a_spool_file_of_an_earlier_version_gains_the_held_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger-spool.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE spooled_usage (idempotency_key TEXT PRIMARY KEY, workspace_id TEXT NOT NULL,"
        " record TEXT NOT NULL, spooled_at REAL NOT NULL, cause TEXT NOT NULL)"
    )
    conn.commit()
    conn.close()
    spool = LedgerSpool(path)
    assert spool.held() == []
    spool.add(record_for(1), "down")
    assert spool.pending() == 1


def test_what_counts_as_the_rows_own_error() -> None:
    assert row_refused(StoreRefusedValue("x"))
    assert row_refused(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert row_refused(OverflowError("Python int too large to convert to SQLite INTEGER"))
    assert row_refused(sa.exc.IntegrityError("INSERT", None, Exception("CHECK failed")))
    assert not row_refused(StoreUnavailable("recording usage", cause="OperationalError: gone"))
    assert not row_refused(RuntimeError("a bug"))


@pytest.mark.postgres
def test_a_nul_row_spooled_while_the_server_was_gone_does_not_block_the_rows_after_it(
    tmp_path: Path, postgres_url: str
) -> None:
    """The reviewer's case: during an outage a row with a NUL character is spooled with the
    others; once the server is back, the others land and that row is held."""
    target = make_url(postgres_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    proxy.start()
    app = app_for(tmp_path, proxy.url(postgres_url), BYOK_DB_CONNECT_TIMEOUT="2")
    bad = poison(postgres_url)
    try:
        assert app.durable_ledger.record(record_for(0)) is True
        proxy.kill()
        assert app.durable_ledger.record(bad) is True  # spooled: the store did not answer
        for n in range(1, 4):
            assert app.durable_ledger.record(record_for(n)) is True
        assert app.durable_ledger.spool.pending() == 4
        proxy.start()
        assert app.durable_ledger.record(record_for(4)) is True  # replays what was spooled
        assert ledger_keys(app) == sorted(record_for(n).idempotency_key for n in range(5))
        assert app.durable_ledger.spool.pending() == 0
        held = app.durable_ledger.spool.held()
        assert [r.idempotency_key for r in held] == [bad.idempotency_key]
        assert "UntranslatableCharacter" in held[0].error
        assert "(field workflow_id)" in held[0].error
    finally:
        app.close()
        proxy.kill()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("workflow_id", "says"),
    [("wf\x00x", "NUL (0x00)"), ("wf\ud800x", "UnicodeEncodeError: surrogates not allowed")],
)
def test_a_budget_hold_for_a_value_the_store_refuses_says_so(
    tmp_path: Path, postgres_url: str, workflow_id: str, says: str
) -> None:
    """On SQLite a reservation's workflow id is compared in Python, never sent, so the same
    hold succeeds there; on PostgreSQL it is a statement's parameter."""
    app = app_for(tmp_path, postgres_url)
    try:
        app.budgets.set_budget("ws", "monthly", limit="1.00")
        with pytest.raises(StoreRefusedValue) as refused:
            app.budgets.reserve(
                BudgetReservation(
                    idempotency_key="r:a:1",
                    workspace_id="ws",
                    provider="openai",
                    model="gpt-4o-mini",
                    source=CredentialSource.PLATFORM,
                    amount=Decimal("0.10"),
                    list_cost=Decimal("0.10"),
                    workflow_id=workflow_id,
                )
            )
        message = str(refused.value)
        assert message.startswith(
            "the key store refused a value while reserving budget for workspace 'ws'"
        )
        assert says in message
        assert "did not answer" not in message
    finally:
        app.close()


def test_a_spooled_row_that_is_no_longer_a_record_is_held_too(
    tmp_path: Path, sqlite_url: str
) -> None:
    app = app_for(tmp_path, sqlite_url)
    try:
        spool = app.durable_ledger.spool
        spool.add(record_for(1), "down")
        spool.add(record_for(2), "down")
        conn = sqlite3.connect(spool.path)
        conn.execute(
            "UPDATE spooled_usage SET record = '{\"usage\": 1}' WHERE idempotency_key = ?",
            (record_for(1).idempotency_key,),
        )
        conn.commit()
        conn.close()
        result = app.durable_ledger.replay()
        assert (result.replayed, result.held, result.remaining, result.error) == (1, 1, 0, None)
        assert ledger_keys(app) == [record_for(2).idempotency_key]
        (held,) = spool.held()
        assert held.idempotency_key == record_for(1).idempotency_key
        assert "not a usage record" in held.error
        # the run ids of the other spooled and held rows are still read
        spool.add(record_for(3), "down")
        assert [c.idempotency_key for c in spool.recorded_calls(record_for(3).run_id or "")] == [
            record_for(3).idempotency_key
        ]
    finally:
        app.close()


def test_a_row_longer_than_the_sqlite_file_takes_is_the_rows_own_error(tmp_path: Path) -> None:
    """SQLite's direct ledger writer: "string or blob too big" (a DataError) is the row's own,
    like PostgreSQL's; the limit is lowered on the writer's connection to reach it."""
    app = app_for(tmp_path, f"sqlite:///{tmp_path / 'byok.db'}")
    try:
        app.ledger.count()  # the store is open
        writers = app.sqlite_writers
        assert writers is not None
        conn = writers.waiting.acquire()  # the connection a record off an event loop borrows
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 200)
        writers.waiting.release(conn)
        record = dataclasses.replace(record_for(70), workflow_id="w" * 300)
        with pytest.raises(StoreRefusedValue) as refused:
            app.ledger.record(record)
        assert not isinstance(refused.value, StoreUnavailable)
        assert "recording usage for workspace 'ws-0'" in str(refused.value)
        assert "DataError" in str(refused.value)
        assert app.ledger.count() == 0
    finally:
        app.close()
