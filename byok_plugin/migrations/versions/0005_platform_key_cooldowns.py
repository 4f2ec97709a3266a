"""Platform-key cooldowns in the store, so that every worker skips a key the provider refused.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "byok_platform_key_cooldowns",
        sa.Column("provider", sa.String(40), nullable=False),
        sa.Column("key_id", sa.String(200), nullable=False),
        sa.Column("cooldown_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("provider", "key_id", name="pk_byok_platform_key_cooldowns"),
    )


def downgrade() -> None:
    op.drop_table("byok_platform_key_cooldowns")
