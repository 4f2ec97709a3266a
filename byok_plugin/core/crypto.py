"""Keys at rest: the keyring of master keys and AES-256-GCM encryption bound to a key's row.

Stored form of an encrypted API key::

    byok:v1:<master-key-id>:<base64(nonce || ciphertext || tag)>

- AES-256-GCM (``cryptography``'s AESGCM) with a fresh random 96-bit nonce per encryption.
- The associated data binds the ciphertext to its row: the workspace, the provider and the key's
  row id, each length-prefixed (4-byte big-endian length, then UTF-8), after a fixed domain tag.
  So workspace ``a|b`` with provider ``c`` can never produce the bytes of workspace ``a`` with
  provider ``b|c``, and a ciphertext copied to another row, workspace or provider does not
  authenticate.
- The master key id in the stored form says which key of the keyring decrypts it, so master keys
  can be rotated: a new key goes first in the keyring (it encrypts), the old ones still decrypt
  until ``byok keys rewrap`` has moved every row to the new one.

The keyring comes from ``BYOK_ENCRYPTION_KEYS`` (``id:base64key`` entries separated by commas; the
first encrypts) or else from the key file ``byok init`` writes with mode 0600. There is no built-in
default key: without one, :class:`~byok_plugin.core.errors.NoMasterKey` says how to create one.

Fingerprints are HMAC-SHA256 under a key derived (HKDF) from the master key, over the workspace,
the provider and the API key. A plain hash would let anyone holding a database dump confirm
guesses of a short or low-entropy key offline; a keyed one cannot be computed without the master
key, and whoever has the master key can decrypt anyway. Binding the workspace and provider means
equal fingerprints only ever show up within one workspace's keys for one provider, where they are
used to refuse storing the same key twice.

Envelope encryption (opt-in, ``BYOK_KEY_ENVELOPES``, see :mod:`byok_plugin.keys.envelope`): each
workspace gets a random 256-bit data key, stored only wrapped by a key-encryption key (the local
keyring here, or a KMS through the ``byok_wrap_data_key`` / ``byok_unwrap_data_key`` hooks). Its
rows are then encrypted exactly as above, under the data key instead of a master key, with the
same row-bound associated data, stored as ``byok:e1:<base64(nonce || ciphertext || tag)>`` with
``master_key_id`` = :data:`ENVELOPE_MASTER_KEY_ID`. The local keyring wraps a data key with
AES-256-GCM under its current master key, bound to the workspace and the master key id, so a
wrapped data key moved to another workspace or relabelled with another master key id does not
unwrap.

Master keys never appear in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from byok_plugin.core.errors import (
    CiphertextMismatch,
    KeyringError,
    MalformedCiphertext,
    NoMasterKey,
    UnknownMasterKey,
)

__all__ = [
    "ENVELOPE_MASTER_KEY_ID",
    "ENVELOPE_PREFIX",
    "KEY_FILE_HEADER",
    "STORED_PREFIX",
    "DataKey",
    "KeyBinding",
    "Keyring",
    "MasterKey",
    "add_master_key_to_file",
    "create_key_file",
    "generate_master_key",
    "master_key_id_of",
    "parse_keyring",
]

log = logging.getLogger("byok.crypto")

STORED_PREFIX = "byok:v1:"
ENVELOPE_PREFIX = "byok:e1:"
#: the ``master_key_id`` of a row encrypted under its workspace's data key: not a valid master
#: key id (those start with a letter or a digit), so it never names a key of the keyring
ENVELOPE_MASTER_KEY_ID = "@data-key"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_AAD_DOMAIN = b"byok-plugin/workspace-key/v1"
_CHECK_MESSAGE = b"byok-plugin master key check v1"
_FINGERPRINT_INFO = b"byok-plugin fingerprint v1"
_WRAP_DOMAIN = b"byok-plugin/data-key/v1"
_DATA_KEY_CHECK_MESSAGE = b"byok-plugin data key check v1"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

KEY_FILE_HEADER = (
    "# byok-plugin master keys: one 'id:base64' per line. The first line encrypts; the others\n"
    "# only decrypt, until `byok keys rewrap` has moved every stored key off them.\n"
    "# BACK UP THIS FILE somewhere safe. Without it the stored API keys cannot be decrypted.\n"
)


def _length_prefixed(parts: Iterable[str]) -> bytes:
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8")
        out += struct.pack(">I", len(raw))
        out += raw
    return bytes(out)


@dataclass(frozen=True, slots=True)
class KeyBinding:
    """The row a ciphertext belongs to: it goes into the associated data."""

    workspace_id: str
    provider: str
    key_id: str

    def associated_data(self) -> bytes:
        return _AAD_DOMAIN + _length_prefixed((self.workspace_id, self.provider, self.key_id))


@dataclass(frozen=True, slots=True)
class MasterKey:
    """One 256-bit master key and its id. The secret is never in ``repr``."""

    id: str
    secret: bytes = field(repr=False)
    _aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.id):
            raise KeyringError(
                f"master key id {self.id!r} is not valid: use 1-64 letters, digits, '.', '_' or "
                f"'-', starting with a letter or digit"
            )
        if len(self.secret) != KEY_BYTES:
            raise KeyringError(
                f"master key {self.id!r} must be {KEY_BYTES} bytes (256 bits), "
                f"not {len(self.secret)}"
            )
        object.__setattr__(self, "_aead", AESGCM(self.secret))

    def __repr__(self) -> str:
        return f"MasterKey(id={self.id!r})"

    @property
    def check_value(self) -> str:
        """A value that identifies this key without revealing it (HMAC of a fixed message).

        Recorded in the database next to the key id, so that a different key under the same id is
        reported as the wrong master key rather than as tampering.
        """
        return hmac.new(self.secret, _CHECK_MESSAGE, hashlib.sha256).hexdigest()[:32]

    def fingerprint_key(self) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_FINGERPRINT_INFO).derive(
            self.secret
        )


def _seal(aead: AESGCM, plaintext: bytes, associated_data: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, associated_data)


def _open_row(aead: AESGCM, encoded: str, binding: KeyBinding, *, under: str) -> str:
    """Decrypt a row's base64 ``nonce || ciphertext || tag`` or raise a decryption error naming
    the row; ``under`` says which key it should open with (for the tamper message)."""
    where = {
        "workspace_id": binding.workspace_id,
        "provider": binding.provider,
        "key_id": binding.key_id,
    }
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedCiphertext("the stored ciphertext is not valid base64", **where) from None
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise MalformedCiphertext("the stored ciphertext is too short", **where)
    try:
        plain = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], binding.associated_data())
    except InvalidTag:
        raise CiphertextMismatch(
            "the ciphertext does not authenticate for this row: it was altered, copied from "
            f"another row, workspace or provider, or encrypted under another {under}",
            **where,
        ) from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:  # pragma: no cover - authenticated, so written by us
        raise MalformedCiphertext("the decrypted key is not UTF-8", **where) from None


class DataKey:
    """A workspace's unwrapped 256-bit data key (envelope encryption). Never in ``repr``."""

    __slots__ = ("_aead", "_fingerprint_key", "_secret", "workspace_id")

    def __init__(self, workspace_id: str, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
            raise KeyringError(
                f"the data key of workspace {workspace_id!r} must be {KEY_BYTES} bytes"
            )
        self.workspace_id = workspace_id
        self._secret = secret
        self._aead = AESGCM(secret)
        self._fingerprint_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=_FINGERPRINT_INFO
        ).derive(secret)

    def __repr__(self) -> str:
        return f"DataKey(workspace_id={self.workspace_id!r})"

    @property
    def secret(self) -> bytes:
        """The raw key, to wrap it again (``byok keys rewrap``). Never log it."""
        return self._secret

    @property
    def check_value(self) -> str:
        """Identifies this data key without revealing it (an HMAC of a fixed message under it):
        stored next to the wrapped key, so that a KMS answering another key is caught, and a key
        is never stored under a data key that was replaced or destroyed meanwhile."""
        return hmac.new(self._secret, _DATA_KEY_CHECK_MESSAGE, hashlib.sha256).hexdigest()[:32]

    def encrypt(self, plaintext: str, binding: KeyBinding) -> str:
        """Encrypt a row of this workspace, bound to ``binding`` exactly as the keyring does."""
        if binding.workspace_id != self.workspace_id:
            raise KeyringError(
                f"the data key of workspace {self.workspace_id!r} does not encrypt keys of "
                f"workspace {binding.workspace_id!r}"
            )
        sealed = _seal(self._aead, plaintext.encode("utf-8"), binding.associated_data())
        return f"{ENVELOPE_PREFIX}{base64.b64encode(sealed).decode('ascii')}"

    def decrypt(self, stored: str, binding: KeyBinding) -> str:
        if not stored.startswith(ENVELOPE_PREFIX):
            raise MalformedCiphertext(
                f"the stored value is not in the '{ENVELOPE_PREFIX}<base64>' form",
                workspace_id=binding.workspace_id,
                provider=binding.provider,
                key_id=binding.key_id,
            )
        return _open_row(
            self._aead,
            stored[len(ENVELOPE_PREFIX) :],
            binding,
            under="data key (was the workspace's data key replaced or moved?)",
        )

    def fingerprint(self, api_key: str, *, provider: str) -> str:
        """The keyed fingerprint of an API key of this workspace (see the module doc)."""
        digest = hmac.new(
            self._fingerprint_key,
            _length_prefixed((self.workspace_id, provider, api_key)),
            hashlib.sha256,
        ).hexdigest()
        return f"hs256:{digest[:32]}"


def _wrap_associated_data(workspace_id: str, master_key_id: str) -> bytes:
    return _WRAP_DOMAIN + _length_prefixed((workspace_id, master_key_id))


def generate_master_key(key_id: str | None = None) -> MasterKey:
    """A new random master key, with a dated random id unless one is given."""
    if key_id is None:
        key_id = f"mk-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
    return MasterKey(key_id, secrets.token_bytes(KEY_BYTES))


def master_key_id_of(stored: str) -> str | None:
    """The master key id named by a stored value, or ``None`` if the value is not well formed."""
    if not stored.startswith(STORED_PREFIX):
        return None
    kid, sep, _ = stored[len(STORED_PREFIX) :].partition(":")
    return kid if sep and kid else None


def parse_keyring(text: str, *, source: str, separators: str = ",\n") -> list[MasterKey]:
    """Parse ``id:base64key`` entries (comments ``#`` and blank entries skipped).

    Error messages name the source and the entry's position, never the key material.
    """
    entries: list[str] = [text]
    for sep in separators:
        entries = [piece for entry in entries for piece in entry.split(sep)]
    keys: list[MasterKey] = []
    seen: set[str] = set()
    position = 0
    for raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        position += 1
        kid, sep, encoded = entry.partition(":")
        kid = kid.strip()
        if not sep or not kid:
            raise KeyringError(
                f"{source}: entry {position} is not 'id:base64key' (a key id, a colon, then 32 "
                f"random bytes in base64)"
            )
        try:
            secret = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeyringError(
                f"{source}: the key of entry {position} ({kid!r}) is not valid base64"
            ) from None
        if len(secret) != KEY_BYTES:
            raise KeyringError(
                f"{source}: the key of entry {position} ({kid!r}) is {len(secret)} bytes; a "
                f"master key is {KEY_BYTES} random bytes (256 bits) in base64"
            )
        if kid in seen:
            raise KeyringError(f"{source}: master key id {kid!r} appears twice")
        seen.add(kid)
        try:
            keys.append(MasterKey(kid, secret))
        except KeyringError as exc:
            raise KeyringError(f"{source}: entry {position}: {exc}") from None
    return keys


def _check_file_mode(path: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover - POSIX permissions only
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyringError(
            f"master key file {path} is accessible by other users (mode {mode:04o}); "
            f"run `chmod 600 {path}`, and consider the keys in it exposed if others could read it"
        )


class Keyring:
    """An ordered set of master keys: the first encrypts, every one decrypts its own rows."""

    __slots__ = ("_by_id", "_keys", "source")

    def __init__(self, keys: Sequence[MasterKey], *, source: str = "<given>") -> None:
        if not keys:
            raise NoMasterKey(f"{source} holds no master key")
        self._keys = tuple(keys)
        self._by_id = {key.id: key for key in self._keys}
        if len(self._by_id) != len(self._keys):
            raise KeyringError(f"{source}: a master key id appears twice")
        self.source = source

    def __repr__(self) -> str:
        return f"Keyring(ids={list(self.ids)!r}, source={self.source!r})"

    @property
    def current(self) -> MasterKey:
        """The key that encrypts."""
        return self._keys[0]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(key.id for key in self._keys)

    def get(self, key_id: str) -> MasterKey | None:
        return self._by_id.get(key_id)

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def from_environment_value(cls, value: str) -> Keyring:
        keys = parse_keyring(value, source="BYOK_ENCRYPTION_KEYS")
        if not keys:
            raise NoMasterKey(
                "BYOK_ENCRYPTION_KEYS is set but holds no key; give 'id:base64key' entries "
                "separated by commas (32 random bytes each), or unset it and run `byok init`"
            )
        return cls(keys, source="BYOK_ENCRYPTION_KEYS")

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        try:
            _check_file_mode(path)
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NoMasterKey(
                f"no master key: the key file {path} does not exist and BYOK_ENCRYPTION_KEYS "
                f"is not set; run `byok init` to create the key file (then back it up), or set "
                f"BYOK_ENCRYPTION_KEYS='id:base64key' with 32 random bytes"
            ) from None
        except OSError as exc:
            raise KeyringError(
                f"cannot read master key file {path}: {exc.strerror or exc}"
            ) from None
        keys = parse_keyring(text, source=f"master key file {path}", separators="\n")
        if not keys:
            raise NoMasterKey(
                f"master key file {path} holds no key; move it away and run `byok init`"
            )
        return cls(keys, source=f"key file {path}")

    @classmethod
    def load(cls, *, encryption_keys: str | None, key_file: Path) -> Keyring:
        """The keyring of a configuration: the environment's keys, else the key file."""
        if encryption_keys is not None and encryption_keys.strip():
            return cls.from_environment_value(encryption_keys)
        return cls.from_file(key_file)

    def check_retirable(self, key_id: str) -> None:
        """Raise :class:`KeyringError` unless ``key_id`` is in the keyring and is not the current
        (encrypting) key. Whether stored keys still use it is the store's to say."""
        if self.get(key_id) is None:
            raise KeyringError(
                f"{self.source} holds no master key {key_id!r} (it holds {', '.join(self.ids)})"
            )
        if self.current.id == key_id:
            raise KeyringError(
                f"master key {key_id} is the current one: it encrypts every key stored from now "
                f"on. Add a new one first (`byok init --new-master-key`), move the stored keys to "
                f"it (`byok keys rewrap`), then retire {key_id}"
            )

    # --- encryption ------------------------------------------------------------------------

    def encrypt(self, plaintext: str, binding: KeyBinding) -> str:
        """Encrypt under the current master key, bound to ``binding``'s row."""
        key = self.current
        nonce = os.urandom(NONCE_BYTES)
        sealed = key._aead.encrypt(nonce, plaintext.encode("utf-8"), binding.associated_data())
        return f"{STORED_PREFIX}{key.id}:{base64.b64encode(nonce + sealed).decode('ascii')}"

    def decrypt(self, stored: str, binding: KeyBinding) -> str:
        """Decrypt a stored value for ``binding``'s row, or raise a
        :class:`~byok_plugin.core.errors.KeyDecryptionError` naming the row. Never ``None``."""
        where = {
            "workspace_id": binding.workspace_id,
            "provider": binding.provider,
            "key_id": binding.key_id,
        }
        kid = master_key_id_of(stored)
        if kid is None:
            raise MalformedCiphertext(
                f"the stored value is not in the '{STORED_PREFIX}<master-key-id>:<base64>' form",
                **where,
            )
        key = self._by_id.get(kid)
        if key is None:
            raise UnknownMasterKey(kid, **where)
        encoded = stored[len(STORED_PREFIX) + len(kid) + 1 :]
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedCiphertext(
                "the stored ciphertext is not valid base64", **where
            ) from None
        if len(raw) < NONCE_BYTES + TAG_BYTES:
            raise MalformedCiphertext("the stored ciphertext is too short", **where)
        try:
            plain = key._aead.decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], binding.associated_data()
            )
        except InvalidTag:
            raise CiphertextMismatch(
                "the ciphertext does not authenticate for this row: it was altered, copied from "
                "another row, workspace or provider, or encrypted under another master key with "
                "the same id",
                **where,
            ) from None
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError:  # pragma: no cover - authenticated, so written by us
            raise MalformedCiphertext("the decrypted key is not UTF-8", **where) from None

    def wrap_data_key(self, workspace_id: str, data_key: bytes) -> tuple[str, bytes]:
        """Wrap a workspace's data key under the current master key, bound to the workspace and
        the master key id. :returns: ``(master key id, nonce || ciphertext || tag)``."""
        key = self.current
        return key.id, _seal(key._aead, data_key, _wrap_associated_data(workspace_id, key.id))

    def unwrap_data_key(self, workspace_id: str, master_key_id: str, blob: bytes) -> bytes:
        """Unwrap a data key wrapped by :meth:`wrap_data_key` for ``workspace_id``.

        :raises KeyringError: the master key is not in the keyring, or the wrapped key does not
            authenticate (altered, moved from another workspace, or labelled with another master
            key id). The message names the workspace and master key, never key material.
        """
        key = self._by_id.get(master_key_id)
        if key is None:
            raise KeyringError(
                f"the data key of workspace {workspace_id!r} is wrapped under master key "
                f"{master_key_id!r}, which is not in {self.source} (it holds "
                f"{', '.join(self.ids)}); add that master key back"
            )
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise KeyringError(f"the wrapped data key of workspace {workspace_id!r} is too short")
        try:
            return key._aead.decrypt(
                blob[:NONCE_BYTES],
                blob[NONCE_BYTES:],
                _wrap_associated_data(workspace_id, master_key_id),
            )
        except InvalidTag:
            raise KeyringError(
                f"the wrapped data key of workspace {workspace_id!r} does not authenticate under "
                f"master key {master_key_id!r}: it was altered, moved from another workspace, or "
                f"wrapped under another master key"
            ) from None

    def fingerprint(
        self, api_key: str, *, workspace_id: str, provider: str, master_key_id: str
    ) -> str:
        """The keyed fingerprint of an API key, under the given master key (see the module doc)."""
        key = self._by_id.get(master_key_id)
        if key is None:
            raise KeyringError(f"master key {master_key_id!r} is not in the keyring")
        digest = hmac.new(
            key.fingerprint_key(),
            _length_prefixed((workspace_id, provider, api_key)),
            hashlib.sha256,
        ).hexdigest()
        return f"hs256:{digest[:32]}"


# --- the key file ----------------------------------------------------------------------------


def _encode_line(key: MasterKey) -> str:
    return f"{key.id}:{base64.b64encode(key.secret).decode('ascii')}\n"


def _make_private_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)


def create_key_file(path: Path) -> MasterKey:
    """Write a new key file holding one fresh master key, mode 0600. Never overwrites a file.

    :raises KeyringError: if the file already exists (it may hold the only copy of a key).
    """
    key = generate_master_key()
    try:
        _make_private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyringError(
            f"master key file {path} already exists; it is never overwritten (it may hold the "
            f"only copy of the key your stored API keys need)"
        ) from None
    except OSError as exc:
        raise KeyringError(f"cannot create master key file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(KEY_FILE_HEADER)
        handle.write(_encode_line(key))
        handle.flush()
        os.fsync(handle.fileno())
    log.info("created master key file %s with master key %s", path, key.id)
    return key


@contextmanager
def _key_file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock (``flock`` on ``.<name>.lock`` beside the key file) while the file
    is read, changed and replaced, so that two commands editing it never lose each other's key."""
    if sys.platform == "win32":  # pragma: no cover - POSIX locks only
        yield
        return
    import fcntl

    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file (never an existing one), mode 0600, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op elsewhere)."""
    if sys.platform == "win32":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_key_file(path: Path, keys: Sequence[MasterKey]) -> None:
    """Write ``keys`` (the first encrypts) to ``path`` atomically, mode 0600: a temporary file in
    the same directory, flushed to disk, renamed over the old one, the rename made durable."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_private(tmp, KEY_FILE_HEADER + "".join(_encode_line(k) for k in keys))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def add_master_key_to_file(path: Path) -> MasterKey:
    """Put a fresh master key first in an existing key file (it encrypts from now on), keeping
    the others so that existing rows still decrypt. Replaces the file atomically, mode 0600."""
    with _key_file_lock(path):
        existing = Keyring.from_file(path)
        key = generate_master_key()
        while existing.get(key.id) is not None:  # pragma: no cover - 24 random bits, same day
            key = generate_master_key()
        _replace_key_file(path, [key, *existing._keys])
    log.info("added master key %s to %s", key.id, path)
    return key


def remove_master_key_from_file(path: Path, key_id: str) -> Path:
    """Take a master key that is not the current one out of a key file, keeping the others in
    their order. Replaces the file atomically, mode 0600. The caller checks first that no stored
    key is encrypted under it (:meth:`byok_plugin.keys.service.KeyService.retire_master_key`).

    The removed key is first written alone to ``<file>.retired-<id>`` (mode 0600) beside the
    file: a database the check did not see may still need it.

    :returns: that file.
    :raises KeyringError: the file holds no such key, or it is the current (first) one.
    """
    with _key_file_lock(path):
        existing = Keyring.from_file(path)
        existing.check_retirable(key_id)
        retired = existing.get(key_id)
        assert retired is not None
        keep = path.with_name(f"{path.name}.retired-{key_id}")
        text = (
            f"# master key {key_id}, retired from {path} on {datetime.now(UTC):%Y-%m-%d %H:%M} "
            f"UTC.\n# Keep it offline until no database can need it; put the line back in the "
            f"key file to use it again.\n" + _encode_line(retired)
        )
        try:
            _write_private(keep, text)
        except FileExistsError:  # retired before, put back, retired again
            keep = keep.with_name(f"{keep.name}-{secrets.token_hex(3)}")
            _write_private(keep, text)
        _sync_directory(path.parent)
        _replace_key_file(path, [k for k in existing._keys if k.id != key_id])
    log.info("removed master key %s from %s (kept in %s)", key_id, path, keep)
    return keep


def restore_master_key_to_file(path: Path, key: MasterKey) -> None:
    """Put a retired master key back at the end of the key file (it decrypts, never encrypts)."""
    with _key_file_lock(path):
        existing = Keyring.from_file(path)
        if existing.get(key.id) is None:
            _replace_key_file(path, [*existing._keys, key])
    log.info("put master key %s back in %s", key.id, path)
