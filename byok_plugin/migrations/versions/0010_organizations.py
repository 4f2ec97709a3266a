"""Organizations, and the last live check of every stored key (``byok_key_health``).

Organizations: an organization owns workspaces, which inherit its keys (stored in
``byok_workspace_keys`` under the owner id ``org:<id>``), and the ledger's ``organization`` source.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SOURCES_BEFORE = "source IN ('block', 'workspace', 'platform')"
_SOURCES = "source IN ('block', 'workspace', 'organization', 'platform')"


def upgrade() -> None:
    op.create_table(
        "byok_organizations",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_byok_organizations"),
    )
    op.create_table(
        "byok_organization_workspaces",
        sa.Column("workspace_id", sa.String(200), nullable=False),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("opted_out", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", name="pk_byok_organization_workspaces"),
    )
    op.create_index(
        "ix_byok_organization_workspaces_organization_id",
        "byok_organization_workspaces",
        ["organization_id"],
    )
    op.create_table(
        "byok_key_health",
        sa.Column("key_id", sa.String(80), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.String(500), nullable=False),
        sa.Column("auth_failures", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", name="pk_byok_key_health"),
    )
    # the ledger accepts the new credential source (SQLite rebuilds the table)
    with op.batch_alter_table("byok_usage_ledger") as batch:
        batch.drop_constraint("ck_byok_usage_ledger_source", type_="check")
        batch.create_check_constraint("ck_byok_usage_ledger_source", sa.text(_SOURCES))


def downgrade() -> None:
    with op.batch_alter_table("byok_usage_ledger") as batch:
        batch.drop_constraint("ck_byok_usage_ledger_source", type_="check")
        batch.create_check_constraint("ck_byok_usage_ledger_source", sa.text(_SOURCES_BEFORE))
    op.drop_table("byok_key_health")
    op.drop_index("ix_byok_organization_workspaces_organization_id", "byok_organization_workspaces")
    op.drop_table("byok_organization_workspaces")
    op.drop_table("byok_organizations")
