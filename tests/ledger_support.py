"""Helpers for the ledger tests: deterministic usage records, and the multi-process worker.

Not a test module; the worker lives here so that spawned processes import something small.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from byok_hookspecs import Charge, CredentialSource, Usage, UsageRecord

SOURCES = (CredentialSource.WORKSPACE, CredentialSource.PLATFORM, CredentialSource.BLOCK)
START = datetime(2026, 11, 1, tzinfo=UTC)


def record_for(n: int, *, workspace: str | None = None) -> UsageRecord:
    """The record of call number ``n``: the same content whoever writes it."""
    source = SOURCES[n % 3]
    amount = Decimal(n) / Decimal(10**9) if source is CredentialSource.PLATFORM else Decimal(0)
    list_cost = Decimal(n) / Decimal(10**9)
    return UsageRecord(
        idempotency_key=f"run-{n // 10}:block-{n % 10}:attempt-1",
        workspace_id=workspace or f"ws-{n % 7}",
        usage=Usage(
            "openai",
            "gpt-4o",
            input_tokens=n,
            cached_input_tokens=n % 5,
            output_tokens=2 * n,
            reasoning_tokens=n % 3,
        ),
        charge=Charge(
            amount=amount,
            reason={0: "byok", 1: "platform", 2: "block_key"}[n % 3],
            list_cost=list_cost,
            breakdown=(("input", list_cost),),
            price_version="test-1",
        ),
        source=source,
        key_id=f"key_{n % 4}",
        workflow_id="wf",
        run_id=f"run-{n // 10}",
        block_id=f"block-{n % 10}",
        attempt=1,
        occurred_at=START + timedelta(hours=n),
    )


def concurrent_record_worker(
    database_url: str, home: str, barrier: Any, numbers: list[int]
) -> dict[str, int]:
    """Record calls ``numbers`` after every worker reached the barrier; count what was new."""
    from byok_plugin.app import App
    from byok_plugin.settings import Settings

    app = App(Settings.from_environ({"BYOK_HOME": home, "BYOK_DATABASE_URL": database_url}))
    ledger = app.ledger  # connect and migrate before the start line
    barrier.wait(timeout=120)
    inserted = skipped = 0
    for n in numbers:
        if ledger.record(record_for(n)):
            inserted += 1
        else:
            skipped += 1
    app.close()
    return {"inserted": inserted, "skipped": skipped}
