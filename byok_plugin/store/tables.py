"""The tables of the store, as SQLAlchemy Core metadata (the Alembic migrations create them).

Table names start with ``byok_`` because a host may keep them in its own database, next to its
own tables and its own Alembic history (ours is recorded in ``byok_alembic_version``).

Other parts of the package that need tables (the usage ledger) define them on this same
:data:`metadata` and add a new Alembic revision after the last one in
``byok_plugin/migrations/versions``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

__all__ = [
    "KEY_STATUSES",
    "UTCDateTime",
    "audit_events",
    "data_keys",
    "master_keys",
    "metadata",
    "workspace_keys",
]

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

KEY_STATUSES = ("enabled", "disabled")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        stamp: datetime = value
        if stamp.tzinfo is None:
            return stamp.replace(tzinfo=UTC)
        return stamp.astimezone(UTC)


workspace_keys = sa.Table(
    "byok_workspace_keys",
    metadata,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("workspace_id", sa.String(200), nullable=False),
    sa.Column("provider", sa.String(40), nullable=False),
    sa.Column("label", sa.String(64), nullable=False),
    # byok:v1:<master-key-id>:<base64(nonce || ciphertext || tag)>
    sa.Column("ciphertext", sa.Text, nullable=False),
    sa.Column("master_key_id", sa.String(64), nullable=False),
    # sk-pro...abcd
    sa.Column("hint", sa.String(32), nullable=False),
    # hs256:<32 hex>, keyed by the master key (see byok_plugin.core.crypto)
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="enabled"),
    sa.Column("created_by", sa.String(200), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("last_used_at", UTCDateTime, nullable=True),
    # shared by every worker: the key is skipped until then (after a 429 or an auth failure)
    sa.Column("cooldown_until", UTCDateTime, nullable=True),
    # why (rate_limit, auth, error): the fallback policy of every worker reads it (revision 0003)
    sa.Column("cooldown_reason", sa.String(16), nullable=True),
    sa.UniqueConstraint("workspace_id", "provider", "label"),
    sa.CheckConstraint("status IN ('enabled', 'disabled')", name="status"),
    sa.Index(None, "master_key_id"),
)

audit_events = sa.Table(
    "byok_audit_events",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("occurred_at", UTCDateTime, nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("workspace_id", sa.String(200), nullable=False),
    sa.Column("actor_id", sa.String(200), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("provider", sa.String(40), nullable=True),
    sa.Column("key_id", sa.String(80), nullable=True),
    sa.Column("detail", sa.Text, nullable=False, server_default=""),
    sa.Index(None, "workspace_id", "occurred_at"),
)

# Which master key ids this database has seen, with a check value (an HMAC of a fixed message
# under the key, which reveals nothing about it): a different key under a known id is then
# reported as "wrong master key", not as tampering, and is refused for new writes.
master_keys = sa.Table(
    "byok_master_keys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("check_value", sa.String(64), nullable=False),
    sa.Column("first_used_at", UTCDateTime, nullable=False),
)

# Envelope encryption (revision 0006): each workspace's data key, stored only wrapped by a
# key-encryption key (the local keyring, OpenBao/Vault Transit, AWS KMS...). Deleting a
# workspace's row destroys its data key: its stored provider keys can no longer be decrypted.
data_keys = sa.Table(
    "byok_data_keys",
    metadata,
    sa.Column("workspace_id", sa.String(200), primary_key=True),
    # who wrapped it (local, vault-transit, aws-kms, a plugin's name) and with which key
    sa.Column("kek_provider", sa.String(40), nullable=False),
    sa.Column("kek_id", sa.String(200), nullable=False),
    # base64 of the wrapped bytes
    sa.Column("wrapped", sa.Text, nullable=False),
    # an HMAC of a fixed message under the data key: which data key, without revealing it
    sa.Column("check_value", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("wrapped_at", UTCDateTime, nullable=False),
    sa.Index(None, "kek_provider", "kek_id"),
)
