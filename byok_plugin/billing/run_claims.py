"""Run ids claimed by the runs in flight, across every worker of the store (revision 0012).

A caller may choose a run id (``WorkflowRunner.run(run_id=...)``, ``byok run --run-id``), and a
run's calls are recorded under idempotency keys made of it (``run:block:attempt``). Two workers
given the same id at once would both make the run's calls, and the ledger keeps the first record
of a key: the other worker's calls would be made, and never recorded nor charged. The runner
therefore claims the id here before the run's first call (``byok_claim_run``), extends the claim
while the run goes on, and gives it back when the run ends (``byok_release_run``). A worker that
dies mid-run leaves its claim until it lapses; the next run of that id then takes it over.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from byok_plugin.store.engine import store_errors, write_transaction
from byok_plugin.store.tables import UTCDateTime, metadata

__all__ = ["RunClaims", "run_claims"]

run_claims = sa.Table(
    "byok_run_claims",
    metadata,
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("workspace_id", sa.String(200), nullable=False),
    sa.Column("claimant", sa.String(64), nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)


class RunClaims:
    """Claims, extends and releases run ids in ``byok_run_claims``."""

    def __init__(
        self, engine: Engine, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._engine = engine
        self._clock = clock
        dialect = engine.dialect.name
        self._insert = (
            postgresql.insert(run_claims) if dialect == "postgresql" else sqlite.insert(run_claims)
        )

    def __repr__(self) -> str:
        return f"RunClaims(dialect={self._engine.dialect.name!r})"

    def claim(self, run_id: str, workspace_id: str, claimant: str, seconds: float) -> bool:
        """Claim ``run_id`` for ``seconds``, or extend the claim ``claimant`` already holds.

        :returns: ``True`` when the id is the claimant's (new, extended, or taken over from a
            claim that lapsed), ``False`` when another claimant holds it.
        :raises StoreUnavailable: the store did not answer.
        """
        now = self._clock()
        t = run_claims
        insert = self._insert.values(
            run_id=run_id,
            workspace_id=workspace_id,
            claimant=claimant,
            expires_at=now + timedelta(seconds=seconds),
        )
        # one conditional statement: two workers claiming at once cannot both win
        statement = insert.on_conflict_do_update(
            index_elements=[t.c.run_id],
            set_={
                "workspace_id": insert.excluded.workspace_id,
                "claimant": insert.excluded.claimant,
                "expires_at": insert.excluded.expires_at,
            },
            where=sa.or_(t.c.claimant == insert.excluded.claimant, t.c.expires_at <= now),
        ).returning(t.c.run_id)
        with (
            store_errors(f"claiming run id {run_id!r}", workspace_id=workspace_id),
            write_transaction(self._engine) as conn,
        ):
            return conn.execute(statement).first() is not None

    def release(self, run_id: str, claimant: str) -> None:
        """Give ``run_id`` back, if ``claimant`` holds it.

        :raises StoreUnavailable: the store did not answer (the claim then lapses).
        """
        t = run_claims
        with (
            store_errors(f"releasing run id {run_id!r}"),
            write_transaction(self._engine) as conn,
        ):
            conn.execute(sa.delete(t).where(t.c.run_id == run_id, t.c.claimant == claimant))
