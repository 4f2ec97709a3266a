"""The ledger says which usage counts of a call are estimated from the request, not reported by
the provider (``estimated``: the input of an uncertain call, or of an interrupted OpenAI or
Mistral stream), and keeps audio tokens in and out apart (priced at their own rates).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # a constant server default: a plain ADD COLUMN on SQLite and PostgreSQL (no table rewrite);
    # rows written before this revision carry no estimate
    op.add_column(
        "byok_usage_ledger",
        sa.Column("estimated", sa.Text(), nullable=False, server_default="[]"),
    )
    for name in ("input_audio_tokens", "output_audio_tokens"):
        op.add_column(
            "byok_usage_ledger",
            sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"),
        )


def downgrade() -> None:
    with op.batch_alter_table("byok_usage_ledger") as batch:  # SQLite rebuilds the table
        batch.drop_column("output_audio_tokens")
        batch.drop_column("input_audio_tokens")
        batch.drop_column("estimated")
