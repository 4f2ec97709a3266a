"""The errors of the key store, the keyring and the key management service.

Every message names the workspace, the provider and the key id where they apply, and never a
secret: no API key, no master key, no part of either beyond the display hint.

The ones a host can meet while resolving a credential subclass
:class:`byok_hookspecs.CredentialUnavailable`, so a host that only knows the contract still catches
them, and none of them is ever a reason to fall back to the billed platform key.
"""

from __future__ import annotations

from byok_hookspecs import ByokError, CredentialUnavailable

__all__ = [
    "CiphertextCopied",
    "CiphertextMismatch",
    "DataKeyDestroyed",
    "DataKeyUnavailable",
    "DataKeyUnreadable",
    "DuplicateKey",
    "InvalidInput",
    "InvalidKeyFormat",
    "KeyDecryptionError",
    "KeyLimitReached",
    "KeyNotFound",
    "KeyRejected",
    "KeyringError",
    "MalformedCiphertext",
    "NoMasterKey",
    "StoreRefusedValue",
    "StoreUnavailable",
    "UnknownMasterKey",
    "UnknownProvider",
    "WrongMasterKey",
]


# --- the keyring -------------------------------------------------------------------------------


class KeyringError(ByokError):
    """The master keys are misconfigured: the message says which variable or file, and how to fix
    it. Never carries key material."""


class NoMasterKey(KeyringError):
    """No master key is configured at all. There is no built-in default key, on purpose."""


class KeyProviderDowngrade(KeyringError):
    """This worker would store keys outside the KMS that protects the store's keys, or unwrap a
    data key the local keyring wrapped while a KMS wraps this store's data keys (a data key
    planted in the table): refused unless the operator is moving the store between providers
    (``BYOK_KEY_PROVIDER_MIGRATION=1``). The message says what to configure."""


class DataKeyUnavailable(KeyringError):
    """A workspace's data key could not be wrapped or unwrapped (envelope encryption): the KMS
    did not answer, refused, or the wrapped key does not authenticate. The message names the
    workspace and the key-encryption provider.

    :ivar workspace_id: the workspace whose data key it is.
    :ivar kms: the key-encryption provider (``local``, ``vault-transit``, ``aws-kms``...), when
        known.
    """

    def __init__(self, message: str, *, workspace_id: str, kms: str | None = None) -> None:
        super().__init__(message)
        self.workspace_id = workspace_id
        self.kms = kms


# --- decryption --------------------------------------------------------------------------------


class KeyDecryptionError(CredentialUnavailable):
    """A stored key exists but cannot be decrypted. Never answered with ``None``, never a reason
    to use the platform key instead.

    :ivar reason: a short stable word for the kind of failure (``unknown-master-key``...).
    """

    reason = "undecryptable"

    def __init__(
        self, detail: str, *, workspace_id: str, provider: str, key_id: str | None
    ) -> None:
        super().__init__(
            f"stored {provider} key {key_id} of workspace {workspace_id!r} cannot be decrypted: "
            f"{detail}",
            workspace_id=workspace_id,
            provider=provider,
            key_id=key_id,
        )


class MalformedCiphertext(KeyDecryptionError):
    """The stored value is not a ``byok:v1:<master-key-id>:<base64>`` string."""

    reason = "malformed"


class UnknownMasterKey(KeyDecryptionError):
    """The row names a master key id that the keyring does not hold."""

    reason = "unknown-master-key"

    def __init__(
        self, master_key_id: str, *, workspace_id: str, provider: str, key_id: str | None
    ) -> None:
        self.master_key_id = master_key_id
        super().__init__(
            f"it is encrypted under master key {master_key_id!r}, which is not in the keyring "
            f"(BYOK_ENCRYPTION_KEYS or the key file); add that master key back, or set the key "
            f"again",
            workspace_id=workspace_id,
            provider=provider,
            key_id=key_id,
        )


class WrongMasterKey(KeyDecryptionError):
    """The keyring holds a master key under the row's id, but not the one that encrypted it."""

    reason = "wrong-master-key"

    def __init__(
        self, master_key_id: str, *, workspace_id: str, provider: str, key_id: str | None
    ) -> None:
        self.master_key_id = master_key_id
        super().__init__(
            f"the keyring's master key {master_key_id!r} is not the one this database was "
            f"encrypted with (its check value differs); restore the original master key",
            workspace_id=workspace_id,
            provider=provider,
            key_id=key_id,
        )


class CiphertextMismatch(KeyDecryptionError):
    """The ciphertext does not authenticate for this row: it was altered, or it belongs to another
    row, workspace or provider (AES-GCM cannot tell which)."""

    reason = "tampered"


class CiphertextCopied(CiphertextMismatch):
    """The ciphertext is a copy of another row's: ciphertexts are bound to their own row."""

    reason = "copied"

    def __init__(
        self, source_key_id: str, *, workspace_id: str, provider: str, key_id: str | None
    ) -> None:
        self.source_key_id = source_key_id
        KeyDecryptionError.__init__(
            self,
            f"its ciphertext was copied from stored key {source_key_id}; a ciphertext only "
            f"decrypts in the row, workspace and provider it was written for",
            workspace_id=workspace_id,
            provider=provider,
            key_id=key_id,
        )


class DataKeyUnreadable(KeyDecryptionError):
    """The row is encrypted under its workspace's data key, which could not be unwrapped (the
    message names the KMS)."""

    reason = "data-key-unavailable"


class DataKeyDestroyed(KeyDecryptionError):
    """The row is encrypted under its workspace's data key, and that data key no longer exists:
    the workspace was deleted (crypto-shredded). No master key can decrypt it."""

    reason = "data-key-destroyed"


# --- the store ---------------------------------------------------------------------------------


def _where(workspace_id: str, provider: str) -> str:
    """`` for workspace 'w' and provider p`` of a store error's message (``*``: not said)."""
    where = "" if workspace_id == "*" else f" for workspace {workspace_id!r}"
    return where + (f" and provider {provider}" if provider != "*" else "")


class StoreUnavailable(CredentialUnavailable):
    """The key store does not answer (or failed mid-way): an error, never "no key"."""

    def __init__(
        self,
        what: str,
        *,
        workspace_id: str = "*",
        provider: str = "*",
        key_id: str | None = None,
        cause: str = "",
    ) -> None:
        super().__init__(
            f"the key store did not answer while {what}{_where(workspace_id, provider)}"
            + (f": {cause}" if cause else ""),
            workspace_id=workspace_id,
            provider=provider,
            key_id=key_id,
        )


# --- user input and management ------------------------------------------------------------------


class InvalidInput(ByokError, ValueError):
    """A workspace id, provider, label or key id given by the user is not acceptable."""


class StoreRefusedValue(InvalidInput, CredentialUnavailable):
    """The store answered, and refused a value of the row being written or looked up: a NUL
    character or a lone surrogate in a text, a number out of its column's range, a text longer
    than its column. The row's own error, not the store being down: writing it again fails
    again, so it is never spooled or retried as an outage is. The message names the workspace
    and, when known, the field (never the value). An :class:`InvalidInput` (a value the caller
    gave) and a ``CredentialUnavailable`` (in a credential's resolution: an error, never "no
    key").

    :ivar field: the column the store refused, when known.
    :ivar cause: the store's (or its driver's) error, by type and first line.
    """

    def __init__(
        self,
        what: str,
        *,
        workspace_id: str = "*",
        provider: str = "*",
        key_id: str | None = None,
        field: str | None = None,
        cause: str = "",
    ) -> None:
        self.field = field
        self.cause = cause
        where = _where(workspace_id, provider) + (f" (field {field})" if field is not None else "")
        CredentialUnavailable.__init__(
            self,
            f"the key store refused a value while {what}{where}" + (f": {cause}" if cause else ""),
            workspace_id=workspace_id,
            provider=provider,
            key_id=key_id,
        )


class UnknownProvider(InvalidInput):
    """The provider is not one the key store knows."""


class InvalidKeyFormat(InvalidInput):
    """The API key failed a format check; the message never quotes the key."""


class KeyNotFound(ByokError, LookupError):
    """No stored key matched."""

    def __init__(self, workspace_id: str, provider: str | None, what: str = "") -> None:
        self.workspace_id = workspace_id
        self.provider = provider
        scope = f"{provider} key" if provider else "key"
        super().__init__(
            f"no stored {scope}{(' ' + what) if what else ''} in workspace {workspace_id!r}"
        )


class KeyLimitReached(ByokError):
    """The workspace already has the maximum number of keys for this provider."""

    def __init__(self, workspace_id: str, provider: str, limit: int) -> None:
        self.workspace_id = workspace_id
        self.provider = provider
        self.limit = limit
        super().__init__(
            f"workspace {workspace_id!r} already has {limit} {provider} keys, the maximum; "
            f"delete one or replace one by giving its label"
        )


class DuplicateKey(ByokError):
    """The same API key is already stored for this workspace and provider under another label."""

    def __init__(self, workspace_id: str, provider: str, label: str, key_id: str) -> None:
        self.workspace_id = workspace_id
        self.provider = provider
        self.key_id = key_id
        super().__init__(
            f"this {provider} key is already stored in workspace {workspace_id!r} as "
            f"{label!r} ({key_id}); replace that one with --label {label!r}"
        )


class KeyRejected(ByokError):
    """The live check said the key does not work; nothing was stored."""

    def __init__(self, workspace_id: str, provider: str, status: str, message: str) -> None:
        self.workspace_id = workspace_id
        self.provider = provider
        self.status = status
        super().__init__(
            f"{provider} key for workspace {workspace_id!r} not stored: the live check said "
            f"{status}" + (f" ({message})" if message else "")
        )
