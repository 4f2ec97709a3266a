"""The usage ledger: schema, one row per idempotency key, exact money, and concurrent writers."""

from __future__ import annotations

import importlib.util
import multiprocessing
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    Charge,
    Credential,
    CredentialSource,
    Usage,
    UsageRecord,
)
from ledger_support import concurrent_record_worker, record_for
from migration_support import model_differences

from byok_plugin.app import App
from byok_plugin.billing.ledger import usage_ledger
from byok_plugin.core.errors import StoreRefusedValue, StoreUnavailable
from byok_plugin.manager import plugin_manager_for
from byok_plugin.resolution.workspace_settings import workspace_settings
from byok_plugin.settings import Settings
from byok_plugin.store import create_store_engine, ensure_migrated
from byok_plugin.store.migrate import current_revision, head_revision

ROOT = Path(__file__).resolve().parents[1]
MY_TABLES = {usage_ledger.name, workspace_settings.name}


def _app(database_url: str, home: Path, **extra: str) -> App:
    return App(
        Settings.from_environ({"BYOK_HOME": str(home), "BYOK_DATABASE_URL": database_url, **extra})
    )


def test_revision_0002_creates_the_ledger_and_settings_tables_as_modelled(
    database_url: str,
) -> None:
    engine = create_store_engine(database_url)
    try:
        ensure_migrated(engine)
        assert current_revision(engine) == head_revision()  # 0002 or a later revision
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= MY_TABLES
            assert model_differences(conn, MY_TABLES) == []
    finally:
        engine.dispose()


def test_a_record_is_written_once_and_read_back_exactly(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    try:
        ledger = app.ledger
        record = UsageRecord(
            idempotency_key="run-1:block-a:attempt-2",
            workspace_id="acme",
            usage=Usage(
                "anthropic",
                "claude-sonnet-4-5",
                input_tokens=3_000,
                cached_input_tokens=20_000,
                cache_write_tokens=10_000,
                output_tokens=800,
                reasoning_tokens=1_200,
            ),
            charge=Charge(
                amount=Decimal("0.099000000001"),
                reason="platform",
                list_cost=Decimal("0.0825"),
                breakdown=(("input", Decimal("0.009")), ("output", Decimal("0.0735"))),
                price_version="2026-11-27+sha256:abc",
            ),
            source=CredentialSource.PLATFORM,
            key_id="env:ANTHROPIC_API_KEY_2",
            fallback=True,
            workflow_id="wf-1",
            run_id="run-1",
            block_id="block-a",
            attempt=2,
            occurred_at=datetime(2026, 11, 27, 10, 30, 15, 123456, tzinfo=UTC),
        )
        assert ledger.record(record) is True
        assert ledger.record(record) is False  # the retry: no second row
        changed = replace(record, charge=replace(record.charge, amount=Decimal(7)))
        assert ledger.record(changed) is False  # the first write stands
        assert ledger.count() == 1
        row = ledger.get("run-1:block-a:attempt-2")
        assert row is not None
        assert row.amount == Decimal("0.099000000001")
        assert row.list_cost == Decimal("0.0825")
        assert row.reported_cost is None
        assert row.breakdown == (("input", Decimal("0.009")), ("output", Decimal("0.0735")))
        assert (row.source, row.key_id, row.fallback) == (
            CredentialSource.PLATFORM,
            "env:ANTHROPIC_API_KEY_2",
            True,
        )
        assert (row.workspace_id, row.workflow_id, row.run_id, row.block_id, row.attempt) == (
            "acme",
            "wf-1",
            "run-1",
            "block-a",
            2,
        )
        assert (row.provider, row.model) == ("anthropic", "claude-sonnet-4-5")
        assert (
            row.input_tokens,
            row.cached_input_tokens,
            row.cache_write_tokens,
            row.output_tokens,
            row.reasoning_tokens,
            row.tool_requests,
        ) == (3_000, 20_000, 10_000, 800, 1_200, 0)
        assert row.price_version == "2026-11-27+sha256:abc"
        assert row.occurred_at == record.occurred_at
        assert row.currency == "USD"
        assert row.reason == "platform"
    finally:
        app.close()


def test_money_is_exact_on_every_backend(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    try:
        amounts = [Decimal("0.000000000001") * (i + 1) + Decimal("0.1") for i in range(300)]
        for i, amount in enumerate(amounts):
            record = record_for(i)
            app.ledger.record(replace(record, charge=replace(record.charge, amount=amount)))
        rows = list(app.ledger.rows())
        assert [r.amount for r in rows] == amounts
        assert sum(r.amount for r in rows) == sum(amounts)  # no float anywhere
        assert sum(amounts) == Decimal("30.000000045150")
        # a Decimal below a trillionth is rounded half-even to 12 places, never to a float
        record = replace(
            record_for(999),
            charge=replace(record_for(999).charge, amount=Decimal("1.0000000000005")),
        )
        app.ledger.record(record)
        assert app.ledger.get(record.idempotency_key).amount == Decimal("1.000000000000")
    finally:
        app.close()


def test_rows_filter_by_workspace_and_time(sqlite_url: str, tmp_path: Path) -> None:
    app = _app(sqlite_url, tmp_path)
    try:
        for n in range(70):
            app.ledger.record(record_for(n))
        since = datetime(2026, 11, 2, tzinfo=UTC)  # record n happened at 2026-11-01 + n hours
        until = datetime(2026, 11, 3, tzinfo=UTC)
        rows = list(app.ledger.rows(workspaces=["ws-3"], since=since, until=until))
        assert [r.input_tokens for r in rows] == [n for n in range(24, 48) if n % 7 == 3]
        assert all(since <= r.occurred_at < until for r in rows)
    finally:
        app.close()


def test_the_direct_sqlite_writer_stores_what_a_sqlalchemy_insert_stores(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = _app(sqlite_url, tmp_path)
    try:
        assert app.ledger._writer is not None  # a SQLite file: the direct sqlite3 insert
        when = datetime(2026, 11, 27, 10, 30, 15, 123456, tzinfo=UTC)
        for n in (1, 2, 3):  # a platform, a block and a workspace call
            record = replace(record_for(n), fallback=n == 1)
            assert app.ledger.record(record) is True
            values = app.ledger.values(replace(record, idempotency_key=f"sa-{n}"), when)
            with app.engine.begin() as conn:
                conn.execute(usage_ledger.insert(), values)
        assert app.ledger.record(record_for(1)) is False
        with sqlite3.connect(app.engine.url.database) as raw:
            stored = {
                key: row
                for key, *row in raw.execute(
                    "SELECT idempotency_key, workspace_id, provider, source, key_id, fallback, "
                    "input_tokens, reasoning_tokens, list_cost, amount, reported_cost, breakdown, "
                    "occurred_at, typeof(occurred_at), typeof(amount), typeof(fallback) "
                    f"FROM {usage_ledger.name}"
                )
            }
        assert len(stored) == 6
        for n in (1, 2, 3):
            direct, through_sqlalchemy = stored[record_for(n).idempotency_key], stored[f"sa-{n}"]
            # recorded_at differs (the ledger's clock): occurred_at is the record's in both
            assert direct == through_sqlalchemy
    finally:
        app.close()


def test_the_direct_sqlite_writer_reports_a_broken_store_as_unavailable(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = _app(sqlite_url, tmp_path)
    try:
        app.ledger.record(record_for(1))
        with app.engine.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE {usage_ledger.name} RENAME TO moved"))
        with pytest.raises(StoreUnavailable, match=r"recording usage.*no such table"):
            app.ledger.record(record_for(2))
    finally:
        app.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"idempotency_key": ""}, "idempotency_key must be a non-empty string"),
        ({"idempotency_key": "x" * 256}, "256 characters"),
        ({"occurred_at": datetime(2026, 11, 27)}, "aware datetime"),
    ],
)
def test_bad_records_are_refused_with_a_reason(
    sqlite_url: str, tmp_path: Path, change: dict, message: str
) -> None:
    app = _app(sqlite_url, tmp_path)
    try:
        with pytest.raises(ValueError, match=message):
            app.ledger.record(replace(record_for(1), **change))
        assert app.ledger.count() == 0
    finally:
        app.close()


def test_hook_byok_record_usage_writes_the_default_charge(sqlite_url: str, tmp_path: Path) -> None:
    app = _app(sqlite_url, tmp_path, BYOK_CHARGE_MULTIPLIER="1.5")
    pm = plugin_manager_for(app, load_entrypoints=False)
    try:
        usage = Usage("openai", "gpt-4o-mini", input_tokens=10_000, output_tokens=1_000)
        for source, key_id in [
            (CredentialSource.WORKSPACE, "key_abc12345678"),
            (CredentialSource.PLATFORM, "env:OPENAI_API_KEY_1"),
        ]:
            credential = Credential(
                api_key="sk-not-a-real-key-000000", provider="openai", source=source, key_id=key_id
            )
            charge = pm.hook.byok_compute_charge(usage=usage, credential=credential)
            pm.hook.byok_record_usage(
                record=UsageRecord(
                    idempotency_key=f"run-7:b1:{source.value}",
                    workspace_id="acme",
                    usage=usage,
                    charge=charge,
                    source=source,
                    key_id=key_id,
                )
            )
        byok = app.ledger.get("run-7:b1:workspace")
        platform = app.ledger.get("run-7:b1:platform")
        # 10,000 x $0.15 + 1,000 x $0.60 per 1M = $0.0021
        assert (byok.amount, byok.reason, byok.list_cost) == (
            Decimal(0),
            "byok",
            Decimal("0.0021"),
        )
        assert (platform.amount, platform.reason) == (Decimal("0.00315"), "platform")
        assert platform.price_version == "2026-12-05"
    finally:
        app.close()


def _fee_plugin():
    """The test plugin distribution's module (tests/plugins/byok-fee-plugin), imported by path."""
    path = ROOT / "tests" / "plugins" / "byok-fee-plugin" / "byok_fee_plugin" / "__init__.py"
    spec = importlib.util.spec_from_file_location("byok_fee_plugin_for_ledger_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_fee_plugin_replaces_the_default_charge_and_the_ledger_shows_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The 5% BYOK fee plugin registered by hand (its entry-point install is tested elsewhere)."""
    app = _app(sqlite_url, tmp_path)
    pm = plugin_manager_for(app, load_entrypoints=False)
    pm.register(_fee_plugin())
    try:
        usage = Usage("openai", "gpt-4.1", input_tokens=1_000_000, output_tokens=100_000)
        credential = Credential(
            api_key="sk-not-a-real-key-000000",
            provider="openai",
            source=CredentialSource.WORKSPACE,
            key_id="key_fee12345678",
        )
        charge = pm.hook.byok_compute_charge(usage=usage, credential=credential)
        record = UsageRecord("run-1:b:1", "acme", usage, charge, CredentialSource.WORKSPACE)
        pm.hook.byok_record_usage(record=record)
        row = app.ledger.get("run-1:b:1")
        # list price $2.80 (1M x $2 + 0.1M x $8); 5% of it is $0.14
        assert row.list_cost == Decimal("2.80")
        assert row.amount == Decimal("0.14")
        assert row.reason == "byok_fee"
        assert ("byok fee 5%", Decimal("0.140000")) in row.breakdown
    finally:
        app.close()


def _concurrent(database_url: str, tmp_path: Path, workers: int, per_worker: int, step: int):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(workers)
    jobs = [list(range(w * step, w * step + per_worker)) for w in range(workers)]
    with ctx.Pool(workers) as pool:
        pending = [
            pool.apply_async(concurrent_record_worker, (database_url, str(tmp_path), barrier, job))
            for job in jobs
        ]
        results = [p.get(timeout=300) for p in pending]
    return jobs, results


def _check_concurrent(database_url: str, tmp_path: Path, jobs, results) -> None:
    distinct = sorted({n for job in jobs for n in job})
    assert sum(r["inserted"] for r in results) == len(distinct)  # each key inserted once
    assert sum(r["inserted"] + r["skipped"] for r in results) == sum(len(j) for j in jobs)
    app = _app(database_url, tmp_path)
    try:
        rows = list(app.ledger.rows())
        keys = [r.idempotency_key for r in rows]
        assert len(keys) == len(set(keys)) == len(distinct)  # no lost and no double rows
        assert sorted(r.input_tokens for r in rows) == distinct  # every call, as written
        expected = sum(record_for(n).charge.amount for n in distinct)
        assert sum(r.amount for r in rows) == expected
    finally:
        app.close()


@pytest.mark.postgres
def test_eight_processes_with_overlapping_keys_into_postgresql(
    postgres_url: str, tmp_path: Path
) -> None:
    # 8 real processes x 500 records; worker w writes calls [250w, 250w + 500): every call but
    # the first and last 250 is written by two processes at once
    jobs, results = _concurrent(postgres_url, tmp_path, workers=8, per_worker=500, step=250)
    assert sum(len(j) for j in jobs) == 4000
    assert sum(r["skipped"] for r in results) == 4000 - 2250
    _check_concurrent(postgres_url, tmp_path, jobs, results)


def test_concurrent_processes_into_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    jobs, results = _concurrent(sqlite_url, tmp_path, workers=4, per_worker=150, step=75)
    _check_concurrent(sqlite_url, tmp_path, jobs, results)


def test_a_postgresql_group_stores_what_a_sqlalchemy_insert_stores(
    postgres_url: str, tmp_path: Path
) -> None:
    """The group insert (one JSON text read by ``json_populate_recordset``) against the
    SQLAlchemy insert of the same values: every column equal, money exact to 12 places (and
    rounded half-even past them, as the column rounds), times with their offsets, NULLs, text
    that JSON must escape; a value too long for its column fails the whole group, as an INSERT
    fails, instead of being cut."""
    app = _app(postgres_url, tmp_path)
    try:
        group = app.ledger._group_insert
        assert group is not None
        when = datetime(2026, 11, 27, 10, 30, 15, 123456, tzinfo=UTC)
        odd = replace(
            record_for(5),
            charge=replace(
                record_for(5).charge,
                amount=Decimal("1.0000000000005"),  # past 12 places: rounded by the column
                breakdown=(('in"put\\\n\u00e9\u2603', Decimal("0.000000000001")),),
                price_version=None,
            ),
            usage=replace(record_for(5).usage, reported_cost=Decimal("123456.5")),
            workflow_id='wf \u00e9\u4e2d\u6587\U0001f600 "quoted" \\back',
            run_id=None,
            block_id=None,
            estimated=("input_tokens",),
        )
        records = [*(record_for(n) for n in (1, 2, 3)), odd]
        assert app.ledger.record_many(records) == 4
        assert app.ledger.record_many(records) == 0  # recorded already: nothing new
        with app.engine.begin() as conn:
            conn.execute(
                usage_ledger.insert(),
                [
                    app.ledger.values(replace(r, idempotency_key=f"sa-{r.idempotency_key}"), when)
                    for r in records
                ],
            )
        columns = [c for c in usage_ledger.c if c.name not in ("id", "idempotency_key")]
        with app.engine.connect() as conn:
            stored = {
                row[0]: row[1:]
                for row in conn.execute(sa.select(usage_ledger.c.idempotency_key, *columns))
            }
        recorded_at = [c.name for c in columns].index("recorded_at")
        for record in records:
            group_row = list(stored[record.idempotency_key])
            plain_row = list(stored[f"sa-{record.idempotency_key}"])
            del group_row[recorded_at], plain_row[recorded_at]  # the ledger's clock, not ours
            assert group_row == plain_row
        row = app.ledger.get(odd.idempotency_key)
        assert row is not None
        assert row.amount == Decimal("1.000000000000")
        assert row.reported_cost == Decimal("123456.5")
        assert row.workflow_id == odd.workflow_id
        assert row.breakdown == odd.charge.breakdown
        assert row.occurred_at == odd.occurred_at

        too_long = replace(record_for(40), workflow_id="w" * 201)  # the column holds 200
        # the row's own error (a DataError), not the store being down
        with pytest.raises(
            StoreRefusedValue, match=r"refused a value while recording usage.*Truncation"
        ):
            app.ledger.record_many([record_for(41), too_long])
        assert app.ledger.get(record_for(41).idempotency_key) is None  # nothing of the group
    finally:
        app.close()


def test_the_largest_charge_the_bounds_allow_is_priced_and_stored_exactly(
    database_url: str, tmp_path: Path
) -> None:
    # every rate at the price file's maximum, every count at the most a provider's answer may
    # report (two usage fields can add into one count), the largest multiplier: the charge
    # still rounds, fits NUMERIC(30, 12) and reads back as written (10^16 dollars once failed
    # to round at all)
    import json

    from byok_plugin.billing.pricing import _MAX_PRICE, _RATE_FIELDS
    from byok_plugin.host.providers.base import MAX_TOKEN_COUNT, MAX_TOOL_USES
    from byok_plugin.settings import MAX_CHARGE_MULTIPLIER

    prices = tmp_path / "prices.json"
    top = str(_MAX_PRICE)
    prices.write_text(
        json.dumps(
            {
                "version": "top",
                "models": {"anthropic/claude-top": dict.fromkeys(_RATE_FIELDS, top)},
                "tools": {
                    f"anthropic/{tool}": {"per_request": top}
                    for tool in ("web_fetch", "web_search")
                },
            }
        )
    )
    app = _app(
        database_url,
        tmp_path,
        BYOK_PRICE_FILE=str(prices),
        BYOK_CHARGE_MULTIPLIER=str(MAX_CHARGE_MULTIPLIER),
    )
    pm = plugin_manager_for(app, load_entrypoints=False)
    try:
        most = 2 * MAX_TOKEN_COUNT
        usage = Usage(
            "anthropic",
            "claude-top",
            input_tokens=most,
            cached_input_tokens=most,
            cache_write_tokens=most,
            cache_write_1h_tokens=most,
            output_tokens=most,
            reasoning_tokens=most,
            input_audio_tokens=most,
            output_audio_tokens=most,
            tool_uses=(("web_fetch", MAX_TOOL_USES), ("web_search", MAX_TOOL_USES)),
        )
        credential = Credential(
            api_key="sk-not-a-real-key-000000",
            provider="anthropic",
            source=CredentialSource.PLATFORM,
            key_id="env:ANTHROPIC_API_KEY",
        )
        charge = pm.hook.byok_compute_charge(usage=usage, credential=credential)
        # 8 counts x 2e10 tokens x $1 a token, 2 tools x 1e4 requests x $1e6, times 1000
        assert charge.list_cost == Decimal(8 * most + 2 * MAX_TOOL_USES * 10**6)
        assert charge.amount == charge.list_cost * MAX_CHARGE_MULTIPLIER
        pm.hook.byok_record_usage(
            record=UsageRecord(
                idempotency_key="run-top:b1",
                workspace_id="acme",
                usage=usage,
                charge=charge,
                source=CredentialSource.PLATFORM,
                key_id=credential.key_id,
            )
        )
        stored = app.ledger.get("run-top:b1")
        assert (stored.amount, stored.list_cost) == (charge.amount, charge.list_cost)
    finally:
        app.close()


# --- a key another workspace recorded is refused, never taken as "already recorded" ------------
# Keys are the host's to choose (the reference runner derives them from run ids, which callers
# choose). Taking another workspace's row as this call's would leave the call unrecorded and
# uncharged: the ledger refuses it instead, and the durable ledger holds it aside.

OWNER, GUEST = "tenant-owner-7f3", "tenant-guest"


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    built = _app(database_url, tmp_path)
    yield built
    built.close()


def test_a_key_recorded_for_another_workspace_is_refused_and_held_aside(app: App) -> None:
    pm = plugin_manager_for(app, load_entrypoints=False)
    owners = record_for(5, workspace=OWNER)
    pm.hook.byok_record_usage(record=owners)
    guests = replace(record_for(6, workspace=GUEST), idempotency_key=owners.idempotency_key)
    with pytest.raises(StoreRefusedValue) as refused:
        pm.hook.byok_record_usage(record=guests)
    message = str(refused.value)
    assert GUEST in message
    assert "idempotency_key" in message
    assert "another workspace" in message
    assert OWNER not in message  # never says whose key it is
    # the owner's row is as it was, the guest's call is not lost: held aside for an operator
    row = app.ledger.get(owners.idempotency_key)
    assert row is not None
    assert (row.workspace_id, row.input_tokens) == (OWNER, 5)
    assert app.ledger.count() == 1
    held = app.durable_ledger.spool.held()
    assert [(h.idempotency_key, h.workspace_id) for h in held] == [(owners.idempotency_key, GUEST)]
    # a retry of it is refused again (not replayed into the owner's row)
    with pytest.raises(StoreRefusedValue):
        app.ledger.record(guests)
    # the same workspace recording the same key again is what idempotency is for
    pm.hook.byok_record_usage(record=owners)
    assert app.ledger.record(owners) is False
    assert app.ledger.count() == 1


def test_a_group_with_another_workspaces_key_writes_the_rest(app: App) -> None:
    pm = plugin_manager_for(app, load_entrypoints=False)
    owners = record_for(5, workspace=OWNER)
    app.ledger.record(owners)
    guests = [
        record_for(11, workspace=GUEST),
        replace(record_for(12, workspace=GUEST), idempotency_key=owners.idempotency_key),
        record_for(13, workspace=GUEST),
    ]
    # the store's group form refuses the group (in a transaction: nothing of it is written;
    # autocommitted on PostgreSQL: the others' rows are)...
    with pytest.raises(StoreRefusedValue, match="another workspace"):
        app.ledger.record_many(guests)
    # ...and the hook writes the others one by one, and holds the refused one aside
    with pytest.raises(StoreRefusedValue, match=GUEST):
        pm.hook.byok_record_usage_batch(records=guests)
    for record in (guests[0], guests[2]):
        row = app.ledger.get(record.idempotency_key)
        assert row is not None
        assert row.workspace_id == GUEST
    assert app.ledger.get(owners.idempotency_key).workspace_id == OWNER  # type: ignore[union-attr]
    assert app.ledger.count() == 3
    assert [h.workspace_id for h in app.durable_ledger.spool.held()] == [GUEST]
