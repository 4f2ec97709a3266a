"""Run ids claimed by the runs in flight (``byok_run_claims``): two workers given the same run id
at once must not both make its calls, of which only one would be recorded.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "byok_run_claims",
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("workspace_id", sa.String(200), nullable=False),
        sa.Column("claimant", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_byok_run_claims"),
    )


def downgrade() -> None:
    op.drop_table("byok_run_claims")
