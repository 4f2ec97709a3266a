"""The key management service: what a workspace admin (or the local operator) does with keys.

Library API first; the ``byok keys`` CLI and the HTTP API sit on top of it, so authorization and
audit are the same everywhere:

- every call takes an :class:`~byok_hookspecs.Actor` and asks ``byok_authorize``: listing needs
  :attr:`~byok_hookspecs.Action.READ_KEYS` (members), anything else
  :attr:`~byok_hookspecs.Action.MANAGE_KEYS` (admins); no answer (``None``) means deny;
- every change and every denial goes to ``byok_audit``;
- input is checked before anything is written, and a key is never echoed: results carry the
  masked hint and the key's id only;
- listing never decrypts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy
from byok_hookspecs import Action, Actor, AuditEvent, KeyCheck, KeyCheckStatus, NotAuthorized

from byok_plugin.core.crypto import (
    ENVELOPE_MASTER_KEY_ID,
    KeyBinding,
    Keyring,
    remove_master_key_from_file,
    restore_master_key_to_file,
)
from byok_plugin.core.errors import (
    DataKeyUnavailable,
    InvalidInput,
    KeyNotFound,
    KeyRejected,
    KeyringError,
)
from byok_plugin.core.key_format import (
    check_api_key,
    check_key_id,
    check_label,
    check_provider,
    check_workspace_id,
    mask,
)
from byok_plugin.keys.access import KeyAccess
from byok_plugin.keys.rewrap import RewrapReport, rewrap_all
from byok_plugin.store.keys_repo import KeyInfo, KeyStore, NewKey, new_key_id

if TYPE_CHECKING:
    from byok_plugin.app import App
    from byok_plugin.keys.envelope import DataKeys

__all__ = ["KeyService", "KeyTestResult", "SetKeyResult"]

log = logging.getLogger("byok.keys")

#: what a worker without envelope encryption does with keys (in a refusal's message)
_DIRECTLY = (
    "directly under a master key (envelope encryption is off: BYOK_KEY_ENVELOPES=0, or no "
    "BYOK_KEY_PROVIDER)"
)


@dataclass(frozen=True, slots=True)
class SetKeyResult:
    """What :meth:`KeyService.set_key` did: the stored key (masked), the key it replaced, the
    live check's outcome (``None`` when not tested) and the format warnings."""

    key: KeyInfo
    replaced: KeyInfo | None
    check: KeyCheck | None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyTestResult:
    key: KeyInfo
    check: KeyCheck


def _actor_id(actor: Actor | None) -> str | None:
    return actor.id if actor is not None else None


class KeyService:
    """Set, list, delete, enable, disable and test a workspace's stored provider keys.

    :param store: the key repository.
    :param access: decrypts stored keys (for ``test``).
    :param keyring: returns the keyring (only writing and testing need it).
    :param pm: the plugin manager whose ``byok_authorize``, ``byok_audit`` and
        ``byok_validate_key`` hooks decide, record and check.
    """

    def __init__(
        self,
        *,
        store: KeyStore,
        access: KeyAccess,
        keyring: Callable[[], Keyring],
        pm: pluggy.PluginManager,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        key_file: Path | None = None,
        data_keys: DataKeys | None = None,
        envelopes: bool = False,
    ) -> None:
        """:param key_file: the master key file the keyring is read from; ``None`` when the
        master keys come from ``BYOK_ENCRYPTION_KEYS`` (this service cannot edit those).
        :param data_keys: the workspaces' data keys (envelope encryption).
        :param envelopes: encrypt new keys under their workspace's data key (``data_keys``
            required), not directly under the current master key."""
        if envelopes and data_keys is None:
            raise ValueError("envelope encryption needs the data keys")
        self._data_keys = data_keys
        self._envelopes = envelopes
        self._key_file = key_file
        self._store = store
        self._access = access
        self._keyring = keyring
        self._pm = pm
        self._clock = clock
        self._recorded_master_keys: set[str] = set()

    @classmethod
    def for_app(cls, app: App, pm: pluggy.PluginManager) -> KeyService:
        """The service over ``app``'s store and keyring, asking ``pm``'s hooks."""
        return cls(
            store=app.key_store,
            access=app.key_access,
            keyring=lambda: app.keyring,
            pm=pm,
            clock=app.clock,
            key_file=None if app.settings.encryption_keys else app.settings.key_file,
            data_keys=app.data_keys,
            envelopes=app.settings.key_envelopes,
        )

    def __repr__(self) -> str:
        return f"KeyService({self._store!r})"

    # --- authorization and audit -----------------------------------------------------------

    def audit(
        self,
        action: str,
        actor: Actor | None,
        workspace_id: str,
        *,
        outcome: str = "ok",
        provider: str | None = None,
        key_id: str | None = None,
        detail: str = "",
    ) -> None:
        """Emit one audit event through ``byok_audit`` (every implementation runs)."""
        self._pm.hook.byok_audit(
            event=AuditEvent(
                action=action,
                workspace_id=workspace_id,
                actor_id=_actor_id(actor),
                outcome=outcome,
                provider=provider,
                key_id=key_id,
                detail=detail,
                occurred_at=self._clock(),
            )
        )

    def authorize(
        self,
        actor: Actor | None,
        workspace_id: str,
        action: Action,
        *,
        what: str,
        provider: str | None = None,
        key_id: str | None = None,
    ) -> None:
        """Ask ``byok_authorize``; anything but ``True`` is a denial, audited, then raised."""
        allowed = self._pm.hook.byok_authorize(
            actor=actor, workspace_id=workspace_id, action=action
        )
        if allowed is True:
            return
        log.info(
            "denied %s (%s) to %s in workspace %s",
            action.value,
            what,
            _actor_id(actor) or "anonymous",
            workspace_id,
        )
        self.audit(
            "access.denied",
            actor,
            workspace_id,
            outcome="denied",
            provider=provider,
            key_id=key_id,
            detail=f"{action.value}: {what}"
            + ("" if allowed is False else " (no authorization answer)"),
        )
        raise NotAuthorized(
            _actor_id(actor), workspace_id, action.value, _no_authorizer_hint(self._pm)
        )

    # --- reading ---------------------------------------------------------------------------

    def list_keys(
        self, actor: Actor | None, workspace_id: str, provider: str | None = None
    ) -> list[KeyInfo]:
        """The workspace's keys, masked (never decrypted), by provider then age."""
        workspace_id = check_workspace_id(workspace_id)
        provider = check_provider(provider) if provider is not None else None
        self.authorize(actor, workspace_id, Action.READ_KEYS, what="list keys", provider=provider)
        return self._store.list_keys(workspace_id, provider)

    # --- changing --------------------------------------------------------------------------

    def set_key(
        self,
        actor: Actor | None,
        workspace_id: str,
        provider: str,
        api_key: str,
        *,
        label: str | None = None,
        test: bool = True,
    ) -> SetKeyResult:
        """Store a key for a provider, or replace the key with the same label (``default`` when
        none is given). The replaced key's row is deleted and the new key gets a new id.

        :param test: check the key live first (``byok_validate_key``); a key the provider
            refuses, or a provider that cannot be reached, is not stored.
        :raises NotAuthorized: the actor may not manage the workspace's keys (audited).
        :raises InvalidInput: a malformed provider, workspace, label or key (never quoted).
        :raises KeyRejected: the live check did not pass.
        :raises KeyLimitReached, DuplicateKey: see :meth:`KeyStore.put`.
        """
        workspace_id = check_workspace_id(workspace_id)
        provider = check_provider(provider)
        self.authorize(actor, workspace_id, Action.MANAGE_KEYS, what="set a key", provider=provider)
        label = check_label(label)
        fmt = check_api_key(provider, api_key)
        for warning in fmt.warnings:
            log.warning("%s key for workspace %s: %s", provider, workspace_id, warning)
        if self._envelopes:
            assert self._data_keys is not None
            data_key = self._data_keys.get_or_create(workspace_id)  # a KMS that fails: now
        else:
            if self._data_keys is not None:
                self._data_keys.refuse_leaving_kms(f"store keys {_DIRECTLY}")
            keyring = self._keyring()
            self._record_master_key(keyring)

        result_check: KeyCheck | None = None
        if test:
            result_check = self._validate(provider, api_key)
            if result_check.status in (KeyCheckStatus.INVALID, KeyCheckStatus.UNREACHABLE):
                self.audit(
                    "key.rejected",
                    actor,
                    workspace_id,
                    outcome="error",
                    provider=provider,
                    detail=f"live check: {result_check.status.value}",
                )
                hint = (
                    "; store it without the live check with --no-test (test=False) if you are sure"
                    if result_check.status is KeyCheckStatus.UNREACHABLE
                    else ""
                )
                raise KeyRejected(
                    workspace_id, provider, result_check.status.value, result_check.message + hint
                )

        key_id = new_key_id()
        binding = KeyBinding(workspace_id, provider, key_id)
        if self._envelopes:
            ciphertext = data_key.encrypt(api_key, binding)
            master_key_id = ENVELOPE_MASTER_KEY_ID
            fingerprint = data_key.fingerprint(api_key, provider=provider)
        else:
            ciphertext = keyring.encrypt(api_key, binding)
            master_key_id = keyring.current.id
            fingerprint = keyring.fingerprint(
                api_key, workspace_id=workspace_id, provider=provider, master_key_id=master_key_id
            )
        new = NewKey(
            id=key_id,
            workspace_id=workspace_id,
            provider=provider,
            label=label,
            ciphertext=ciphertext,
            master_key_id=master_key_id,
            hint=mask(api_key),
            fingerprint=fingerprint,
            actor_id=_actor_id(actor),
        )

        def fingerprint_of(master_key_id: str) -> str | None:
            try:
                if master_key_id == ENVELOPE_MASTER_KEY_ID:
                    found = self._data_keys.get(workspace_id) if self._data_keys else None
                    return found.fingerprint(api_key, provider=provider) if found else None
                return self._keyring().fingerprint(
                    api_key,
                    workspace_id=workspace_id,
                    provider=provider,
                    master_key_id=master_key_id,
                )
            except KeyringError:
                return None

        try:
            stored, replaced = self._store.put(
                new,
                fingerprint_of=fingerprint_of,
                data_key_check=data_key.check_value if self._envelopes else None,
            )
        except DataKeyUnavailable:
            if self._data_keys is not None:
                self._data_keys.forget(workspace_id)  # a stale cached data key: read it again
            raise
        detail = f"label {label!r}, {stored.hint}"
        if result_check is not None:
            detail += f", live check {result_check.status.value}"
        if replaced is not None:
            detail += f", replaces {replaced.id}"
        self.audit(
            "key.replaced" if replaced else "key.created",
            actor,
            workspace_id,
            provider=provider,
            key_id=stored.id,
            detail=detail,
        )
        log.info(
            "%s %s key %s (%s) in workspace %s",
            "replaced" if replaced else "stored",
            provider,
            stored.id,
            stored.hint,
            workspace_id,
        )
        return SetKeyResult(
            key=stored.info(), replaced=replaced, check=result_check, warnings=fmt.warnings
        )

    def delete_keys(
        self,
        actor: Actor | None,
        workspace_id: str,
        provider: str,
        *,
        key_id: str | None = None,
        label: str | None = None,
    ) -> list[KeyInfo]:
        """Delete the provider's key with this id or label, or all of its keys when neither is
        given.

        :raises KeyNotFound: nothing matched.
        """
        workspace_id, provider, key_id, label = self._selection(
            workspace_id, provider, key_id, label
        )
        self.authorize(
            actor,
            workspace_id,
            Action.MANAGE_KEYS,
            what="delete keys",
            provider=provider,
            key_id=key_id,
        )
        deleted = self._store.delete(workspace_id, provider, key_id=key_id, label=label)
        if not deleted:
            raise KeyNotFound(workspace_id, provider, self._describe(key_id, label))
        for info in deleted:
            self.audit(
                "key.deleted",
                actor,
                workspace_id,
                provider=provider,
                key_id=info.id,
                detail=f"label {info.label!r}, {info.hint}",
            )
        return deleted

    def delete_workspace(self, actor: Actor | None, workspace_id: str) -> tuple[int, bool]:
        """Delete every stored key of a workspace and destroy its data key (crypto-shredding):
        copies of its rows (a backup, a dump) can no longer be decrypted, with any master key.

        :returns: ``(keys deleted, whether a data key was destroyed)``.
        """
        workspace_id = check_workspace_id(workspace_id)
        self.authorize(actor, workspace_id, Action.MANAGE_KEYS, what="delete the workspace's keys")
        if self._data_keys is None:
            deleted = len(self._store.delete(workspace_id, None))
            shredded = False
        else:
            deleted, shredded = self._data_keys.store.delete_workspace(workspace_id)
            self._data_keys.forget(workspace_id)
        self.audit(
            "key.deleted",
            actor,
            workspace_id,
            detail=f"workspace deleted: {deleted} keys"
            + (", data key destroyed" if shredded else ""),
        )
        return deleted, shredded

    def enable(
        self,
        actor: Actor | None,
        workspace_id: str,
        provider: str,
        *,
        key_id: str | None = None,
        label: str | None = None,
    ) -> list[KeyInfo]:
        """Enable the matching keys (all of the provider's when no id or label): resolution may
        use them again, and any cooldown ends."""
        return self._set_status(actor, workspace_id, provider, "enabled", key_id, label)

    def disable(
        self,
        actor: Actor | None,
        workspace_id: str,
        provider: str,
        *,
        key_id: str | None = None,
        label: str | None = None,
    ) -> list[KeyInfo]:
        """Disable the matching keys: kept, listed, never used for calls."""
        return self._set_status(actor, workspace_id, provider, "disabled", key_id, label)

    def _set_status(
        self,
        actor: Actor | None,
        workspace_id: str,
        provider: str,
        status: str,
        key_id: str | None,
        label: str | None,
    ) -> list[KeyInfo]:
        workspace_id, provider, key_id, label = self._selection(
            workspace_id, provider, key_id, label
        )
        verb = "enable" if status == "enabled" else "disable"
        self.authorize(
            actor,
            workspace_id,
            Action.MANAGE_KEYS,
            what=f"{verb} keys",
            provider=provider,
            key_id=key_id,
        )
        changed = self._store.set_status(
            workspace_id, provider, status, actor_id=_actor_id(actor), key_id=key_id, label=label
        )
        if not changed:
            raise KeyNotFound(workspace_id, provider, self._describe(key_id, label))
        for info in changed:
            self.audit(
                f"key.{status}",
                actor,
                workspace_id,
                provider=provider,
                key_id=info.id,
                detail=f"label {info.label!r}",
            )
        return changed

    # --- testing ---------------------------------------------------------------------------

    def test_keys(
        self,
        actor: Actor | None,
        workspace_id: str,
        provider: str,
        *,
        key_id: str | None = None,
        label: str | None = None,
    ) -> list[KeyTestResult]:
        """Check stored keys live through ``byok_validate_key`` (all of the provider's keys when
        no id or label is given).

        :raises KeyNotFound: nothing matched.
        :raises KeyDecryptionError: a stored key does not decrypt (audited as an error).
        """
        workspace_id, provider, key_id, label = self._selection(
            workspace_id, provider, key_id, label
        )
        self.authorize(
            actor,
            workspace_id,
            Action.MANAGE_KEYS,
            what="test keys",
            provider=provider,
            key_id=key_id,
        )
        rows = self._store.find(workspace_id, provider, key_id=key_id, label=label)
        if not rows:
            raise KeyNotFound(workspace_id, provider, self._describe(key_id, label))
        results = []
        for row in rows:
            try:
                api_key = self._access.decrypt(row)
            except Exception as exc:
                self.audit(
                    "key.tested",
                    actor,
                    workspace_id,
                    outcome="error",
                    provider=provider,
                    key_id=row.id,
                    detail=f"does not decrypt: {getattr(exc, 'reason', type(exc).__name__)}",
                )
                raise
            check = self._validate(provider, api_key)
            del api_key
            self.audit(
                "key.tested",
                actor,
                workspace_id,
                outcome="ok" if check.status is not KeyCheckStatus.INVALID else "error",
                provider=provider,
                key_id=row.id,
                detail=f"live check {check.status.value}",
            )
            results.append(KeyTestResult(key=row.info(), check=check))
        return results

    # --- master key rotation ---------------------------------------------------------------

    def rewrap(
        self,
        actor: Actor | None,
        *,
        batch_size: int = 100,
        dry_run: bool = False,
        pause: float = 0.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> RewrapReport:
        """Re-encrypt every stored key under the current master key (see
        :mod:`byok_plugin.keys.rewrap`). Only the local operator, who holds the master keys, may.
        """
        self._require_operator(actor, "keys.rewrap", "rewrap")
        keyring: Keyring | None
        try:
            keyring = self._keyring()
        except KeyringError:
            if not self._envelopes:
                raise
            keyring = None  # a KMS wraps the data keys: no local master key is needed
        if not self._envelopes and self._data_keys is not None:
            self._data_keys.refuse_leaving_kms(f"move every key {_DIRECTLY}")
        report = rewrap_all(
            self._store,
            self._access,
            keyring,
            batch_size=batch_size,
            dry_run=dry_run,
            pause=pause,
            progress=progress,
            data_keys=self._data_keys,
            envelopes=self._envelopes,
        )
        if not dry_run:
            if keyring is not None and not self._envelopes:
                self._recorded_master_keys.add(keyring.current.id)
            self.audit(
                "key.rewrapped",
                actor,
                "*",
                outcome="ok" if not report.failures else "error",
                detail=(
                    f"{report.rewrapped} rewrapped under "
                    f"{ENVELOPE_MASTER_KEY_ID if self._envelopes else report.current_master_key}, "
                    + (
                        f"{report.data_keys_rewrapped} data keys rewrapped under {report.kek}, "
                        if report.kek
                        else ""
                    )
                    + f"{len(report.failures)} failed; now "
                    + ", ".join(f"{k}={v}" for k, v in sorted(report.after.items()))
                ),
            )
        return report

    def retire_master_key(self, actor: Actor | None, master_key_id: str) -> Path:
        """Take a master key out of the key file once no stored key is encrypted under it (after
        ``byok keys rewrap``). Only the local operator, who holds the master keys, may.

        The key is kept alone in ``<key file>.retired-<id>`` (mode 0600) for a database this
        store is not; the operator moves that file offline. If a stored key appears under the
        master key while it is being retired (a process that still encrypts with it), the key is
        put back and the retirement refused.

        :returns: the file that keeps the retired key.
        :raises KeyringError: the key is not in the keyring, is the current one, still encrypts
            stored keys, or comes from ``BYOK_ENCRYPTION_KEYS`` (remove it there by hand).
        """
        self._require_operator(actor, "keys.retire_master_key", "retire master key")
        keyring = self._keyring()
        keyring.check_retirable(master_key_id)
        in_use = self._store.count_by_master_key().get(master_key_id, 0)
        wrapping = (
            self._data_keys.store.count_by_kek().get(f"local:{master_key_id}", 0)
            if self._data_keys is not None
            else 0
        )
        if wrapping:
            raise KeyringError(
                f"{wrapping} workspace data keys are still wrapped under master key "
                f"{master_key_id}; run `byok keys rewrap` first (they would no longer unwrap)"
            )
        if in_use:
            raise KeyringError(
                f"{in_use} stored keys are still encrypted under master key {master_key_id}; "
                f"run `byok keys rewrap` first (they would no longer decrypt)"
            )
        if self._key_file is None:
            raise KeyringError(
                f"no stored key uses master key {master_key_id} any more, but the master keys "
                f"come from BYOK_ENCRYPTION_KEYS: remove its entry from that variable wherever it "
                f"is set"
            )
        retired = keyring.get(master_key_id)
        assert retired is not None
        kept = remove_master_key_from_file(self._key_file, master_key_id)
        arrived = self._store.count_by_master_key().get(master_key_id, 0)
        if arrived:  # a process that was not restarted stored keys under it meanwhile
            restore_master_key_to_file(self._key_file, retired)
            kept.unlink(missing_ok=True)  # the key is back in the file: no second copy
            raise KeyringError(
                f"{arrived} stored keys were encrypted under master key {master_key_id} while it "
                f"was being retired, by a process that still encrypts with it; the key is back in "
                f"{self._key_file}. Restart every process that reads the key file, run `byok keys "
                f"rewrap`, then retire it again"
            )
        self.audit(
            "master_key.retired",
            actor,
            "*",
            detail=f"master key {master_key_id} removed from {self._key_file}, kept in {kept}",
        )
        return kept

    # --- helpers ---------------------------------------------------------------------------

    def _require_operator(self, actor: Actor | None, action: str, what: str) -> None:
        """Refuse (and audit) anyone but the local operator, who holds the master keys."""
        if actor is None or not actor.operator:
            self.audit(
                "access.denied",
                actor,
                "*",
                outcome="denied",
                detail=f"{what}: only the local operator may",
            )
            raise NotAuthorized(_actor_id(actor), "*", action, _no_authorizer_hint(self._pm))

    def _validate(self, provider: str, api_key: str) -> KeyCheck:
        check = self._pm.hook.byok_validate_key(provider=provider, api_key=api_key)
        if check is None:
            return KeyCheck(provider, KeyCheckStatus.SKIPPED, "no key validator is installed")
        if not isinstance(check, KeyCheck):
            raise TypeError(
                f"a byok_validate_key implementation returned {type(check).__name__}, not KeyCheck"
            )
        return check

    def _record_master_key(self, keyring: Keyring) -> None:
        current = keyring.current
        if current.id not in self._recorded_master_keys:
            self._store.record_master_key(current)
            self._recorded_master_keys.add(current.id)

    @staticmethod
    def _selection(
        workspace_id: str, provider: str, key_id: str | None, label: str | None
    ) -> tuple[str, str, str | None, str | None]:
        workspace_id = check_workspace_id(workspace_id)
        provider = check_provider(provider)
        if key_id is not None:
            key_id = check_key_id(key_id)
        if label is not None:
            label = check_label(label)
        if key_id is not None and label is not None:
            raise InvalidInput("give a key id or a label, not both")
        return workspace_id, provider, key_id, label

    @staticmethod
    def _describe(key_id: str | None, label: str | None) -> str:
        if key_id is not None:
            return f"with id {key_id}"
        if label is not None:
            return f"labelled {label!r}"
        return ""


def _no_authorizer_hint(pm: pluggy.PluginManager) -> str:
    """Why everything is denied when nothing answers ``byok_authorize`` at all."""
    if pm.hook.byok_authorize.get_hookimpls():
        return ""
    return (
        "no installed plugin implements byok_authorize, so every action is denied (is the "
        "default plugin left out by BYOK_LOAD_PLUGINS or BYOK_BLOCK_PLUGINS?)"
    )
