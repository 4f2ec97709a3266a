"""The store: SQLAlchemy engine, tables, migrations and the repositories over them.

May import: byok_plugin.core.
"""

from __future__ import annotations

from byok_plugin.store.audit_repo import AuditStore
from byok_plugin.store.engine import create_store_engine, describe_url, normalize_url
from byok_plugin.store.keys_repo import KeyInfo, KeyStore, NewKey, StoredKey
from byok_plugin.store.migrate import ensure_migrated, upgrade

__all__ = [
    "AuditStore",
    "KeyInfo",
    "KeyStore",
    "NewKey",
    "StoredKey",
    "create_store_engine",
    "describe_url",
    "ensure_migrated",
    "normalize_url",
    "upgrade",
]
