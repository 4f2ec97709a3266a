"""Workspace keys, the audit trail and the master key check values.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "byok_workspace_keys",
        sa.Column("id", sa.String(80), nullable=False),
        sa.Column("workspace_id", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(40), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("master_key_id", sa.String(64), nullable=False),
        sa.Column("hint", sa.String(32), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), server_default="enabled", nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cooldown_until", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('enabled', 'disabled')", name="ck_byok_workspace_keys_status"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_byok_workspace_keys"),
        sa.UniqueConstraint(
            "workspace_id",
            "provider",
            "label",
            name="uq_byok_workspace_keys_workspace_id_provider_label",
        ),
    )
    op.create_index(
        "ix_byok_workspace_keys_master_key_id", "byok_workspace_keys", ["master_key_id"]
    )
    op.create_table(
        "byok_audit_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("workspace_id", sa.String(200), nullable=False),
        sa.Column("actor_id", sa.String(200), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(40), nullable=True),
        sa.Column("key_id", sa.String(80), nullable=True),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_byok_audit_events"),
    )
    op.create_index(
        "ix_byok_audit_events_workspace_id_occurred_at",
        "byok_audit_events",
        ["workspace_id", "occurred_at"],
    )
    op.create_table(
        "byok_master_keys",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("check_value", sa.String(64), nullable=False),
        sa.Column("first_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_byok_master_keys"),
    )


def downgrade() -> None:
    op.drop_table("byok_master_keys")
    op.drop_index("ix_byok_audit_events_workspace_id_occurred_at", "byok_audit_events")
    op.drop_table("byok_audit_events")
    op.drop_index("ix_byok_workspace_keys_master_key_id", "byok_workspace_keys")
    op.drop_table("byok_workspace_keys")
