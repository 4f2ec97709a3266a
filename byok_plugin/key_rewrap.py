"""Rewrap: re-encrypt every stored key under the keyring's current (first) master key.

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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from byok_plugin.crypto import Keyring
from byok_plugin.key_access import KeyAccess
from byok_plugin.key_errors import KeyDecryptionError
from byok_plugin.store.keys_repo import KeyStore, StoredKey

__all__ = ["RewrapFailure", "RewrapReport", "rewrap_all"]

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

    @property
    def retirable(self) -> tuple[str, ...]:
        """Keyring ids other than the current one that no row uses any more."""
        return tuple(
            kid
            for kid in self.keyring_ids
            if kid != self.current_master_key and not self.after.get(kid)
        )

    @property
    def complete(self) -> bool:
        return not self.failures and all(
            kid == self.current_master_key for kid, count in self.after.items() if count
        )


def rewrap_all(
    store: KeyStore,
    access: KeyAccess,
    keyring: Keyring,
    *,
    batch_size: int = 100,
    dry_run: bool = False,
    pause: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> RewrapReport:
    """Re-encrypt every row not under ``keyring.current`` (see the module docstring).

    :param progress: called after each batch with ``(rows rewrapped in it, total so far)``.
    :param pause: seconds to wait between batches, to spare a busy database.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    current = keyring.current
    if not dry_run:
        store.record_master_key(current)
    before = store.count_by_master_key()
    total = 0
    failures: list[RewrapFailure] = []
    after_id: str | None = None
    while True:
        batch = store.batch_not_under(current.id, after_id=after_id, limit=batch_size)
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
            updates.append(
                (
                    row,
                    keyring.encrypt(plain, row.binding),
                    current.id,
                    keyring.fingerprint(
                        plain,
                        workspace_id=row.workspace_id,
                        provider=row.provider,
                        master_key_id=current.id,
                    ),
                )
            )
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
        current_master_key=current.id,
        keyring_ids=keyring.ids,
        before=before,
        after=after,
        rewrapped=total,
        failures=tuple(failures),
        dry_run=dry_run,
    )
