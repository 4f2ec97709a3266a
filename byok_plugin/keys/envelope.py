"""Envelope encryption: one data key per workspace, wrapped by a key-encryption key (KEK).

- A workspace's stored provider keys are encrypted with AES-256-GCM under its data key, with the
  same row-bound associated data as under a master key (:mod:`byok_plugin.core.crypto`).
- The data key is stored only wrapped (``byok_data_keys``), by whichever implementation of the
  ``byok_wrap_data_key`` hook answers first; byok-plugin's own is the local keyring
  (:class:`LocalKeyEncryption`: today's key file or ``BYOK_ENCRYPTION_KEYS``). Unwrapping goes
  through ``byok_unwrap_data_key``.
- Once a KMS wraps a store's data keys, a worker configured otherwise (no ``BYOK_KEY_PROVIDER``)
  does not create a data key under the local keyring (:meth:`DataKeys.refuse_leaving_kms`), and a
  KMS worker does not unwrap a data key the local keyring wrapped (a row planted in the table),
  unless the operator is moving the store between them (``BYOK_KEY_PROVIDER_MIGRATION=1``).
- Unwrapped data keys are kept in memory for ``BYOK_DATA_KEY_CACHE_SECONDS`` (default 300), at
  most :data:`MAX_CACHED_DATA_KEYS` of them, so a resolution does not call the KMS.
- A KMS that does not answer, or a wrapped key that does not unwrap, raises
  :class:`~byok_plugin.core.errors.DataKeyUnavailable` naming the KMS and the workspace; resolution
  turns it into a :class:`~byok_hookspecs.CredentialUnavailable`, never a platform-key fallback.
- Deleting a workspace (:meth:`byok_plugin.keys.service.KeyService.delete_workspace`) deletes its data
  key: its rows, wherever copies of them survive (a backup, a dump), can no longer be decrypted,
  whatever master keys one holds. Another process that cached the data key cannot store a key
  under it any more (``KeyStore.put`` checks the data key's check value in the insert's
  transaction), and reads the workspace's new data key as soon as a row does not decrypt under
  the cached one (:meth:`DataKeys.reload`); on PostgreSQL it forgets the cached key as soon as
  the deletion is announced (:meth:`DataKeys.changed_elsewhere`, a follower of the key-change
  listener).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from byok_hookspecs import WrappedDataKey

from byok_plugin.core.crypto import KEY_BYTES, DataKey, Keyring
from byok_plugin.core.errors import DataKeyUnavailable, KeyProviderDowngrade, KeyringError
from byok_plugin.store.data_keys_repo import DataKeyStore, StoredDataKey

__all__ = ["MAX_CACHED_DATA_KEYS", "BuiltinKeyEncryption", "DataKeys", "LocalKeyEncryption"]

log = logging.getLogger("byok.keys")

#: the most unwrapped data keys one process keeps in memory
MAX_CACHED_DATA_KEYS = 10_000
_CAUSE_LIMIT = 300


class LocalKeyEncryption:
    """The default key-encryption provider: the local keyring's current master key wraps data
    keys (AES-256-GCM bound to the workspace and the master key id); any master key of the
    keyring unwraps those it wrapped."""

    name = "local"

    def __init__(self, keyring: Callable[[], Keyring]) -> None:
        self._keyring = keyring

    def __repr__(self) -> str:
        return "LocalKeyEncryption()"

    def describe(self) -> str:
        try:
            keyring = self._keyring()
        except KeyringError:
            return "local keyring (no master key yet: run `byok init`)"
        return f"local keyring ({keyring.source}, current master key {keyring.current.id})"

    def wrap(self, workspace_id: str, data_key: bytes) -> WrappedDataKey:
        key_id, blob = self._keyring().wrap_data_key(workspace_id, data_key)
        return WrappedDataKey(self.name, key_id, blob)

    def unwrap(self, workspace_id: str, wrapped: WrappedDataKey) -> bytes | None:
        if wrapped.provider != self.name:
            return None
        return self._keyring().unwrap_data_key(workspace_id, wrapped.key_id, wrapped.blob)


class BuiltinKeyEncryption:
    """The provider ``BYOK_KEY_PROVIDER`` names wraps; it unwraps its own keys. When it is a KMS,
    the local keyring unwraps those it wrapped before only while the operator moves the store
    from the keyring to the KMS (``accept_local``: ``BYOK_KEY_PROVIDER_MIGRATION=1``): otherwise
    a data key marked ``local`` in the table (planted by whoever can write it and read the master
    keys) is refused."""

    def __init__(
        self, active: Any, local: LocalKeyEncryption, *, accept_local: bool = False
    ) -> None:
        self.active = active
        self.local = local
        self.name: str = active.name
        self.accept_local = accept_local

    def __repr__(self) -> str:
        return f"BuiltinKeyEncryption({self.active!r})"

    def describe(self) -> str:
        return str(self.active.describe())

    def wrap(self, workspace_id: str, data_key: bytes) -> WrappedDataKey:
        wrapped: WrappedDataKey = self.active.wrap(workspace_id, data_key)
        return wrapped

    def unwrap(self, workspace_id: str, wrapped: WrappedDataKey) -> bytes | None:
        local = wrapped.provider == self.local.name
        if local and self.active is not self.local and not self.accept_local:
            raise KeyProviderDowngrade(
                f"refused: it is marked as wrapped by the local keyring, but {self.name} wraps "
                f"this store's data keys (BYOK_KEY_PROVIDER); to move keyring-wrapped data keys "
                f"into {self.name}, set BYOK_KEY_PROVIDER_MIGRATION=1 and run `byok keys rewrap`"
            )
        owner = self.active if wrapped.provider == self.active.name else self.local
        result: bytes | None = owner.unwrap(workspace_id, wrapped)
        return result

    def rewrap(self, workspace_id: str, wrapped: WrappedDataKey) -> WrappedDataKey | None:
        """Inside the KMS when the active provider can (its own older keys); else ``None``."""
        if wrapped.provider != self.active.name or not hasattr(self.active, "rewrap"):
            return None
        result: WrappedDataKey | None = self.active.rewrap(workspace_id, wrapped)
        return result


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:_CAUSE_LIMIT]}" if text else type(exc).__name__


class DataKeys:
    """The workspaces' data keys: created on first use, unwrapped through the hooks, cached.

    :param store: the wrapped data keys.
    :param hooks: returns the plugin manager (or anything with ``.hook.byok_wrap_data_key`` and
        ``.hook.byok_unwrap_data_key``) to ask.
    :param cache_seconds: how long an unwrapped data key is kept in memory (0: not kept).
    :param monotonic: the clock of the cache.
    :param provider_migration: the operator is moving the store out of a KMS
        (``BYOK_KEY_PROVIDER_MIGRATION``): :meth:`refuse_leaving_kms` lets keys leave it.
    """

    def __init__(
        self,
        store: DataKeyStore,
        hooks: Callable[[], Any],
        *,
        cache_seconds: float = 300.0,
        max_cached: int = MAX_CACHED_DATA_KEYS,
        monotonic: Callable[[], float] = time.monotonic,
        provider_migration: bool = False,
    ) -> None:
        self.store = store
        self.provider_migration = provider_migration
        self._hooks = hooks
        self._cache_seconds = cache_seconds
        self._max_cached = max_cached
        self._monotonic = monotonic
        # workspace -> (expires at, data key); replaced whole, never mutated in place
        self._cache: dict[str, tuple[float, DataKey]] = {}

    def __repr__(self) -> str:
        return f"DataKeys(cached={len(self._cache)})"

    @property
    def cached(self) -> int:
        return len(self._cache)

    def forget(self, workspace_id: str | None = None) -> None:
        """Drop one workspace's unwrapped data key from memory (every one when ``None``)."""
        if workspace_id is None:
            self._cache.clear()
        else:
            self._cache.pop(workspace_id, None)

    # the key-change listener's follower (PostgreSQL): a workspace-wide announcement (a
    # workspace deleted, crypto-shredded) drops its data key; a provider's key change does not
    def changed_elsewhere(self, workspace_id: str, provider: str | None) -> None:
        """Another worker changed the workspace (every provider when ``provider`` is None): its
        data key may have been destroyed and replaced, so it is read again on next use."""
        if provider is None:
            self.forget(workspace_id)

    def set_listening(self, listening: bool) -> None:
        """The listener connected or lost its connection: a deletion may have gone unannounced,
        so every cached data key is read again on next use."""
        self.forget()

    def reload(self, workspace_id: str, used: DataKey) -> DataKey | None:
        """After a row of the workspace did not decrypt under ``used`` (a cached data key): the
        data key stored now, read again if it is another one (another worker destroyed the
        workspace's data key and a new one was created), else ``used`` itself (the row itself
        is at fault). ``None`` when the workspace has no data key any more.

        :raises DataKeyUnavailable: the new data key did not unwrap.
        """
        stored = self.store.get(workspace_id)
        if stored is None:
            self.forget(workspace_id)
            return None
        if hmac.compare_digest(stored.check_value, used.check_value):
            return used
        self.forget(workspace_id)
        log.info(
            "the data key of workspace %s was replaced in the store since it was cached: "
            "read again",
            workspace_id,
        )
        return self._remember(workspace_id, self.unwrap(stored))

    def get(self, workspace_id: str) -> DataKey | None:
        """The workspace's data key, or ``None`` when it has none (never had a key stored under
        envelope encryption, or was deleted: crypto-shredded).

        :raises DataKeyUnavailable: it exists but the KMS did not unwrap it (naming the KMS).
        """
        entry = self._cache.get(workspace_id)
        if entry is not None and entry[0] > self._monotonic():
            return entry[1]
        stored = self.store.get(workspace_id)
        if stored is None:
            self._cache.pop(workspace_id, None)
            return None
        return self._remember(workspace_id, self.unwrap(stored))

    def get_or_create(self, workspace_id: str) -> DataKey:
        """The workspace's data key, created and wrapped (``byok_wrap_data_key``) on first use.

        :raises DataKeyUnavailable: the KMS did not wrap or unwrap it.
        """
        existing = self.get(workspace_id)
        if existing is not None:
            return existing
        secret = secrets.token_bytes(KEY_BYTES)
        wrapped = self.wrap(workspace_id, secret)
        if wrapped.provider == LocalKeyEncryption.name:
            self.refuse_leaving_kms(
                f"wrap the new data key of workspace {workspace_id!r} with the local keyring "
                f"(BYOK_KEY_PROVIDER is local)"
            )
        created = DataKey(workspace_id, secret)
        stored = self.store.add(workspace_id, wrapped, created.check_value)
        if stored.wrapped == wrapped:
            log.info(
                "created the data key of workspace %s, wrapped by %s key %s",
                workspace_id,
                wrapped.provider,
                wrapped.key_id,
            )
            return self._remember(workspace_id, created)
        # another writer stored the workspace's data key first: use that one
        return self._remember(workspace_id, self.unwrap(stored))

    def refuse_leaving_kms(self, would: str) -> None:
        """Refuse (:class:`KeyProviderDowngrade`) to do what puts a key outside the KMS that
        protects the store's keys (``would``: what this worker was about to do, and why), unless
        the operator is moving the store out of it (``BYOK_KEY_PROVIDER_MIGRATION=1``): a worker
        missing one variable must not silently store keys under the local master keys.

        :raises StoreUnavailable: the store did not answer.
        """
        if self.provider_migration:
            return
        protected = self.store.kms_protected(LocalKeyEncryption.name)
        if not protected:
            return
        # the providers only: the message may reach an API caller
        providers = " or ".join(protected)
        raise KeyProviderDowngrade(
            f"refused: this worker would {would}, but a KMS protects this store's keys "
            f"({providers}): "
            f"configure BYOK_KEY_PROVIDER={providers} and its settings as on the other workers "
            f"(and leave BYOK_KEY_ENVELOPES unset); to move the store out of the KMS on purpose, "
            f"run `byok keys rewrap` with BYOK_KEY_PROVIDER_MIGRATION=1"
        )

    def describe(self) -> str:
        """The active key-encryption provider (``byok_key_provider``), for messages."""
        try:
            described = self._hooks().hook.byok_key_provider()
        except Exception as exc:
            return f"not usable: {_cause(exc)}"
        return str(described) if described else "none answers byok_key_provider"

    def wrap(self, workspace_id: str, secret: bytes) -> WrappedDataKey:
        """Wrap a data key through ``byok_wrap_data_key``.

        :raises DataKeyUnavailable: no implementation answered, or the KMS failed.
        """
        try:
            wrapped = self._hooks().hook.byok_wrap_data_key(
                workspace_id=workspace_id, data_key=secret
            )
        except DataKeyUnavailable:
            raise
        except Exception as exc:
            raise DataKeyUnavailable(
                f"the key-encryption provider ({self.describe()}) did not wrap the data key of "
                f"workspace {workspace_id!r}: {_cause(exc)}",
                workspace_id=workspace_id,
            ) from None
        if not isinstance(wrapped, WrappedDataKey):
            raise DataKeyUnavailable(
                f"no key-encryption provider wrapped the data key of workspace {workspace_id!r} "
                f"(byok_wrap_data_key answered {type(wrapped).__name__}, not WrappedDataKey)",
                workspace_id=workspace_id,
            )
        return wrapped

    def unwrap(self, stored: StoredDataKey) -> DataKey:
        """Unwrap a stored data key through ``byok_unwrap_data_key`` (no cache).

        :raises DataKeyUnavailable: naming the KMS and key that wrapped it.
        """
        workspace_id, wrapped = stored.workspace_id, stored.wrapped
        kms = f"{wrapped.provider} key {wrapped.key_id!r}"
        try:
            secret = self._hooks().hook.byok_unwrap_data_key(
                workspace_id=workspace_id, wrapped=wrapped
            )
        except Exception as exc:
            raise DataKeyUnavailable(
                f"the data key of workspace {workspace_id!r} could not be unwrapped by {kms}: "
                f"{_cause(exc)}",
                workspace_id=workspace_id,
                kms=wrapped.provider,
            ) from None
        if secret is None:
            raise DataKeyUnavailable(
                f"the data key of workspace {workspace_id!r} is wrapped by {kms}, and no "
                f"installed plugin unwraps {wrapped.provider!r} keys (is BYOK_KEY_PROVIDER set "
                f"as when it was wrapped?)",
                workspace_id=workspace_id,
                kms=wrapped.provider,
            )
        if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
            raise DataKeyUnavailable(
                f"{kms} unwrapped the data key of workspace {workspace_id!r} into something "
                f"other than {KEY_BYTES} bytes",
                workspace_id=workspace_id,
                kms=wrapped.provider,
            )
        key = DataKey(workspace_id, secret)
        if not hmac.compare_digest(key.check_value, stored.check_value):
            raise DataKeyUnavailable(
                f"{kms} unwrapped the data key of workspace {workspace_id!r} into another key "
                f"than the one stored (its check value differs): the wrapped key was replaced",
                workspace_id=workspace_id,
                kms=wrapped.provider,
            )
        return key

    def rewrap(self, stored: StoredDataKey) -> WrappedDataKey:
        """The stored data key wrapped by the current key-encryption key: inside the KMS through
        ``byok_rewrap_data_key`` when an implementation can, else unwrapped and wrapped again.

        :raises DataKeyUnavailable: naming the KMS and the workspace.
        """
        workspace_id, wrapped = stored.workspace_id, stored.wrapped
        try:
            moved = self._hooks().hook.byok_rewrap_data_key(
                workspace_id=workspace_id, wrapped=wrapped
            )
        except Exception as exc:
            raise DataKeyUnavailable(
                f"the data key of workspace {workspace_id!r} could not be rewrapped from "
                f"{wrapped.provider} key {wrapped.key_id!r}: {_cause(exc)}",
                workspace_id=workspace_id,
                kms=wrapped.provider,
            ) from None
        if moved is not None:
            if not isinstance(moved, WrappedDataKey):
                raise DataKeyUnavailable(
                    f"byok_rewrap_data_key answered {type(moved).__name__} for the data key of "
                    f"workspace {workspace_id!r}, not WrappedDataKey",
                    workspace_id=workspace_id,
                    kms=wrapped.provider,
                )
            return moved
        return self.wrap(workspace_id, self.unwrap(stored).secret)

    def _remember(self, workspace_id: str, key: DataKey) -> DataKey:
        if self._cache_seconds <= 0:
            return key
        now = self._monotonic()
        if len(self._cache) >= self._max_cached and workspace_id not in self._cache:
            live = {w: e for w, e in self._cache.items() if e[0] > now}
            while len(live) >= self._max_cached:  # still full: drop the oldest entries
                live.pop(next(iter(live)))
            self._cache = live
        self._cache[workspace_id] = (now + self._cache_seconds, key)
        return key
