"""Workspace budgets, and the holds that calls in flight keep on them (issue 16).

Revision ID: 0007
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "byok_budgets",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("workspace_id", sa.String(200), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(16), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("hard", sa.Boolean(), nullable=False),
        sa.Column("limit_units", sa.BigInteger(), nullable=False),
        sa.Column("spent_units", sa.BigInteger(), nullable=False),
        sa.Column("reserved_units", sa.BigInteger(), nullable=False),
        sa.Column("thresholds", sa.String(64), nullable=False),
        sa.Column("alerted", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(120), nullable=True),
        sa.Column("workflow_id", sa.String(200), nullable=True),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("metric IN ('charge', 'list_cost')", name="ck_byok_budgets_metric"),
        sa.CheckConstraint("period IN ('day', 'month', 'none')", name="ck_byok_budgets_period"),
        sa.PrimaryKeyConstraint("id", name="pk_byok_budgets"),
        sa.UniqueConstraint("workspace_id", "name", name="uq_byok_budgets_workspace_id_name"),
    )
    op.create_table(
        "byok_budget_holds",
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("budget_id", sa.String(40), nullable=False),
        sa.Column("workspace_id", sa.String(200), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.Column("spent_units", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('held', 'expired', 'settled')",
            name="ck_byok_budget_holds_state",
        ),
        sa.ForeignKeyConstraint(
            ["budget_id"],
            ["byok_budgets.id"],
            name="fk_byok_budget_holds_budget_id_byok_budgets",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("idempotency_key", "budget_id", name="pk_byok_budget_holds"),
    )
    op.create_index(
        "ix_byok_budget_holds_workspace_id_state_expires_at",
        "byok_budget_holds",
        ["workspace_id", "state", "expires_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_byok_budget_holds_workspace_id_state_expires_at", "byok_budget_holds")
    op.drop_table("byok_budget_holds")
    op.drop_table("byok_budgets")
