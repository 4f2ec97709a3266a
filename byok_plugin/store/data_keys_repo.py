"""The repository of workspace data keys (envelope encryption): wrapped keys in, wrapped keys out.

Only wrapped data keys pass here; unwrapping is the key-encryption provider's, through the
``byok_unwrap_data_key`` hook (:mod:`byok_plugin.keys.envelope`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from byok_hookspecs import WrappedDataKey
from sqlalchemy.engine import Engine

from byok_plugin.core.crypto import ENVELOPE_MASTER_KEY_ID
from byok_plugin.core.errors import KeyringError
from byok_plugin.store.engine import store_errors, write_transaction
from byok_plugin.store.key_events import notify_key_change
from byok_plugin.store.keys_repo import _insert_ignore
from byok_plugin.store.tables import data_keys, workspace_keys

__all__ = ["DataKeyStore", "StoredDataKey"]

_d = data_keys


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class StoredDataKey:
    """A workspace's wrapped data key, as stored."""

    workspace_id: str
    wrapped: WrappedDataKey
    created_at: datetime
    wrapped_at: datetime
    #: identifies the data key without revealing it (:attr:`byok_plugin.core.crypto.DataKey.check_value`)
    check_value: str = ""


def _stored(row: sa.Row[Any]) -> StoredDataKey:
    m = row._mapping
    try:
        blob = base64.b64decode(m["wrapped"], validate=True)
        wrapped = WrappedDataKey(m["kek_provider"], m["kek_id"], blob)
    except (binascii.Error, ValueError):
        raise KeyringError(
            f"the stored data key of workspace {m['workspace_id']!r} is malformed (not base64 "
            f"of a wrapped key); it was altered in the database"
        ) from None
    return StoredDataKey(
        m["workspace_id"], wrapped, m["created_at"], m["wrapped_at"], m["check_value"]
    )


def _encoded(wrapped: WrappedDataKey) -> str:
    return base64.b64encode(wrapped.blob).decode("ascii")


class DataKeyStore:
    """Reads and writes ``byok_data_keys``.

    :param engine: a migrated engine.
    :param clock: returns the current aware UTC datetime.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._engine = engine
        self._clock = clock

    def __repr__(self) -> str:
        return f"DataKeyStore(dialect={self._engine.dialect.name!r})"

    def get(self, workspace_id: str) -> StoredDataKey | None:
        with (
            store_errors("reading the workspace data key", workspace_id=workspace_id),
            self._engine.connect() as conn,
        ):
            row = conn.execute(sa.select(_d).where(_d.c.workspace_id == workspace_id)).first()
        return _stored(row) if row is not None else None

    def add(self, workspace_id: str, wrapped: WrappedDataKey, check_value: str) -> StoredDataKey:
        """Store a workspace's first data key, unless another writer stored one first: the
        stored one (the first) is returned either way, and the caller uses that one."""
        now = self._clock()
        with (
            store_errors("storing the workspace data key", workspace_id=workspace_id),
            write_transaction(self._engine) as conn,
        ):
            _insert_ignore(
                conn,
                _d,
                {
                    "workspace_id": workspace_id,
                    "kek_provider": wrapped.provider,
                    "kek_id": wrapped.key_id,
                    "wrapped": _encoded(wrapped),
                    "check_value": check_value,
                    "created_at": now,
                    "wrapped_at": now,
                },
                key_column="workspace_id",
            )
            row = conn.execute(sa.select(_d).where(_d.c.workspace_id == workspace_id)).one()
        return _stored(row)

    def delete_workspace(self, workspace_id: str) -> tuple[int, bool]:
        """Crypto-shredding: delete a workspace's stored keys and its data key in one
        transaction. :returns: ``(keys deleted, whether a data key was destroyed)``."""
        with (
            store_errors("deleting the workspace's keys", workspace_id=workspace_id),
            write_transaction(self._engine) as conn,
        ):
            # the data key first: a key being stored under it holds its row (FOR SHARE, see
            # KeyStore.put) until it commits, and is then deleted by the statement below
            shredded = conn.execute(sa.delete(_d).where(_d.c.workspace_id == workspace_id))
            keys = conn.execute(
                sa.delete(workspace_keys).where(workspace_keys.c.workspace_id == workspace_id)
            ).rowcount
            if keys:
                notify_key_change(conn, workspace_id, None)
        return int(keys), bool(shredded.rowcount)

    def count_by_kek(self) -> dict[str, int]:
        """Data keys per ``provider:key-id`` that wraps them."""
        with store_errors("counting data keys"), self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(_d.c.kek_provider, _d.c.kek_id, sa.func.count())
                .group_by(_d.c.kek_provider, _d.c.kek_id)
                .order_by(_d.c.kek_provider, _d.c.kek_id)
            ).all()
        return {f"{row[0]}:{row[1]}": int(row[2]) for row in rows}

    def kms_protected(self, local: str = "local") -> tuple[str, ...]:
        """The providers other than ``local`` (KMSs) that wrap the data key of some stored key,
        sorted: what a worker that writes outside the KMS would downgrade."""
        wk = workspace_keys
        query = (
            sa.select(_d.c.kek_provider)
            .distinct()
            .select_from(wk.join(_d, wk.c.workspace_id == _d.c.workspace_id))
            .where(_d.c.kek_provider != local, wk.c.master_key_id == ENVELOPE_MASTER_KEY_ID)
            .order_by(_d.c.kek_provider)
        )
        with store_errors("reading which KMS protects the keys"), self._engine.connect() as conn:
            return tuple(str(provider) for provider in conn.execute(query).scalars())

    def batch_not_under(
        self, provider: str, kek_id: str, *, after: str | None, limit: int
    ) -> list[StoredDataKey]:
        """Up to ``limit`` data keys not wrapped by ``provider``'s ``kek_id``, by workspace."""
        query = sa.select(_d).where(sa.or_(_d.c.kek_provider != provider, _d.c.kek_id != kek_id))
        if after is not None:
            query = query.where(_d.c.workspace_id > after)
        query = query.order_by(_d.c.workspace_id).limit(limit)
        with store_errors("reading data keys to rewrap"), self._engine.connect() as conn:
            return [_stored(row) for row in conn.execute(query).all()]

    def swap(self, old: StoredDataKey, new: WrappedDataKey) -> bool:
        """Replace a wrapped data key (same data key, new key-encryption key), unless it changed
        or was deleted since it was read. :returns: whether it was replaced."""
        with (
            store_errors("rewrapping a data key", workspace_id=old.workspace_id),
            write_transaction(self._engine) as conn,
        ):
            result = conn.execute(
                sa.update(_d)
                .where(
                    _d.c.workspace_id == old.workspace_id,
                    _d.c.wrapped == _encoded(old.wrapped),
                    _d.c.kek_provider == old.wrapped.provider,
                    _d.c.kek_id == old.wrapped.key_id,
                )
                .values(
                    kek_provider=new.provider,
                    kek_id=new.key_id,
                    wrapped=_encoded(new),
                    wrapped_at=self._clock(),
                )
            )
        return bool(result.rowcount)
