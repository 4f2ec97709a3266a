"""The usage ledger and the per-workspace settings (fallback policy).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# exact money: NUMERIC on PostgreSQL, the decimal's text on SQLite (see byok_plugin.billing.ledger)
_MONEY = sa.Numeric(30, 12).with_variant(sa.String(64), "sqlite")
_COUNT = sa.BigInteger()


def upgrade() -> None:
    op.create_table(
        "byok_usage_ledger",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("workspace_id", sa.String(200), nullable=False),
        sa.Column("workflow_id", sa.String(200), nullable=True),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("block_id", sa.String(200), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(40), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(120), nullable=True),
        sa.Column("fallback", sa.Boolean(), nullable=False),
        sa.Column("input_tokens", _COUNT, nullable=False),
        sa.Column("cached_input_tokens", _COUNT, nullable=False),
        sa.Column("cache_write_tokens", _COUNT, nullable=False),
        sa.Column("output_tokens", _COUNT, nullable=False),
        sa.Column("reasoning_tokens", _COUNT, nullable=False),
        sa.Column("tool_requests", _COUNT, nullable=False),
        sa.Column("reported_cost", _MONEY, nullable=True),
        sa.Column("list_cost", _MONEY, nullable=True),
        sa.Column("amount", _MONEY, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("price_version", sa.String(200), nullable=True),
        sa.Column("breakdown", sa.Text(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "source IN ('block', 'workspace', 'platform')", name="ck_byok_usage_ledger_source"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_byok_usage_ledger"),
        sa.UniqueConstraint("idempotency_key", name="uq_byok_usage_ledger_idempotency_key"),
    )
    op.create_index(
        "ix_byok_usage_ledger_workspace_id_occurred_at",
        "byok_usage_ledger",
        ["workspace_id", "occurred_at"],
    )
    op.create_index("ix_byok_usage_ledger_occurred_at", "byok_usage_ledger", ["occurred_at"])
    op.create_table(
        "byok_workspace_settings",
        sa.Column("workspace_id", sa.String(200), nullable=False),
        sa.Column("fallback_policy", sa.String(16), server_default="never", nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "fallback_policy IN ('never', 'on_rate_limit', 'on_error')",
            name="ck_byok_workspace_settings_fallback_policy",
        ),
        sa.PrimaryKeyConstraint("workspace_id", name="pk_byok_workspace_settings"),
    )


def downgrade() -> None:
    op.drop_table("byok_workspace_settings")
    op.drop_index("ix_byok_usage_ledger_occurred_at", "byok_usage_ledger")
    op.drop_index("ix_byok_usage_ledger_workspace_id_occurred_at", "byok_usage_ledger")
    op.drop_table("byok_usage_ledger")
