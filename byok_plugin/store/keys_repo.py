"""The repository of stored workspace keys: rows in, rows out; no plaintext ever passes here.

Encryption happens before :meth:`KeyStore.put` and decryption after a read
(:mod:`byok_plugin.keys.access`); this module only sees ciphertexts, hints and fingerprints.

The limit of :data:`MAX_KEYS_PER_PROVIDER` keys per (workspace, provider) and the uniqueness of
labels hold under concurrent writers: every write to a (workspace, provider) takes a
transaction-scoped lock first (PostgreSQL ``pg_advisory_xact_lock``; on SQLite the transaction's
``BEGIN IMMEDIATE`` write lock), then reads the rows, checks, and writes. Under READ COMMITTED,
the read after the lock sees every row committed by the previous holder, so count-then-insert is
safe. The unique constraint on (workspace, provider, label) stays as a backstop.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from byok_plugin.core.crypto import KeyBinding, MasterKey
from byok_plugin.core.errors import (
    DataKeyUnavailable,
    DuplicateKey,
    KeyLimitReached,
    KeyringError,
)
from byok_plugin.store.engine import (
    lock_in_transaction,
    retry_deadlocks,
    store_errors,
    write_transaction,
)
from byok_plugin.store.key_events import notify_key_change, notify_keys_changed
from byok_plugin.store.tables import data_keys, master_keys, workspace_keys

__all__ = [
    "MAX_KEYS_PER_PROVIDER",
    "KeyInfo",
    "KeyStore",
    "NewKey",
    "StoredKey",
    "new_key_id",
]

MAX_KEYS_PER_PROVIDER = 10

_t = workspace_keys
_INFO_COLUMNS = (
    _t.c.id,
    _t.c.workspace_id,
    _t.c.provider,
    _t.c.label,
    _t.c.hint,
    _t.c.fingerprint,
    _t.c.status,
    _t.c.master_key_id,
    _t.c.created_by,
    _t.c.created_at,
    _t.c.updated_by,
    _t.c.updated_at,
    _t.c.last_used_at,
    _t.c.cooldown_until,
    _t.c.cooldown_reason,
)
_ORDER = (_t.c.created_at, _t.c.id)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def new_key_id() -> str:
    """A random, unguessable key id such as ``key_Xf3...``: safe to show, log and put in URLs."""
    return "key_" + secrets.token_urlsafe(12)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown of a stored key: masked, with no ciphertext and no secret."""

    id: str
    workspace_id: str
    provider: str
    label: str
    hint: str
    fingerprint: str
    status: str
    master_key_id: str
    created_by: str | None
    created_at: datetime
    updated_by: str | None
    updated_at: datetime
    last_used_at: datetime | None
    cooldown_until: datetime | None
    #: why the key is cooling down (``rate_limit``, ``auth``, ``error``); ``None`` if unknown
    cooldown_reason: str | None = None

    @property
    def enabled(self) -> bool:
        return self.status == "enabled"

    def in_cooldown(self, now: datetime) -> bool:
        return self.cooldown_until is not None and self.cooldown_until > now

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings."""
        out: dict[str, Any] = {}
        for name in KeyInfo.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        return out


@dataclass(frozen=True, slots=True)
class StoredKey(KeyInfo):
    """A stored key's row, ciphertext included (never in ``repr``). Decrypt it with
    :meth:`byok_plugin.keys.access.KeyAccess.reveal`."""

    ciphertext: str = field(default="", repr=False)

    @property
    def binding(self) -> KeyBinding:
        return KeyBinding(self.workspace_id, self.provider, self.id)

    def info(self) -> KeyInfo:
        values = asdict(self)
        values.pop("ciphertext")
        return KeyInfo(**values)


@dataclass(frozen=True, slots=True)
class NewKey:
    """A row to insert, already encrypted for its own id."""

    id: str
    workspace_id: str
    provider: str
    label: str
    ciphertext: str = field(repr=False)
    master_key_id: str
    hint: str
    fingerprint: str
    actor_id: str | None


def _info(row: sa.Row[*tuple[Any, ...]]) -> KeyInfo:
    return KeyInfo(**{c.name: row._mapping[c.name] for c in _INFO_COLUMNS})


def _stored(row: sa.Row[*tuple[Any, ...]]) -> StoredKey:
    mapping = row._mapping
    return StoredKey(
        **{c.name: mapping[c.name] for c in _INFO_COLUMNS}, ciphertext=mapping["ciphertext"]
    )


def _insert_ignore(
    conn: Connection, table: sa.Table, values: dict[str, Any], *, key_column: str = "id"
) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(postgresql.insert(table).values(**values).on_conflict_do_nothing())
    elif conn.dialect.name == "sqlite":
        conn.execute(sqlite.insert(table).values(**values).on_conflict_do_nothing())
    else:  # pragma: no cover - other backends
        exists = conn.execute(
            sa.select(sa.literal(1))
            .select_from(table)
            .where(table.c[key_column] == values[key_column])
        ).first()
        if exists is None:
            conn.execute(table.insert().values(**values))


class KeyStore:
    """Reads and writes ``byok_workspace_keys`` (and the master key check values).

    :param engine: a migrated engine (see :func:`byok_plugin.store.migrate.ensure_migrated`).
    :param clock: returns the current aware UTC datetime.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = _utc_now,
        max_keys_per_provider: int = MAX_KEYS_PER_PROVIDER,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self.max_keys_per_provider = max_keys_per_provider
        self._usable = (
            sa.select(*_INFO_COLUMNS, _t.c.ciphertext)
            .where(
                _t.c.workspace_id == sa.bindparam("workspace_id"),
                _t.c.provider == sa.bindparam("provider"),
                _t.c.status == "enabled",
            )
            .order_by(*_ORDER)
        )

    def __repr__(self) -> str:
        return f"KeyStore(dialect={self._engine.dialect.name!r})"

    @property
    def engine(self) -> Engine:
        return self._engine

    # --- reads -----------------------------------------------------------------------------

    def usable_keys(self, workspace_id: str, provider: str) -> list[StoredKey]:
        """The enabled keys of a (workspace, provider), oldest first, cooldowns included (the
        caller decides what a cooldown means at its "now")."""
        with (
            store_errors("reading enabled keys", workspace_id=workspace_id, provider=provider),
            self._engine.connect() as conn,
        ):
            rows = conn.execute(
                self._usable, {"workspace_id": workspace_id, "provider": provider}
            ).all()
        return [_stored(row) for row in rows]

    def list_keys(self, workspace_id: str, provider: str | None = None) -> list[KeyInfo]:
        """Every key of a workspace (optionally one provider), without ciphertexts."""
        query = sa.select(*_INFO_COLUMNS).where(_t.c.workspace_id == workspace_id)
        if provider is not None:
            query = query.where(_t.c.provider == provider)
        query = query.order_by(_t.c.provider, *_ORDER)
        with (
            store_errors("listing keys", workspace_id=workspace_id, provider=provider or "*"),
            self._engine.connect() as conn,
        ):
            return [_info(row) for row in conn.execute(query).all()]

    def find(
        self,
        workspace_id: str,
        provider: str | None = None,
        *,
        key_id: str | None = None,
        label: str | None = None,
    ) -> list[StoredKey]:
        """Keys of a workspace matching the given provider, id and label (ciphertexts included)."""
        query = sa.select(*_INFO_COLUMNS, _t.c.ciphertext).where(
            *self._match(workspace_id, provider, key_id, label)
        )
        with (
            store_errors("reading keys", workspace_id=workspace_id, provider=provider or "*"),
            self._engine.connect() as conn,
        ):
            return [_stored(row) for row in conn.execute(query.order_by(*_ORDER)).all()]

    def get(self, key_id: str) -> StoredKey | None:
        with store_errors("reading a key", key_id=key_id), self._engine.connect() as conn:
            row = conn.execute(
                sa.select(*_INFO_COLUMNS, _t.c.ciphertext).where(_t.c.id == key_id)
            ).first()
        return _stored(row) if row is not None else None

    def find_copy(self, ciphertext: str, *, exclude_key_id: str) -> str | None:
        """The id of another row holding exactly this ciphertext, if any (a copied row)."""
        with (
            store_errors("looking for a copied ciphertext", key_id=exclude_key_id),
            self._engine.connect() as conn,
        ):
            return conn.execute(
                sa.select(_t.c.id)
                .where(_t.c.ciphertext == ciphertext, _t.c.id != exclude_key_id)
                .limit(1)
            ).scalar()

    @staticmethod
    def _match(
        workspace_id: str, provider: str | None, key_id: str | None, label: str | None
    ) -> list[sa.ColumnElement[bool]]:
        clauses = [_t.c.workspace_id == workspace_id]
        if provider is not None:
            clauses.append(_t.c.provider == provider)
        if key_id is not None:
            clauses.append(_t.c.id == key_id)
        if label is not None:
            clauses.append(_t.c.label == label)
        return clauses

    # --- writes ----------------------------------------------------------------------------

    def put(
        self,
        new: NewKey,
        *,
        fingerprint_of: Callable[[str], str | None],
        data_key_check: str | None = None,
    ) -> tuple[StoredKey, KeyInfo | None]:
        """Insert a key, replacing the one with the same label if there is one.

        :param fingerprint_of: the new key's fingerprint under a given master key id (``None`` if
            that master key is not at hand), to refuse the same key under another label.
        :param data_key_check: for a key encrypted under its workspace's data key, that data
            key's check value: the insert happens only if the workspace still has that data key
            (it holds the data key's row until it commits, so a concurrent crypto-shredding
            deletes the new key too), else :class:`DataKeyUnavailable` and nothing is stored.
        :returns: the stored row, and the row it replaced (deleted), if any.
        :raises KeyLimitReached: a new label beyond the limit.
        :raises DuplicateKey: the same key is stored under another label.
        """
        now = self._clock()
        where = {"workspace_id": new.workspace_id, "provider": new.provider}
        with store_errors("storing a key", **where), write_transaction(self._engine) as conn:
            lock_in_transaction(conn, "workspace-keys", new.workspace_id, new.provider)
            if data_key_check is not None:
                self._check_data_key(conn, new, data_key_check)
            rows = [
                _info(row)
                for row in conn.execute(
                    sa.select(*_INFO_COLUMNS).where(
                        *self._match(new.workspace_id, new.provider, None, None)
                    )
                ).all()
            ]
            replaced = next((row for row in rows if row.label == new.label), None)
            for row in rows:
                if row is replaced:
                    continue
                candidate = fingerprint_of(row.master_key_id)
                if candidate is not None and hmac.compare_digest(candidate, row.fingerprint):
                    raise DuplicateKey(new.workspace_id, new.provider, row.label, row.id)
            if replaced is None and len(rows) >= self.max_keys_per_provider:
                raise KeyLimitReached(new.workspace_id, new.provider, self.max_keys_per_provider)
            if replaced is not None:
                conn.execute(sa.delete(_t).where(_t.c.id == replaced.id))
            values: dict[str, Any] = {
                "id": new.id,
                "workspace_id": new.workspace_id,
                "provider": new.provider,
                "label": new.label,
                "ciphertext": new.ciphertext,
                "master_key_id": new.master_key_id,
                "hint": new.hint,
                "fingerprint": new.fingerprint,
                "status": "enabled",
                "created_by": new.actor_id,
                "created_at": now,
                "updated_by": new.actor_id,
                "updated_at": now,
                "last_used_at": None,
                "cooldown_until": None,
            }
            conn.execute(sa.insert(_t).values(**values))
            notify_key_change(conn, new.workspace_id, new.provider)
        stored = StoredKey(
            **{k: v for k, v in values.items() if k != "ciphertext"}, ciphertext=new.ciphertext
        )
        return stored, replaced

    @staticmethod
    def _check_data_key(conn: Connection, new: NewKey, check_value: str) -> None:
        current = conn.execute(
            sa.select(data_keys.c.check_value)
            .where(data_keys.c.workspace_id == new.workspace_id)
            .with_for_update(read=True)  # FOR SHARE on PostgreSQL; SQLite's write lock is held
        ).scalar()
        if current is None or not hmac.compare_digest(current, check_value):
            raise DataKeyUnavailable(
                f"the data key of workspace {new.workspace_id!r} was destroyed or replaced while "
                f"its {new.provider} key was being stored (was the workspace deleted?); nothing "
                f"was stored",
                workspace_id=new.workspace_id,
            )

    def delete(
        self,
        workspace_id: str,
        provider: str | None,
        *,
        key_id: str | None = None,
        label: str | None = None,
    ) -> list[KeyInfo]:
        """Delete the matching keys; returns what was deleted (empty if nothing matched)."""
        clauses = self._match(workspace_id, provider, key_id, label)
        with (
            store_errors("deleting keys", workspace_id=workspace_id, provider=provider or "*"),
            write_transaction(self._engine) as conn,
        ):
            if provider is not None:
                lock_in_transaction(conn, "workspace-keys", workspace_id, provider)
            rows = [_info(r) for r in conn.execute(sa.select(*_INFO_COLUMNS).where(*clauses))]
            if rows:
                conn.execute(sa.delete(_t).where(_t.c.id.in_([r.id for r in rows])))
                for slot in sorted({(r.workspace_id, r.provider) for r in rows}):
                    notify_key_change(conn, *slot)
        return rows

    def set_status(
        self,
        workspace_id: str,
        provider: str | None,
        status: str,
        *,
        actor_id: str | None,
        key_id: str | None = None,
        label: str | None = None,
    ) -> list[KeyInfo]:
        """Enable or disable the matching keys (enabling also ends a cooldown)."""
        if status not in ("enabled", "disabled"):
            raise ValueError(f"status must be 'enabled' or 'disabled', not {status!r}")
        clauses = self._match(workspace_id, provider, key_id, label)
        values: dict[str, Any] = {
            "status": status,
            "updated_by": actor_id,
            "updated_at": self._clock(),
        }
        if status == "enabled":
            values["cooldown_until"] = None
            values["cooldown_reason"] = None
        with (
            store_errors(
                "changing key status", workspace_id=workspace_id, provider=provider or "*"
            ),
            write_transaction(self._engine) as conn,
        ):
            ids = list(conn.execute(sa.select(_t.c.id).where(*clauses)).scalars())
            if not ids:
                return []
            conn.execute(sa.update(_t).where(_t.c.id.in_(ids)).values(**values))
            notify_keys_changed(conn, ids)
            rows = conn.execute(
                sa.select(*_INFO_COLUMNS).where(_t.c.id.in_(ids)).order_by(*_ORDER)
            ).all()
        return [_info(row) for row in rows]

    def mark_used(self, key_id: str, at: datetime | None = None) -> bool:
        """Record that a key served a call (never moves ``last_used_at`` backwards)."""
        at = at or self._clock()
        with store_errors("recording key use", key_id=key_id), write_transaction(self._engine) as c:
            result = c.execute(
                sa.update(_t)
                .where(
                    _t.c.id == key_id,
                    sa.or_(_t.c.last_used_at.is_(None), _t.c.last_used_at < at),
                )
                .values(last_used_at=at)
            )
        return bool(result.rowcount)

    def set_cooldown(
        self,
        key_id: str,
        until: datetime | None,
        reason: str | None = None,
        *,
        unchanged_since: datetime | None = None,
    ) -> bool:
        """Put a key in cooldown until ``until``, for ``reason`` (``None`` ends it), for every
        worker.

        :param unchanged_since: write only if the key is enabled and nobody has changed it since
            it was read with this ``updated_at`` (a cooldown written late must not undo an
            operator's ``enable``).
        """
        if until is None:
            reason = None
        clauses = [_t.c.id == key_id]
        if unchanged_since is not None:
            clauses += [_t.c.updated_at == unchanged_since, _t.c.status == "enabled"]
        with (
            store_errors("setting a key cooldown", key_id=key_id),
            write_transaction(self._engine) as conn,
        ):
            result = conn.execute(
                sa.update(_t).where(*clauses).values(cooldown_until=until, cooldown_reason=reason)
            )
            if result.rowcount:
                notify_keys_changed(conn, [key_id])
        return bool(result.rowcount)

    # --- master keys -----------------------------------------------------------------------

    def master_key_check_values(self) -> dict[str, str]:
        with store_errors("reading master key check values"), self._engine.connect() as conn:
            return {
                row.id: row.check_value
                for row in conn.execute(sa.select(master_keys.c.id, master_keys.c.check_value))
            }

    def record_master_key(self, key: MasterKey) -> None:
        """Remember a master key's check value the first time it encrypts here; refuse a key that
        differs from the one recorded under the same id (rows would become undecryptable)."""
        check = key.check_value
        with store_errors("recording the master key"), write_transaction(self._engine) as conn:
            _insert_ignore(
                conn,
                master_keys,
                {"id": key.id, "check_value": check, "first_used_at": self._clock()},
            )
            recorded = conn.execute(
                sa.select(master_keys.c.check_value).where(master_keys.c.id == key.id)
            ).scalar_one()
        if not hmac.compare_digest(recorded, check):
            raise KeyringError(
                f"the keyring's master key {key.id!r} is not the key this database recorded "
                f"under that id; refusing to encrypt with it (restore the original key, or give "
                f"the new key a new id)"
            )

    # --- rewrap ----------------------------------------------------------------------------

    def count_by_master_key(self) -> dict[str, int]:
        with store_errors("counting keys by master key"), self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(_t.c.master_key_id, sa.func.count())
                .group_by(_t.c.master_key_id)
                .order_by(_t.c.master_key_id)
            ).all()
        return {row[0]: int(row[1]) for row in rows}

    def batch_not_under(
        self, master_key_id: str, *, after_id: str | None, limit: int
    ) -> list[StoredKey]:
        """Up to ``limit`` rows not encrypted under ``master_key_id``, by id after ``after_id``."""
        query = sa.select(*_INFO_COLUMNS, _t.c.ciphertext).where(
            _t.c.master_key_id != master_key_id
        )
        if after_id is not None:
            query = query.where(_t.c.id > after_id)
        query = query.order_by(_t.c.id).limit(limit)
        with store_errors("reading keys to rewrap"), self._engine.connect() as conn:
            return [_stored(row) for row in conn.execute(query).all()]

    def swap_ciphertexts(self, updates: Sequence[tuple[StoredKey, str, str, str]]) -> int:
        """Replace ciphertexts in one transaction: ``(row, new_ciphertext, master_key_id,
        fingerprint)``. A row changed since it was read (replaced, deleted) is left alone.

        :returns: how many rows were updated.
        """
        if not updates:
            return 0
        statement = (
            sa.update(_t)
            .where(_t.c.id == sa.bindparam("b_id"), _t.c.ciphertext == sa.bindparam("b_old"))
            .values(
                ciphertext=sa.bindparam("b_new"),
                master_key_id=sa.bindparam("b_master"),
                fingerprint=sa.bindparam("b_fingerprint"),
            )
        )
        params = [
            {
                "b_id": row.id,
                "b_old": row.ciphertext,
                "b_new": ciphertext,
                "b_master": master_key_id,
                "b_fingerprint": fingerprint,
            }
            for row, ciphertext, master_key_id, fingerprint in updates
        ]
        params.sort(key=lambda p: p["b_id"])  # row locks in key id order (see retry_deadlocks)

        def swap() -> int:
            with write_transaction(self._engine) as conn:
                notify_keys_changed(conn, [p["b_id"] for p in params])
                if conn.dialect.supports_sane_multi_rowcount:
                    return int(conn.execute(statement, params).rowcount)
                # pragma: no cover - drivers that cannot count an executemany
                return sum(conn.execute(statement, p).rowcount for p in params)

        with store_errors("rewrapping keys"):
            return retry_deadlocks(swap)
