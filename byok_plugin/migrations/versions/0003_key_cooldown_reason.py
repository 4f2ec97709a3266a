"""Why a workspace key is cooling down, stored with the cooldown so every worker reads it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # nullable, no default: a plain ADD COLUMN on SQLite and PostgreSQL (no table rewrite); a
    # cooldown written before this revision has no reason, which resolution reads as "error"
    op.add_column("byok_workspace_keys", sa.Column("cooldown_reason", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("byok_workspace_keys") as batch:  # SQLite rebuilds the table
        batch.drop_column("cooldown_reason")
