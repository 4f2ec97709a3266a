"""The stored keys as credential resolution uses them: read the enabled keys, decrypt one.

This is the API the resolution policy (``byok_resolve_credential``) builds on. It does no
authorization and no audit: the caller decides who may use a workspace's keys. A typical use::

    access = app.key_access
    candidates = access.enabled_keys(workspace_id, provider)      # one SELECT, no decryption
    usable = [k for k in candidates if not k.in_cooldown(now)]   # cooldowns shared by workers
    key = choose(usable)                                          # round-robin: caller's policy
    credential = access.reveal(key)                               # one AES-GCM decrypt
    ...
    access.mark_used(key.id)              # optional, one UPDATE
    access.cool_down(key.id, until, FailureReason.RATE_LIMIT)  # after a 429, for every worker

Errors are loud: a store that does not answer raises
:class:`~byok_plugin.core.errors.StoreUnavailable`, a key that does not decrypt raises a
:class:`~byok_plugin.core.errors.KeyDecryptionError` subclass naming the workspace, provider and
key id; both are :class:`byok_hookspecs.CredentialUnavailable`. Nothing here returns ``None`` for
"could not read", and nothing here falls back to a platform key.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from byok_hookspecs import Credential, CredentialSource, FailureReason

from byok_plugin.core.crypto import ENVELOPE_PREFIX, Keyring
from byok_plugin.core.errors import (
    CiphertextCopied,
    CiphertextMismatch,
    DataKeyDestroyed,
    DataKeyUnavailable,
    DataKeyUnreadable,
    KeyDecryptionError,
    KeyringError,
    StoreUnavailable,
    WrongMasterKey,
)
from byok_plugin.store.keys_repo import KeyStore, StoredKey

if TYPE_CHECKING:
    from byok_plugin.keys.envelope import DataKeys

__all__ = ["KeyAccess"]

log = logging.getLogger("byok.keys")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _unreadable(
    key: StoredKey, exc: DataKeyUnavailable, where: dict[str, str]
) -> DataKeyUnreadable:
    """The error of a stored key whose workspace's data key could not be unwrapped, logged."""
    log.error(
        "stored %s key %s of workspace %s does not decrypt: %s",
        key.provider,
        key.id,
        key.workspace_id,
        exc,
    )
    return DataKeyUnreadable(str(exc), **where)


def _destroyed(where: dict[str, str]) -> DataKeyDestroyed:
    return DataKeyDestroyed(
        "it is encrypted under its workspace's data key, which was destroyed (the workspace was "
        "deleted); set the key again",
        **where,
    )


class KeyAccess:
    """Read and decrypt stored keys for credential resolution.

    :param store: the key repository.
    :param keyring: returns the keyring (called on the first decryption, so a process that never
        decrypts needs no master key; raising :class:`~byok_plugin.core.errors.KeyringError` there
        becomes a :class:`~byok_plugin.core.errors.KeyDecryptionError` naming the key).
    :param clock: returns the current aware UTC datetime.
    :param data_keys: the workspaces' data keys, for rows under envelope encryption
        (``byok:e1:``); without them such rows do not decrypt.
    """

    def __init__(
        self,
        store: KeyStore,
        keyring: Callable[[], Keyring],
        *,
        clock: Callable[[], datetime] = _utc_now,
        data_keys: DataKeys | None = None,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self.data_keys = data_keys

    def __repr__(self) -> str:
        return f"KeyAccess({self._store!r})"

    def enabled_keys(self, workspace_id: str, provider: str) -> list[StoredKey]:
        """The enabled keys of a workspace for a provider, oldest first (one query, nothing
        decrypted). Keys in cooldown are included: check ``key.in_cooldown(now)``.

        :raises StoreUnavailable: the store did not answer.
        """
        return self._store.usable_keys(workspace_id, provider)

    def has_label(self, workspace_id: str, provider: str, label: str) -> bool:
        """Whether the workspace has a key for the provider with this label, enabled or not.

        :raises StoreUnavailable: the store did not answer.
        """
        return bool(self._store.find(workspace_id, provider, label=label))

    def reveal(self, key: StoredKey) -> Credential:
        """Decrypt a key read by :meth:`enabled_keys` into a workspace :class:`Credential`
        (``source=workspace``, ``key_id`` and ``hint`` set; the key is never in its ``repr``).

        :raises KeyDecryptionError: (a subclass saying why) when it does not decrypt.
        """
        api_key = self.decrypt(key)
        return Credential(
            api_key=api_key,
            provider=key.provider,
            source=CredentialSource.WORKSPACE,
            key_id=key.id,
            hint=key.hint,
        )

    def credential(self, workspace_id: str, provider: str, key_id: str) -> Credential | None:
        """Read one enabled key by id and decrypt it; ``None`` only when no such enabled key
        exists (deleted or disabled meanwhile), never when it exists and cannot be read."""
        for key in self._store.usable_keys(workspace_id, provider):
            if key.id == key_id:
                return self.reveal(key)
        return None

    def decrypt(self, key: StoredKey) -> str:
        """The plaintext of a stored key. Do not log it. The resolver keeps it with the key list
        it came from (``BYOK_KEY_CACHE_SECONDS``), dropped at the cache's next use after that."""
        if key.ciphertext.startswith(ENVELOPE_PREFIX):
            return self._decrypt_envelope(key)
        where = {"workspace_id": key.workspace_id, "provider": key.provider, "key_id": key.id}
        try:
            keyring = self._keyring()
        except KeyringError as exc:
            raise KeyDecryptionError(str(exc), **where) from None
        try:
            return keyring.decrypt(key.ciphertext, key.binding)
        except CiphertextMismatch as exc:
            refined = self._diagnose(key, keyring)
            log.warning(
                "stored %s key %s of workspace %s does not decrypt (%s)",
                key.provider,
                key.id,
                key.workspace_id,
                (refined or exc).reason,
            )
            raise (refined or exc) from None
        except KeyDecryptionError as exc:
            log.warning(
                "stored %s key %s of workspace %s does not decrypt (%s)",
                key.provider,
                key.id,
                key.workspace_id,
                exc.reason,
            )
            raise

    def _decrypt_envelope(self, key: StoredKey) -> str:
        where = {"workspace_id": key.workspace_id, "provider": key.provider, "key_id": key.id}
        if self.data_keys is None:
            raise DataKeyUnreadable(
                "it is encrypted under its workspace's data key, and this process has no data "
                "key service",
                **where,
            )
        try:
            data_key = self.data_keys.get(key.workspace_id)
        except DataKeyUnavailable as exc:
            raise _unreadable(key, exc, where) from None
        if data_key is None:
            raise _destroyed(where)
        try:
            return data_key.decrypt(key.ciphertext, key.binding)
        except CiphertextMismatch:
            pass
        # a data key cached before another worker replaced it (crypto-shred, then a new key):
        # read the stored one, and only if the row does not decrypt under that either, report it
        try:
            current = self.data_keys.reload(key.workspace_id, data_key)
        except DataKeyUnavailable as exc:
            raise _unreadable(key, exc, where) from None
        if current is None:
            raise _destroyed(where)
        try:
            return current.decrypt(key.ciphertext, key.binding)
        except CiphertextMismatch as exc:
            try:
                source = self._store.find_copy(key.ciphertext, exclude_key_id=key.id)
            except StoreUnavailable:
                source = None
            refined = CiphertextCopied(source, **where) if source is not None else exc
            log.warning(
                "stored %s key %s of workspace %s does not decrypt (%s)",
                key.provider,
                key.id,
                key.workspace_id,
                refined.reason,
            )
            raise refined from None

    def _diagnose(self, key: StoredKey, keyring: Keyring) -> KeyDecryptionError | None:
        """Tell a wrong master key and a copied row apart from plain tampering, if we can."""
        where = {"workspace_id": key.workspace_id, "provider": key.provider, "key_id": key.id}
        master = keyring.get(key.master_key_id)
        try:
            recorded = self._store.master_key_check_values().get(key.master_key_id)
            if (
                master is not None
                and recorded is not None
                and not hmac.compare_digest(recorded, master.check_value)
            ):
                return WrongMasterKey(key.master_key_id, **where)
            source = self._store.find_copy(key.ciphertext, exclude_key_id=key.id)
        except StoreUnavailable:
            return None
        if source is not None:
            return CiphertextCopied(source, **where)
        return None

    def mark_used(self, key_id: str, at: datetime | None = None) -> bool:
        """Record that a key served a call now (or at ``at``); ``False`` if the key is gone."""
        return self._store.mark_used(key_id, at or self._clock())

    def cool_down(
        self,
        key_id: str,
        until: datetime,
        reason: FailureReason = FailureReason.ERROR,
        *,
        unchanged_since: datetime | None = None,
    ) -> bool:
        """Skip a key until ``until``, in every worker sharing the store (after a 429 or an auth
        failure); ``False`` if the key is gone. The reason is stored with the cooldown, so every
        worker's fallback policy decides on it (``key.cooldown_reason``)."""
        return self._store.set_cooldown(
            key_id, until, FailureReason(reason).value, unchanged_since=unchanged_since
        )

    def end_cooldown(self, key_id: str) -> bool:
        return self._store.set_cooldown(key_id, None)
