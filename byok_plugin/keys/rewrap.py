"""Rewrap: re-encrypt every stored key under the keyring's current (first) master key, or, under
envelope encryption (``BYOK_KEY_ENVELOPES``), under its workspace's data key.

Under envelope encryption a run first rewraps the data keys not wrapped by the current
key-encryption key (inside the KMS through ``byok_rewrap_data_key`` when it can: Transit's
rewrap, KMS ReEncrypt; else unwrapped with the old one and wrapped with the new one; rows are
not touched: a
rotation of the key-encryption key costs one KMS round trip per workspace, not one per row), then
moves rows still encrypted directly under a master key to their workspace's data key. Without
envelope encryption, rows under a data key move back to the current master key.

- Batched: each batch is read, decrypted and re-encrypted in memory, then written in one short
  transaction; a row changed meanwhile (replaced, deleted) is left alone.
- Idempotent and resumable: only rows not yet under the current master key are read, so a run
  killed at any point and started again carries on where the last committed batch ended, and a
  run with nothing to do changes nothing.
- Rows that do not decrypt are reported (workspace, provider, key id, reason) and skipped; the
  others are still rewrapped.
- ``dry_run`` decrypts (to find the rows that would fail) but writes nothing.

Afterwards no row names the old master keys, which can then be removed from the keyring.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from byok_plugin.core.crypto import ENVELOPE_MASTER_KEY_ID, KEY_BYTES, Keyring
from byok_plugin.core.errors import KeyDecryptionError, KeyringError
from byok_plugin.keys.access import KeyAccess
from byok_plugin.keys.envelope import LocalKeyEncryption
from byok_plugin.store.keys_repo import KeyStore, StoredKey

if TYPE_CHECKING:
    from byok_plugin.keys.envelope import DataKeys

__all__ = ["RewrapFailure", "RewrapReport", "rewrap_all"]

#: the workspace id a throw-away data key is wrapped for, to learn the current key-encryption key
_PROBE_WORKSPACE = "byok-rewrap-probe"

log = logging.getLogger("byok.keys")


@dataclass(frozen=True, slots=True)
class RewrapFailure:
    key_id: str
    workspace_id: str
    provider: str
    master_key_id: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class RewrapReport:
    """Rows per master key id before and after, how many were (or would be) rewrapped, and the
    rows that could not be decrypted."""

    current_master_key: str
    keyring_ids: tuple[str, ...]
    before: Mapping[str, int]
    after: Mapping[str, int]
    rewrapped: int
    failures: tuple[RewrapFailure, ...]
    dry_run: bool
    #: envelope encryption: the key-encryption key (``provider:key-id``) data keys are moved to,
    #: how many were (or would be) rewrapped, and data keys per key-encryption key afterwards
    kek: str | None = None
    data_keys_rewrapped: int = 0
    data_keys_after: Mapping[str, int] = field(default_factory=dict)

    @property
    def retirable(self) -> tuple[str, ...]:
        """Keyring ids other than the current one that no row and no data key uses any more."""
        wrapping = {
            name.partition(":")[2] for name in self.data_keys_after if name.startswith("local:")
        }
        return tuple(
            kid
            for kid in self.keyring_ids
            if kid != self.current_master_key
            and (self.kek is None or f"local:{kid}" != self.kek)
            and not self.after.get(kid)
            and kid not in wrapping
        )

    @property
    def rows_under(self) -> str:
        """Where every row goes: the current master key, or (envelopes) the data keys."""
        return ENVELOPE_MASTER_KEY_ID if self.kek is not None else self.current_master_key

    @property
    def complete(self) -> bool:
        return (
            not self.failures
            and all(kid == self.rows_under for kid, count in self.after.items() if count)
            and all(name == self.kek for name, n in self.data_keys_after.items() if n)
        )


def rewrap_all(
    store: KeyStore,
    access: KeyAccess,
    keyring: Keyring | None,
    *,
    batch_size: int = 100,
    dry_run: bool = False,
    pause: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    data_keys: DataKeys | None = None,
    envelopes: bool = False,
) -> RewrapReport:
    """Re-encrypt every row not under ``keyring.current`` (see the module docstring), or, with
    ``envelopes``, every row not under its workspace's data key, after rewrapping the data keys.

    :param progress: called after each batch with ``(rows rewrapped in it, total so far)``.
    :param pause: seconds to wait between batches, to spare a busy database.
    :raises DataKeyUnavailable: the key-encryption provider does not answer (nothing is half
        done: each data key and each batch is written in its own transaction).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if envelopes and data_keys is None:
        raise ValueError("envelope encryption needs the data keys")
    if keyring is None and not envelopes:
        raise ValueError("rewrapping to a master key needs the keyring")
    current = keyring.current if keyring is not None else None
    target = ENVELOPE_MASTER_KEY_ID if envelopes or current is None else current.id
    kek: str | None = None
    data_keys_done = 0
    if envelopes:
        assert data_keys is not None
        kek, data_keys_done = _rewrap_data_keys(
            data_keys, batch_size=batch_size, dry_run=dry_run, pause=pause
        )
    elif not dry_run and current is not None:
        store.record_master_key(current)
    before = store.count_by_master_key()
    total = 0
    failures: list[RewrapFailure] = []
    after_id: str | None = None
    while True:
        batch = store.batch_not_under(target, after_id=after_id, limit=batch_size)
        if not batch:
            break
        after_id = batch[-1].id
        updates: list[tuple[StoredKey, str, str, str]] = []
        for row in batch:
            try:
                plain = access.decrypt(row)
            except KeyDecryptionError as exc:
                failures.append(
                    RewrapFailure(
                        row.id,
                        row.workspace_id,
                        row.provider,
                        row.master_key_id,
                        exc.reason,
                        str(exc),
                    )
                )
                continue
            if envelopes:
                assert data_keys is not None
                data_key = (
                    data_keys.get(row.workspace_id)
                    if dry_run
                    else data_keys.get_or_create(row.workspace_id)
                )
                if data_key is None:  # dry run, no data key yet: it would be created
                    del plain
                    updates.append((row, "", target, ""))
                    continue
                ciphertext = data_key.encrypt(plain, row.binding)
                fingerprint = data_key.fingerprint(plain, provider=row.provider)
            else:
                assert keyring is not None
                assert current is not None
                ciphertext = keyring.encrypt(plain, row.binding)
                fingerprint = keyring.fingerprint(
                    plain,
                    workspace_id=row.workspace_id,
                    provider=row.provider,
                    master_key_id=current.id,
                )
            updates.append((row, ciphertext, target, fingerprint))
            del plain
        done = len(updates) if dry_run else store.swap_ciphertexts(updates)
        total += done
        log.debug("rewrap batch: %d rows (%d so far)", done, total)
        if progress is not None:
            progress(done, total)
        if pause > 0:
            time.sleep(pause)
    after = dict(before) if dry_run else store.count_by_master_key()
    return RewrapReport(
        current_master_key=current.id if current is not None else "",
        keyring_ids=keyring.ids if keyring is not None else (),
        before=before,
        after=after,
        rewrapped=total,
        failures=tuple(failures),
        dry_run=dry_run,
        kek=kek,
        data_keys_rewrapped=data_keys_done,
        data_keys_after=data_keys.store.count_by_kek() if data_keys is not None else {},
    )


def _rewrap_data_keys(
    data_keys: DataKeys, *, batch_size: int, dry_run: bool, pause: float
) -> tuple[str, int]:
    """Move every data key to the current key-encryption key (rows untouched).

    :returns: the current key-encryption key (``provider:key-id``) and how many data keys were
        (or would be) rewrapped.
    """
    probe = data_keys.wrap(_PROBE_WORKSPACE, secrets.token_bytes(KEY_BYTES))
    if probe.provider == LocalKeyEncryption.name:
        data_keys.refuse_leaving_kms(
            "rewrap the data keys with the local keyring (BYOK_KEY_PROVIDER is local)"
        )
    done = 0
    after: str | None = None
    while True:
        batch = data_keys.store.batch_not_under(
            probe.provider, probe.key_id, after=after, limit=batch_size
        )
        if not batch:
            break
        after = batch[-1].workspace_id
        for stored in batch:
            if dry_run:
                data_keys.unwrap(stored)  # raises, naming the KMS: stop here
                done += 1
                continue
            wrapped = data_keys.rewrap(stored)  # inside the KMS when it can (raises: stop)
            if (wrapped.provider, wrapped.key_id) != (probe.provider, probe.key_id):
                raise KeyringError(
                    f"the key-encryption provider changed during the rewrap (it wrapped with "
                    f"{wrapped.provider}:{wrapped.key_id}, then {probe.provider}:{probe.key_id}); "
                    f"run `byok keys rewrap` again"
                )
            if data_keys.store.swap(stored, wrapped):
                done += 1
        log.debug("rewrap: %d data keys so far", done)
        if pause > 0:
            time.sleep(pause)
    return f"{probe.provider}:{probe.key_id}", done
