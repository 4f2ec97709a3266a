"""No completed call is lost: the local ledger spool, on a real SQLite file and real PostgreSQL.

With the store refusing every ledger write (see ``spool_support``), records go to the spool in
``BYOK_HOME``; once the store takes writes again they are replayed, by the same process, by a
later one and by ``byok ledger replay``: every record ends up in the ledger exactly once. While
neither the store nor the spool can take a row, platform-billed calls are refused before they
are sent, and the run's result carries the usage of the call that could not be recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from byok_hookspecs import CredentialSource
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from byok_plugin.app import App
from byok_plugin.billing.spool import (
    DurableLedger,
    LedgerSpool,
    SpoolUnavailable,
    record_from_json,
    record_to_json,
)
from byok_plugin.cli import main
from byok_plugin.cli.demo import BYOK_WORKSPACE, OPERATOR, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.run_result import BlockStatus, RunResult, RunStatus
from byok_plugin.host.workflow import parse_workflow
from byok_plugin.settings import Settings
from tests.ledger_support import record_for
from tests.spool_support import (
    TcpProxy,
    accept_ledger_writes,
    make_unwritable,
    refuse_ledger_writes,
)

ROOT = Path(__file__).resolve().parents[1]

ONE_BLOCK = {
    "name": "one-block",
    "version": "1",
    "blocks": {"answer": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Say hello."}},
    "edges": [],
}


def app_for(home: Path, database_url: str, **env: str) -> App:
    return App(
        Settings.from_environ({"BYOK_HOME": str(home), "BYOK_DATABASE_URL": database_url, **env})
    )


def ledger_keys(app: App) -> list[str]:
    return sorted(r.idempotency_key for r in app.ledger.rows())


def test_a_record_survives_its_trip_through_the_spool_unchanged() -> None:
    for n in range(12):
        record = record_for(n)
        assert record_from_json(record_to_json(record)) == record


def test_a_store_refusing_writes_spools_every_record_and_a_replay_lands_each_once(
    tmp_path: Path, database_url: str
) -> None:
    app = app_for(tmp_path, database_url)
    try:
        assert app.durable_ledger.record(record_for(0)) is True
        refuse_ledger_writes(database_url)
        with pytest.raises(StoreUnavailable):  # the store itself refuses
            app.ledger.record(record_for(1))
        for n in range(1, 21):
            assert app.durable_ledger.record(record_for(n)) is True
        # a host that records the same call twice spools it once
        assert app.durable_ledger.record(record_for(5)) is False
        assert app.durable_ledger.spool.pending() == 20
        assert ledger_keys(app) == [record_for(0).idempotency_key]
        assert not app.durable_ledger.recording_down()
        accept_ledger_writes(database_url)
        # the next record the store takes replays what this process spooled
        assert app.durable_ledger.record(record_for(21)) is True
        assert app.durable_ledger.spool.pending() == 0
        assert ledger_keys(app) == sorted(record_for(n).idempotency_key for n in range(22))
        for n in (3, 7, 20):  # the rows are the records, field for field
            row = app.ledger.get(record_for(n).idempotency_key)
            assert row is not None
            assert (row.amount, row.list_cost, row.input_tokens, row.source) == (
                record_for(n).charge.amount,
                record_for(n).charge.list_cost,
                n,
                record_for(n).source,
            )
            assert row.occurred_at == record_for(n).occurred_at
    finally:
        app.close()


def test_a_later_process_replays_the_spool_and_a_second_replay_writes_nothing(
    tmp_path: Path, database_url: str
) -> None:
    app = app_for(tmp_path, database_url)
    try:
        app.durable_ledger.record(record_for(0))
        refuse_ledger_writes(database_url)
        for n in range(1, 11):
            app.durable_ledger.record(record_for(n))
        # one of them did land before the store went away (a write whose answer was lost)
        accept_ledger_writes(database_url)
        assert app.ledger.record(record_for(4)) is True
    finally:
        app.close()
    env = {
        **os.environ,
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": database_url,
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "byok_plugin", "ledger", "replay", "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["replayed"], report["already_recorded"], report["remaining"]) == (9, 1, 0)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["replayed"] == 0
    later = app_for(tmp_path, database_url)
    try:
        assert ledger_keys(later) == sorted(record_for(n).idempotency_key for n in range(11))
        assert later.durable_ledger.spool.pending() == 0
    finally:
        later.close()


def test_a_new_process_replays_what_an_earlier_one_spooled_at_its_first_record(
    tmp_path: Path, database_url: str
) -> None:
    first = app_for(tmp_path, database_url)
    try:
        first.ledger.count()  # the store is migrated before the trigger goes in
        refuse_ledger_writes(database_url)
        for n in range(6):
            first.durable_ledger.record(record_for(n))
    finally:
        first.close()
    accept_ledger_writes(database_url)
    second = app_for(tmp_path, database_url)
    try:
        second.durable_ledger.record(record_for(6))
        assert ledger_keys(second) == sorted(record_for(n).idempotency_key for n in range(7))
    finally:
        second.close()


def test_a_sqlite_file_unwritable_when_the_ledger_connected_does_not_stay_read_only(
    tmp_path: Path, sqlite_url: str
) -> None:
    first = app_for(tmp_path, sqlite_url)
    first.ledger.count()  # created and migrated
    first.close()
    database = Path(sqlite_url.removeprefix("sqlite:///"))
    app = app_for(tmp_path, sqlite_url, BYOK_LEDGER_SPOOL=str(tmp_path / "spool" / "s.db"))
    undo = make_unwritable(database)
    try:
        # SQLite opens the file read-only: the row goes to the spool
        assert app.durable_ledger.record(record_for(1)) is True
        assert app.durable_ledger.spool.pending() == 1
    finally:
        undo()
    try:
        # writable again: the read-only connection is not lent again, the row lands and the
        # spooled one is replayed
        assert app.durable_ledger.record(record_for(2)) is True
        assert app.durable_ledger.spool.pending() == 0
        assert ledger_keys(app) == sorted(record_for(n).idempotency_key for n in (1, 2))
    finally:
        app.close()


@pytest.mark.postgres
def test_the_postgres_server_gone_spools_every_record_and_they_land_once_it_is_back(
    tmp_path: Path, postgres_url: str
) -> None:
    target = make_url(postgres_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    proxy.start()
    app = app_for(tmp_path, proxy.url(postgres_url), BYOK_DB_CONNECT_TIMEOUT="2")
    try:
        assert app.durable_ledger.record(record_for(0)) is True
        proxy.kill()  # every connection reset, no new one accepted
        for n in range(1, 11):
            assert app.durable_ledger.record(record_for(n)) is True
        assert app.durable_ledger.spool.pending() == 10
        proxy.start()  # back, on the same port
        assert app.durable_ledger.record(record_for(11)) is True
        assert app.durable_ledger.spool.pending() == 0
        assert ledger_keys(app) == sorted(record_for(n).idempotency_key for n in range(12))
    finally:
        app.close()
        proxy.kill()


def test_replay_with_the_store_still_refusing_says_so_and_keeps_every_row(
    tmp_path: Path, sqlite_url: str
) -> None:
    app = app_for(tmp_path, sqlite_url)
    try:
        app.durable_ledger.record(record_for(0))
        refuse_ledger_writes(sqlite_url)
        for n in range(1, 4):
            app.durable_ledger.record(record_for(n))
    finally:
        app.close()
    env = {**os.environ, "BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": sqlite_url}
    done = subprocess.run(
        [sys.executable, "-m", "byok_plugin", "ledger", "replay"],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "the replay stopped" in done.stderr
    assert "recording usage" in done.stderr
    assert "Traceback" not in done.stderr
    assert "3 still spooled" in done.stdout
    assert LedgerSpool(tmp_path / "ledger-spool.db").pending() == 3
    # what waits, even with the store down (the spool alone is read)
    shown = CliRunner().invoke(
        main,
        ["ledger", "spool", "--json"],
        env={"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"},
    )
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["pending"] == 3


def test_when_neither_store_nor_spool_takes_a_row_the_record_fails_and_names_both(
    tmp_path: Path, sqlite_url: str
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    app = app_for(tmp_path, sqlite_url, BYOK_LEDGER_SPOOL=str(blocker / "spool.db"))
    try:
        app.ledger.count()
        refuse_ledger_writes(sqlite_url)
        with pytest.raises(SpoolUnavailable) as caught:
            app.durable_ledger.record(record_for(1))
        message = str(caught.value)
        assert "recording usage" in message
        assert str(blocker / "spool.db") in message
        assert app.durable_ledger.recording_down()
    finally:
        app.close()


def test_recording_comes_back_up_when_the_spool_can_be_written_again(tmp_path: Path) -> None:
    clock = [0.0]
    blocker = tmp_path / "spool-dir"
    blocker.write_text("")

    def refuse(record: object) -> bool:
        raise StoreUnavailable("recording usage", cause="test")

    durable = DurableLedger(refuse, LedgerSpool(blocker / "spool.db"), clock=lambda: clock[0])
    with pytest.raises(SpoolUnavailable):
        durable.record(record_for(1))
    assert durable.recording_down()
    blocker.unlink()
    blocker.mkdir()
    assert durable.recording_down()  # not probed again within the second
    clock[0] += 1.5
    assert not durable.recording_down()
    assert durable.record(record_for(1)) is True
    assert durable.spool.pending() == 1


# --- through the runner and the real plugin -----------------------------------------------------


@pytest.fixture
def broken_stack(
    emulator: EmulatorServer, tmp_path: Path, database_url: str
) -> Iterator[tuple[DemoStack, Path]]:
    """A stack whose ledger refuses writes and whose spool's directory is a file."""
    blocker = tmp_path / "spool-dir"
    blocker.write_text("")
    stack = DemoStack(
        tmp_path / "home",
        emulator,
        database_url=database_url,
        extra_env={"BYOK_LEDGER_SPOOL": str(blocker / "spool.db")},
    )
    stack.store_workspace_keys(BYOK_WORKSPACE)
    stack.app.ledger.count()  # migrated before the trigger goes in
    refuse_ledger_writes(database_url)
    yield stack, blocker
    stack.close()


def model_calls(emulator: EmulatorServer) -> int:
    return len([c for c in emulator.calls() if c.method == "POST"])


def test_spend_stops_when_recording_stops_and_no_completed_call_is_lost(
    broken_stack: tuple[DemoStack, Path], database_url: str
) -> None:
    stack, blocker = broken_stack
    workflow = parse_workflow(ONE_BLOCK)
    # 1. the call completes, but neither the store nor the spool takes its usage: the result
    # carries it, unrecorded, for the host to re-submit
    first = stack.run(workflow, PLATFORM_WORKSPACE, {})
    assert first.status is RunStatus.FAILED
    answer = first.blocks["answer"]
    assert answer.status is BlockStatus.FAILED
    assert "could not be recorded" in (answer.error or "")
    (lost,) = first.unrecorded
    assert lost.source is CredentialSource.PLATFORM
    assert lost.charge.amount > 0
    assert lost.usage.total_tokens > 0
    assert first.to_dict()["totals"]["unrecorded"] == 1
    assert first.to_dict()["blocks"][0]["calls"][0]["recorded"] is False
    assert model_calls(stack.emulator) == 1
    # 2. nothing can be recorded: platform-billed calls are refused before they are sent, and
    # so are BYOK calls (the operator has not allowed them)
    for workspace in (PLATFORM_WORKSPACE, BYOK_WORKSPACE):
        refused = stack.run(workflow, workspace, {})
        assert refused.status is RunStatus.FAILED
        error = refused.blocks["answer"].error or ""
        assert "refused before it is sent" in error
        assert f"workspace {workspace!r}" in error
        assert refused.calls == ()
    assert model_calls(stack.emulator) == 1
    # 3. the spool can be written again (checked at most once a second): calls run and spool
    blocker.unlink()
    blocker.mkdir()
    stack.app.durable_ledger._probed_at -= 2  # as if a second had passed
    spooled = [stack.run(workflow, PLATFORM_WORKSPACE, {}) for _ in range(3)]
    assert all(r.ok for r in spooled), [r.error for r in spooled]
    assert all(c.recorded for r in spooled for c in r.calls)
    assert stack.app.durable_ledger.spool.pending() == 3
    # 4. the store answers again; the host re-submits the call it holds, twice for good measure
    accept_ledger_writes(database_url)
    for _ in range(2):
        stack.pm.hook.byok_record_usage(record=lost.usage_record())
    assert stack.app.durable_ledger.spool.pending() == 0
    expected = sorted(
        [lost.idempotency_key] + [c.idempotency_key for r in spooled for c in r.calls]
    )
    assert ledger_keys(stack.app) == expected
    assert stack.app.ledger.count() == 4
    assert model_calls(stack.emulator) == 4
    row = stack.app.ledger.get(lost.idempotency_key)
    assert row is not None
    assert row.amount == lost.charge.amount


def test_byok_calls_may_run_unrecorded_when_the_operator_allows_it(
    emulator: EmulatorServer, tmp_path: Path, sqlite_url: str
) -> None:
    blocker = tmp_path / "spool-dir"
    blocker.write_text("")
    stack = DemoStack(
        tmp_path / "home",
        emulator,
        database_url=sqlite_url,
        extra_env={
            "BYOK_LEDGER_SPOOL": str(blocker / "spool.db"),
            "BYOK_ALLOW_UNRECORDED_BYOK": "1",
        },
    )
    try:
        stack.store_workspace_keys(BYOK_WORKSPACE)
        stack.app.ledger.count()
        refuse_ledger_writes(sqlite_url)
        workflow = parse_workflow(ONE_BLOCK)
        assert stack.run(workflow, PLATFORM_WORKSPACE, {}).unrecorded  # recording goes down
        byok = stack.run(workflow, BYOK_WORKSPACE, {})
        assert [c.source for c in byok.unrecorded] == [CredentialSource.WORKSPACE]
        platform = stack.run(workflow, PLATFORM_WORKSPACE, {})
        assert "refused before it is sent" in (platform.blocks["answer"].error or "")
        assert model_calls(emulator) == 2
    finally:
        stack.close()


def test_a_run_id_whose_calls_went_to_the_spool_is_refused_when_reused(
    emulator: EmulatorServer, tmp_path: Path, database_url: str
) -> None:
    from byok_plugin.cli.run import run_workflow
    from byok_plugin.host.runner import RunIdInUse

    stack = DemoStack(tmp_path / "home", emulator, database_url=database_url)
    try:
        workflow = parse_workflow(ONE_BLOCK)
        stack.app.ledger.count()  # migrated before the trigger goes in
        refuse_ledger_writes(database_url)

        def run(workspace: str) -> RunResult:
            return asyncio.run(
                run_workflow(
                    stack.pm,
                    workflow,
                    workspace_id=workspace,
                    inputs={},
                    environ=stack.environ,
                    actor=OPERATOR,
                    run_id="run-spooled",
                )
            )

        first = run(PLATFORM_WORKSPACE)
        assert first.ok, first.error
        assert stack.app.durable_ledger.spool.pending() == 1
        sent = model_calls(emulator)
        # the call is in the spool, not the ledger: the run id is used all the same
        with pytest.raises(RunIdInUse, match="already has 1 recorded calls"):
            run(PLATFORM_WORKSPACE)
        with pytest.raises(RunIdInUse, match="another workspace"):
            run("initech")
        assert model_calls(emulator) == sent
        accept_ledger_writes(database_url)
        assert stack.app.durable_ledger.replay().replayed == 1
        assert ledger_keys(stack.app) == ["run-spooled:answer:1"]
        with pytest.raises(RunIdInUse, match="already has 1 recorded calls"):
            run(PLATFORM_WORKSPACE)
    finally:
        stack.close()


def test_an_unreadable_spool_is_said_loudly_when_a_record_would_replay_it(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # a spool file whose pages are damaged (or that is not SQLite at all) may hold the only trace
    # of completed calls: the replay a record triggers reports it at ERROR, not silently
    spool = tmp_path / "spool.db"
    spool.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    app = app_for(tmp_path, sqlite_url, BYOK_LEDGER_SPOOL=str(spool))
    try:
        with caplog.at_level(logging.ERROR, logger="byok"):
            assert app.durable_ledger.record(record_for(1)) is True  # the store takes the row
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert any("could not be replayed" in r.getMessage() for r in errors), caplog.text
        assert str(spool) in caplog.text
    finally:
        app.close()
