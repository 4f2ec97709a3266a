"""The ledger keeps 1-hour cache writes, the provider tools a call used, what had no price, and
whether the call completed (``status``: complete, interrupted, uncertain).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # constant server defaults: a plain ADD COLUMN on SQLite and PostgreSQL (no table rewrite);
    # rows written before this revision used neither 1-hour cache writes nor priced tools
    op.add_column(
        "byok_usage_ledger",
        sa.Column("cache_write_1h_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.add_column(
        "byok_usage_ledger",
        sa.Column("tool_uses", sa.Text(), nullable=False, server_default="{}"),
    )
    op.add_column(
        "byok_usage_ledger",
        sa.Column("unpriced", sa.Text(), nullable=False, server_default="[]"),
    )
    op.add_column(
        "byok_usage_ledger",
        sa.Column("status", sa.String(16), nullable=False, server_default="complete"),
    )


def downgrade() -> None:
    with op.batch_alter_table("byok_usage_ledger") as batch:  # SQLite rebuilds the table
        batch.drop_column("status")
        batch.drop_column("unpriced")
        batch.drop_column("tool_uses")
        batch.drop_column("cache_write_1h_tokens")
