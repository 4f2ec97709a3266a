"""Load with faults: N worker processes run workflows on PostgreSQL while the store fails.

    BYOK_TEST_POSTGRES_URL=postgresql+psycopg://... python tests/load/ledger_faults.py \\
        [--workers 4] [--runs 1000] [--concurrency 8]

It creates a fresh database on that server (dropped at the end; the server itself is never
stopped), starts the provider emulator, stores BYOK keys for one workspace and platform keys for
another, and starts the workers (real processes, spawn), each running one-block workflows (half
BYOK, half platform-billed) through the real plugin. Meanwhile it injects, in a loop: the ledger
refusing writes (a trigger that raises), the ledger locked by another session for longer than
the statement timeout, and every connection of the workers killed (``pg_terminate_backend``, as
a server restart does). Then it replays the local spool, re-submits what the run results carry
as unrecorded (what a host does), and prints: calls, provider 200s, ledger rows, lost,
duplicated, double-charged. Exit status 1 when anything was lost, duplicated or double-charged.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ONE_BLOCK = {
    "name": "load",
    "version": "1",
    "blocks": {"answer": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Say hello."}},
    "edges": [],
}


def worker(environ: dict[str, str], index: int, runs: int, concurrency: int) -> dict[str, Any]:
    """Run ``runs`` workflows, ``concurrency`` at a time; every call the results carry."""
    from byok_plugin.app import App
    from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE
    from byok_plugin.host.runner import WorkflowRunner
    from byok_plugin.host.workflow import parse_workflow
    from byok_plugin.manager import plugin_manager_for
    from byok_plugin.settings import Settings

    app = App(Settings.from_environ(environ))
    pm = plugin_manager_for(app)
    workflow = parse_workflow(ONE_BLOCK)
    calls: list[tuple[str, bool, str, str]] = []
    unrecorded: list[Any] = []
    errors: Counter[str] = Counter()

    async def go() -> None:
        async with WorkflowRunner.open(pm, environ=environ) as runner:
            for start in range(0, runs, concurrency):
                batch = range(start, min(start + concurrency, runs))
                results = await asyncio.gather(
                    *(
                        runner.run(
                            workflow,
                            workspace_id=PLATFORM_WORKSPACE if n % 2 else BYOK_WORKSPACE,
                            run_id=f"w{index}-r{n}",
                        )
                        for n in batch
                    )
                )
                for result in results:
                    for call in result.calls:
                        calls.append(
                            (
                                call.idempotency_key,
                                call.recorded,
                                call.source.value,
                                str(call.charge.amount),
                            )
                        )
                        if not call.recorded:
                            unrecorded.append(call.usage_record())
                    if not result.ok:
                        error = result.error or ""
                        kind = (
                            "refused before sent (recording down)"
                            if "refused before it is sent" in error
                            else "unrecorded"
                            if "could not be recorded" in error
                            else error.split(":", 2)[-1].strip()[:70]
                        )
                        errors[kind] += 1

    asyncio.run(go())
    durable = app.durable_ledger
    app.close()
    return {
        "calls": calls,
        "unrecorded": unrecorded,
        "errors": dict(errors),
        "spooled": durable.spooled,
        "replayed": durable.replayed,
    }


def inject_faults(database_url: str, stop: threading.Event, log: list[str]) -> None:
    """Until ``stop``, every 0.5 s in turn: refuse ledger writes for 1 s, lock the ledger for
    2 s (twice the statement timeout), kill every connection to the database."""
    from tests.spool_support import accept_ledger_writes, refuse_ledger_writes

    name = make_url(database_url).database
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    locker = sa.create_engine(database_url, poolclass=NullPool)
    try:
        while not stop.wait(0.5):
            refuse_ledger_writes(database_url)
            log.append("refuse")
            stop.wait(1.0)
            accept_ledger_writes(database_url)
            if stop.wait(0.5):
                break
            with locker.connect() as conn, conn.begin():
                conn.execute(sa.text("LOCK TABLE byok_usage_ledger IN ACCESS EXCLUSIVE MODE"))
                log.append("lock")
                stop.wait(2.0)
            if stop.wait(0.5):
                break
            with admin.connect() as conn:
                killed = conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": name},
                ).scalar_one()
            log.append(f"kill:{killed}")
    finally:
        admin.dispose()
        locker.dispose()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1000, help="runs per worker")
    parser.add_argument("--concurrency", type=int, default=8, help="runs at once per worker")
    parser.add_argument("--postgres", default=os.environ.get("BYOK_TEST_POSTGRES_URL"))
    args = parser.parse_args(argv)
    if not args.postgres:
        parser.error("give --postgres URL or set BYOK_TEST_POSTGRES_URL (a CREATEDB role)")

    from byok_plugin.app import App
    from byok_plugin.cli.demo import BYOK_WORKSPACE, DemoStack
    from byok_plugin.host.emulator import EmulatorServer
    from byok_plugin.settings import Settings

    db = f"byok_load_{secrets.token_hex(4)}"
    server = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
    url = make_url(args.postgres).set(database=db).render_as_string(hide_password=False)
    try:
        with tempfile.TemporaryDirectory(prefix="byok-load-") as tmp, EmulatorServer() as emu:
            stack = DemoStack(
                Path(tmp) / "home",
                emu,
                database_url=url,
                extra_env={
                    "BYOK_DB_STATEMENT_TIMEOUT": "1",
                    "BYOK_DB_POOL_SIZE": "4",
                    "BYOK_DB_MAX_OVERFLOW": "4",
                    "BYOK_KEY_COOLDOWN_SECONDS": "0",
                },
            )
            stack.store_workspace_keys(BYOK_WORKSPACE)
            stack.app.ledger.count()
            stack.close()
            stop, faults = threading.Event(), []
            injector = threading.Thread(target=inject_faults, args=(url, stop, faults))
            started = time.monotonic()
            injector.start()
            ctx = multiprocessing.get_context("spawn")
            try:
                with ctx.Pool(args.workers) as pool:
                    pending = [
                        pool.apply_async(worker, (stack.environ, i, args.runs, args.concurrency))
                        for i in range(args.workers)
                    ]
                    results = [p.get(timeout=1800) for p in pending]
            finally:
                stop.set()
                injector.join()
            elapsed = time.monotonic() - started
            app = App(Settings.from_environ(stack.environ))
            try:
                spooled = app.durable_ledger.spool.pending()
                replay = app.durable_ledger.replay()
                calls = [c for r in results for c in r["calls"]]
                completed = {c[0] for c in calls}
                before = {row.idempotency_key for row in app.ledger.rows()}
                lost_before = len(completed - before)
                for r in results:  # the host re-submits what the results carry unrecorded
                    for record in r["unrecorded"]:
                        app.durable_ledger.record(record)
                rows = list(app.ledger.rows())
            finally:
                app.close()
            keys = Counter(row.idempotency_key for row in rows)
            per_block = Counter((row.run_id, row.block_id) for row in rows)
            charged = Counter((row.run_id, row.block_id) for row in rows if row.amount > 0)
            provider_200 = sum(1 for c in emu.calls() if c.method == "POST" and c.status == 200)
            lost = len(completed - set(keys))
            duplicated = sum(n - 1 for n in keys.values() if n > 1) + sum(
                n - 1 for n in per_block.values() if n > 1
            )
            double_charged = sum(1 for n in charged.values() if n > 1)
            errors: Counter[str] = Counter()
            for r in results:
                errors.update(r["errors"])
            print(f"workers {args.workers}, runs {args.workers * args.runs}, {elapsed:.1f} s")
            print(f"faults injected: {Counter(f.split(':')[0] for f in faults)}")
            print(f"calls completed (in run results): {len(calls)}")
            print(f"provider 200s: {provider_200}")
            print(
                f"unrecorded in results (re-submitted by the host): "
                f"{sum(len(r['unrecorded']) for r in results)}"
            )
            print(
                f"spooled by the workers: {sum(r['spooled'] for r in results)}, replayed by "
                f"them: {sum(r['replayed'] for r in results)}, replayed at the end: "
                f"{replay.replayed} of {spooled} (+{replay.already_recorded} already there)"
            )
            print(f"ledger rows: {len(rows)}")
            print(f"lost before the host re-submitted: {lost_before}")
            print(f"lost: {lost}")
            print(f"duplicated: {duplicated}")
            print(f"double-charged: {double_charged}")
            print(f"provider 200s without a ledger row: {provider_200 - len(rows)}")
            for kind, n in errors.most_common():
                print(f"failed runs: {n} {kind}")
            return 1 if lost or duplicated or double_charged else 0
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        server.dispose()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
