"""An index on the ledger's run_id: a run started with a caller's run id first asks which calls
of that run are already recorded (``byok_recorded_calls``).

Revision ID: 0009
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_byok_usage_ledger_run_id", "byok_usage_ledger", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_byok_usage_ledger_run_id", "byok_usage_ledger")
