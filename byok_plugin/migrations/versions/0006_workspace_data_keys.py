"""Envelope encryption: each workspace's data key, stored wrapped by a key-encryption key.

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # a new table only: stored keys keep their form until `byok keys rewrap` moves them
    op.create_table(
        "byok_data_keys",
        sa.Column("workspace_id", sa.String(200), nullable=False),
        sa.Column("kek_provider", sa.String(40), nullable=False),
        sa.Column("kek_id", sa.String(200), nullable=False),
        sa.Column("wrapped", sa.Text(), nullable=False),
        sa.Column("check_value", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("wrapped_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", name="pk_byok_data_keys"),
    )
    op.create_index(
        "ix_byok_data_keys_kek_provider_kek_id", "byok_data_keys", ["kek_provider", "kek_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_byok_data_keys_kek_provider_kek_id", table_name="byok_data_keys")
    op.drop_table("byok_data_keys")
