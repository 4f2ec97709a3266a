"""Envelope encryption: per-workspace data keys wrapped by a key-encryption key (issue 19).

Real SQLite files and real PostgreSQL (``database_url``), keys stored through the real key
service, hooks called through a real plugin manager. The "KMS" plugins below are real
implementations (AES-256-GCM under their own key), not mocks.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    CredentialRequest,
    CredentialSource,
    CredentialUnavailable,
    WrappedDataKey,
    hookimpl,
)
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from keys_support import OPERATOR, make_app, master_key, random_key, service_for
from migration_support import model_differences

from byok_plugin.app import App
from byok_plugin.core.crypto import (
    ENVELOPE_MASTER_KEY_ID,
    ENVELOPE_PREFIX,
    STORED_PREFIX,
    Keyring,
    MasterKey,
)
from byok_plugin.core.errors import (
    CiphertextMismatch,
    DataKeyDestroyed,
    DataKeyUnavailable,
    DataKeyUnreadable,
    DuplicateKey,
    KeyringError,
)
from byok_plugin.keys.envelope import DataKeys
from byok_plugin.manager import plugin_manager_for
from byok_plugin.store.data_keys_repo import DataKeyStore
from byok_plugin.store.tables import data_keys, workspace_keys

ENVELOPES = {"BYOK_KEY_ENVELOPES": "1"}
PROVIDERS = ("openai", "anthropic", "google", "mistral", "exa")


class TestKms:
    """A small real KMS in the test process: AES-256-GCM under its own key, bound to the
    workspace (what OpenBao Transit's associated data or AWS KMS's encryption context do)."""

    __test__ = False
    name = "test-kms"

    def __init__(self) -> None:
        self._keys = {"kek-1": AESGCM(secrets.token_bytes(32))}
        self.current = "kek-1"
        self.wraps = 0
        self.unwraps = 0
        self.rewraps = 0
        self.down = False

    def rotate(self) -> None:
        self.current = f"kek-{len(self._keys) + 1}"
        self._keys[self.current] = AESGCM(secrets.token_bytes(32))

    def _seal(self, workspace_id: str, data_key: bytes) -> WrappedDataKey:
        nonce = os.urandom(12)
        sealed = self._keys[self.current].encrypt(nonce, data_key, workspace_id.encode())
        return WrappedDataKey(self.name, self.current, nonce + sealed)

    def _open(self, workspace_id: str, wrapped: WrappedDataKey) -> bytes:
        key = self._keys[wrapped.key_id]
        return key.decrypt(wrapped.blob[:12], wrapped.blob[12:], workspace_id.encode())

    @hookimpl(tryfirst=True)
    def byok_wrap_data_key(self, workspace_id: str, data_key: bytes) -> WrappedDataKey | None:
        if self.down:
            raise ConnectionError("test-kms at 127.0.0.1:1 refused the connection")
        self.wraps += 1
        return self._seal(workspace_id, data_key)

    @hookimpl(tryfirst=True)
    def byok_unwrap_data_key(self, workspace_id: str, wrapped: WrappedDataKey) -> bytes | None:
        if wrapped.provider != self.name:
            return None
        if self.down:
            raise ConnectionError("test-kms at 127.0.0.1:1 refused the connection")
        self.unwraps += 1
        return self._open(workspace_id, wrapped)

    @hookimpl(tryfirst=True)
    def byok_rewrap_data_key(
        self, workspace_id: str, wrapped: WrappedDataKey
    ) -> WrappedDataKey | None:
        if wrapped.provider != self.name:
            return None
        self.rewraps += 1  # inside the "KMS": the data key is never returned
        return self._seal(workspace_id, self._open(workspace_id, wrapped))

    @hookimpl(tryfirst=True)
    def byok_key_provider(self) -> str | None:
        return "test KMS (kek-1)"


class CountUnwraps:
    """Counts every call of ``byok_unwrap_data_key`` (whoever answers)."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl(wrapper=True)
    def byok_unwrap_data_key(self, workspace_id: str, wrapped: WrappedDataKey) -> Any:
        self.calls += 1
        return (yield)


def _rows(app: App) -> dict[str, dict[str, Any]]:
    with app.engine.connect() as conn:
        return {row.id: dict(row._mapping) for row in conn.execute(sa.select(workspace_keys)).all()}


def _data_key_row(app: App, workspace: str) -> dict[str, Any]:
    with app.engine.connect() as conn:
        return dict(
            conn.execute(sa.select(data_keys).where(data_keys.c.workspace_id == workspace))
            .one()
            ._mapping
        )


def _set_data_key_row(app: App, workspace: str, **values: Any) -> None:
    with app.engine.begin() as conn:
        conn.execute(
            sa.update(data_keys).where(data_keys.c.workspace_id == workspace).values(**values)
        )


# --- the store ----------------------------------------------------------------------------------


def test_revision_0006_creates_the_data_key_table_as_the_model_says(
    database_url: str, tmp_path: Path
) -> None:
    app = make_app(database_url, tmp_path, keys=[master_key()])
    try:
        with app.engine.connect() as conn:
            assert model_differences(conn, {"byok_data_keys"}) == []
            assert "byok_data_keys" in sa.inspect(conn).get_table_names()
    finally:
        app.close()


# --- nothing changes for a user who configures nothing ----------------------------------------


def test_without_configuration_keys_are_stored_as_today(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url, tmp_path, keys=[master_key("k1")])
    try:
        service, _ = service_for(app)
        service.set_key(OPERATOR, "acme", "openai", random_key("openai"), test=False)
        (row,) = _rows(app).values()
        assert row["ciphertext"].startswith(f"{STORED_PREFIX}k1:")
        assert row["master_key_id"] == "k1"
        assert app.data_keys.store.count_by_kek() == {}
    finally:
        app.close()


# --- envelope encryption ----------------------------------------------------------------------


def test_envelope_rows_decrypt_with_their_workspace_data_key(
    database_url: str, tmp_path: Path
) -> None:
    k1 = master_key("k1")
    app = make_app(database_url, tmp_path, keys=[k1], extra=ENVELOPES)
    try:
        service, _ = service_for(app)
        plain = {}
        for workspace in ("acme", "globex"):
            for provider in PROVIDERS:
                api_key = random_key(provider)
                plain[
                    service.set_key(OPERATOR, workspace, provider, api_key, test=False).key.id
                ] = api_key
        rows = _rows(app)
        assert {r["master_key_id"] for r in rows.values()} == {ENVELOPE_MASTER_KEY_ID}
        assert all(r["ciphertext"].startswith(ENVELOPE_PREFIX) for r in rows.values())
        # one data key per workspace, wrapped by the local keyring's current master key
        assert app.data_keys.store.count_by_kek() == {"local:k1": 2}
        wrapped = _data_key_row(app, "acme")["wrapped"]
        assert len(base64.b64decode(wrapped)) == 12 + 32 + 16
        # no master key decrypts a row directly: only the workspace's data key does
        for row in rows.values():
            raw = base64.b64decode(row["ciphertext"][len(ENVELOPE_PREFIX) :])
            with pytest.raises(InvalidTag):
                AESGCM(k1.secret).decrypt(raw[:12], raw[12:], None)
    finally:
        app.close()
    # a new process (cold cache) decrypts every row
    fresh = make_app(database_url, tmp_path, keys=[k1], extra=ENVELOPES)
    try:
        for row in fresh.key_store.batch_not_under("-", after_id=None, limit=100):
            assert fresh.key_access.decrypt(row) == plain[row.id]
    finally:
        fresh.close()


def test_the_same_key_twice_is_refused_under_envelopes(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url, tmp_path, keys=[master_key()], extra=ENVELOPES)
    try:
        service, _ = service_for(app)
        api_key = random_key("openai")
        service.set_key(OPERATOR, "acme", "openai", api_key, label="a", test=False)
        with pytest.raises(DuplicateKey):
            service.set_key(OPERATOR, "acme", "openai", api_key, label="b", test=False)
        # another workspace may store it: its own data key, its own fingerprint
        service.set_key(OPERATOR, "globex", "openai", api_key, label="b", test=False)
    finally:
        app.close()


def test_hook_byok_wrap_data_key_and_unwrap_by_a_plugin_kms(
    database_url: str, tmp_path: Path
) -> None:
    kms = TestKms()
    app = make_app(database_url, tmp_path, keys=[master_key("k1")], extra=ENVELOPES)
    try:
        service, pm = service_for(app, kms)
        api_key = random_key("anthropic")
        service.set_key(OPERATOR, "acme", "anthropic", api_key, test=False)
        assert kms.wraps == 1
        assert app.data_keys.store.count_by_kek() == {"test-kms:kek-1": 1}
        app.data_keys.forget()
        credential = pm.hook.byok_resolve_credential(
            request=CredentialRequest("acme", "anthropic", "claude-sonnet-4-5", actor=OPERATOR)
        )
        assert (credential.api_key, credential.source) == (api_key, CredentialSource.WORKSPACE)
        assert kms.unwraps == 1
    finally:
        app.close()


def test_hook_byok_unwrap_data_key_is_called_once_while_the_data_key_is_cached(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = make_app(sqlite_url, tmp_path, keys=[master_key()], extra=ENVELOPES)
    counter = CountUnwraps()
    try:
        service, pm = service_for(app, counter)
        api_key = random_key("openai")
        key_id = service.set_key(OPERATOR, "acme", "openai", api_key, test=False).key.id
        (row,) = app.key_store.find("acme", "openai", key_id=key_id)
        now = [1000.0]
        data = DataKeys(app.data_keys.store, lambda: pm, cache_seconds=60, monotonic=lambda: now[0])
        for _ in range(5):
            assert data.get("acme").decrypt(row.ciphertext, row.binding) == api_key  # type: ignore[union-attr]
        assert counter.calls == 1
        now[0] += 61  # the cached data key expired: unwrapped again
        assert data.get("acme").decrypt(row.ciphertext, row.binding) == api_key  # type: ignore[union-attr]
        assert counter.calls == 2
        # nothing cached at all with a cache time of 0
        uncached = DataKeys(app.data_keys.store, lambda: pm, cache_seconds=0)
        uncached.get("acme")
        uncached.get("acme")
        assert counter.calls == 4
        assert uncached.cached == 0
    finally:
        app.close()


def test_the_cache_holds_a_bounded_number_of_data_keys(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url, tmp_path, keys=[master_key()], extra=ENVELOPES)
    try:
        _, pm = service_for(app)
        data = DataKeys(app.data_keys.store, lambda: pm, cache_seconds=60, max_cached=3)
        for i in range(10):
            data.get_or_create(f"ws-{i}")
            assert data.cached <= 3
        assert data.cached == 3
    finally:
        app.close()


def test_hook_byok_key_provider_describes_the_active_provider(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = make_app(sqlite_url, tmp_path, keys=[master_key("k1")], extra=ENVELOPES)
    try:
        pm = plugin_manager_for(app, load_entrypoints=False)
        assert pm.hook.byok_key_provider() == (
            "local keyring (BYOK_ENCRYPTION_KEYS, current master key k1)"
        )
        pm.register(TestKms())
        assert pm.hook.byok_key_provider() == "test KMS (kek-1)"
    finally:
        app.close()


# --- a KMS that does not answer ---------------------------------------------------------------


def test_a_kms_that_does_not_answer_fails_resolution_loudly_never_the_platform_key(
    database_url: str, tmp_path: Path
) -> None:
    kms = TestKms()
    app = make_app(
        database_url,
        tmp_path,
        keys=[master_key()],
        extra={**ENVELOPES, "BYOK_PLATFORM_KEYS_OPENAI": random_key("openai")},
    )
    try:
        service, pm = service_for(app, kms)
        stored = service.set_key(OPERATOR, "acme", "openai", random_key("openai"), test=False)
        app.data_keys.forget()
        kms.down = True
        with pytest.raises(CredentialUnavailable) as info:
            pm.hook.byok_resolve_credential(
                request=CredentialRequest("acme", "openai", "gpt-4o", actor=OPERATOR)
            )
        error = info.value
        assert isinstance(error, DataKeyUnreadable)
        message = str(error)
        assert "test-kms key 'kek-1'" in message
        assert "refused the connection" in message
        assert stored.key.id in message
        assert "'acme'" in message
        # a workspace's first key is not stored either when the KMS cannot wrap its data key
        with pytest.raises(DataKeyUnavailable, match="globex"):
            service.set_key(OPERATOR, "globex", "openai", random_key("openai"), test=False)
        assert app.key_store.list_keys("globex") == []
    finally:
        app.close()


def test_a_data_key_no_plugin_unwraps_names_its_provider(sqlite_url: str, tmp_path: Path) -> None:
    kms, k1 = TestKms(), master_key()
    app = make_app(sqlite_url, tmp_path, keys=[k1], extra=ENVELOPES)
    try:
        service, _ = service_for(app, kms)
        service.set_key(OPERATOR, "acme", "openai", random_key("openai"), test=False)
    finally:
        app.close()
    later = make_app(sqlite_url, tmp_path, keys=[k1], extra=ENVELOPES)
    try:
        _, pm = service_for(later)  # the test-kms plugin is not installed any more
        with pytest.raises(DataKeyUnreadable, match="no installed plugin unwraps 'test-kms'"):
            pm.hook.byok_resolve_credential(
                request=CredentialRequest("acme", "openai", "gpt-4o", actor=OPERATOR)
            )
    finally:
        later.close()


# --- tampering --------------------------------------------------------------------------------


def _two_workspaces(database_url: str, home: Path, keys: list[MasterKey]) -> tuple[App, Any]:
    app = make_app(database_url, home, keys=keys, extra=ENVELOPES)
    service, _ = service_for(app)
    for workspace in ("acme", "globex"):
        service.set_key(OPERATOR, workspace, "openai", random_key("openai"), test=False)
    return app, service


def _reveal_fresh(app: App, workspace: str) -> str:
    app.data_keys.forget()
    (row,) = app.key_store.find(workspace, "openai")
    return app.key_access.decrypt(row)


def test_a_wrapped_data_key_moved_to_another_workspace_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    app, _ = _two_workspaces(database_url, tmp_path, [master_key("k1")])
    try:
        _set_data_key_row(app, "globex", wrapped=_data_key_row(app, "acme")["wrapped"])
        with pytest.raises(DataKeyUnreadable, match="moved from another workspace") as info:
            _reveal_fresh(app, "globex")
        assert info.value.workspace_id == "globex"
        assert "local key 'k1'" in str(info.value)
        _reveal_fresh(app, "acme")  # the source is intact
    finally:
        app.close()


def test_a_flipped_byte_in_a_wrapped_data_key_is_refused(database_url: str, tmp_path: Path) -> None:
    app, _ = _two_workspaces(database_url, tmp_path, [master_key("k1")])
    try:
        raw = bytearray(base64.b64decode(_data_key_row(app, "acme")["wrapped"]))
        raw[20] ^= 0x01
        _set_data_key_row(app, "acme", wrapped=base64.b64encode(bytes(raw)).decode())
        with pytest.raises(DataKeyUnreadable, match="does not authenticate"):
            _reveal_fresh(app, "acme")
    finally:
        app.close()


def test_a_wrong_key_version_on_a_wrapped_data_key_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    k1, k2 = master_key("k1"), master_key("k2")
    app, _ = _two_workspaces(database_url, tmp_path, [k1, k2])
    try:
        # relabelled with another master key the keyring holds: the binding to k1 fails
        _set_data_key_row(app, "acme", kek_id="k2")
        with pytest.raises(DataKeyUnreadable, match="under master key 'k2'"):
            _reveal_fresh(app, "acme")
        # relabelled with a master key the keyring does not hold
        _set_data_key_row(app, "acme", kek_id="k9")
        with pytest.raises(DataKeyUnreadable, match="'k9', which is not in BYOK_ENCRYPTION_KEYS"):
            _reveal_fresh(app, "acme")
    finally:
        app.close()


def test_an_envelope_row_copied_to_another_workspace_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    app, _ = _two_workspaces(database_url, tmp_path, [master_key("k1")])
    try:
        (source,) = app.key_store.find("acme", "openai")
        (target,) = app.key_store.find("globex", "openai")
        with app.engine.begin() as conn:
            conn.execute(
                sa.update(workspace_keys)
                .where(workspace_keys.c.id == target.id)
                .values(ciphertext=source.ciphertext)
            )
        with pytest.raises(CiphertextMismatch) as info:
            _reveal_fresh(app, "globex")
        assert info.value.reason == "copied"
    finally:
        app.close()


# --- crypto-shredding -------------------------------------------------------------------------


def test_deleting_a_workspace_destroys_its_data_key_and_its_rows_for_good(
    database_url: str, tmp_path: Path
) -> None:
    k1, k2 = master_key("k1"), master_key("k2")
    app = make_app(database_url, tmp_path, keys=[k2, k1], extra=ENVELOPES)
    try:
        service, _ = service_for(app)
        for provider in PROVIDERS:
            service.set_key(OPERATOR, "acme", provider, random_key(provider), test=False)
        kept = service.set_key(OPERATOR, "globex", "exa", random_key("exa"), test=False)
        backup = [r for r in _rows(app).values() if r["workspace_id"] == "acme"]
        backup_data_key = _data_key_row(app, "acme")

        assert service.delete_workspace(OPERATOR, "acme") == (5, True)
        assert app.key_store.list_keys("acme") == []
        assert app.data_keys.store.get("acme") is None
        assert app.audit_store.events("acme", action="key.deleted")[0].detail == (
            "workspace deleted: 5 keys, data key destroyed"
        )

        # a backup of the rows restored into the database: nothing decrypts them any more
        with app.engine.begin() as conn:
            conn.execute(sa.insert(workspace_keys), backup)
        for row in app.key_store.find("acme"):
            with pytest.raises(DataKeyDestroyed):
                app.key_access.decrypt(row)
            # not with any master key either, under any associated data this row could have
            raw = base64.b64decode(row.ciphertext[len(ENVELOPE_PREFIX) :])
            for master in (k1, k2):
                for aad in (row.binding.associated_data(), None):
                    with pytest.raises(InvalidTag):
                        AESGCM(master.secret).decrypt(raw[:12], raw[12:], aad)
        # the wrapped data key unwraps only with the master key, and only the data key opens
        # the rows: with the wrapped key destroyed the master keys alone open nothing
        assert backup_data_key["kek_id"] == "k2"
        (other,) = app.key_store.find("globex", "exa", key_id=kept.key.id)
        app.data_keys.forget()
        assert app.key_access.decrypt(other)  # the other workspace is untouched
    finally:
        app.close()


# --- rewrap: to envelopes, key-encryption key rotation, and back -------------------------------


def test_rewrap_moves_rows_to_envelopes_rotates_the_kek_and_moves_back(
    database_url: str, tmp_path: Path
) -> None:
    k1, k2 = master_key("k1"), master_key("k2")
    direct = make_app(database_url, tmp_path, keys=[k1])
    plain: dict[str, str] = {}
    try:
        service, _ = service_for(direct)
        for i in range(12):
            provider = PROVIDERS[i % 5]
            api_key = random_key(provider)
            result = service.set_key(
                OPERATOR, f"ws-{i % 4}", provider, api_key, label=f"l{i}", test=False
            )
            plain[result.key.id] = api_key
    finally:
        direct.close()

    def decrypt_all(app: App) -> dict[str, str]:
        app.data_keys.forget()
        rows = app.key_store.batch_not_under("-", after_id=None, limit=100)
        return {row.id: app.key_access.decrypt(row) for row in rows}

    # 1. to envelopes, interrupted after the first batch, then run again to the end
    app = make_app(database_url, tmp_path, keys=[k1], extra=ENVELOPES)
    try:
        service, _ = service_for(app)

        def stop(done: int, total: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            service.rewrap(OPERATOR, batch_size=5, progress=stop)
        assert app.key_store.count_by_master_key() == {"k1": 7, ENVELOPE_MASTER_KEY_ID: 5}
        assert decrypt_all(app) == plain
        report = service.rewrap(OPERATOR, batch_size=5)
        assert report.rewrapped == 7
        assert report.complete
        assert report.after == {ENVELOPE_MASTER_KEY_ID: 12}
        assert report.data_keys_after == {"local:k1": 4}
        assert decrypt_all(app) == plain
        again = service.rewrap(OPERATOR)  # idempotent: nothing left to do
        assert (again.rewrapped, again.data_keys_rewrapped) == (0, 0)
    finally:
        app.close()
    reader = make_app(database_url, tmp_path)
    try:
        before = {k: r["ciphertext"] for k, r in _rows(reader).items()}
    finally:
        reader.close()

    # 2. a new master key (KEK rotation): only the 4 data keys are rewrapped, no row
    app = make_app(database_url, tmp_path, keys=[k2, k1], extra=ENVELOPES)
    try:
        service, _ = service_for(app)
        dry = service.rewrap(OPERATOR, dry_run=True)
        assert (dry.data_keys_rewrapped, app.data_keys.store.count_by_kek()) == (4, {"local:k1": 4})
        report = service.rewrap(OPERATOR, batch_size=3)
        assert (report.rewrapped, report.data_keys_rewrapped) == (0, 4)
        assert report.kek == "local:k2"
        assert report.data_keys_after == {"local:k2": 4}
        assert {k: r["ciphertext"] for k, r in _rows(app).items()} == before
        assert report.retirable == ("k1",)
    finally:
        app.close()
    only_k2 = make_app(database_url, tmp_path, keys=[k2], extra=ENVELOPES)
    try:
        assert decrypt_all(only_k2) == plain  # k1 is no longer needed
    finally:
        only_k2.close()

    # 3. back to direct encryption under the current master key
    back = make_app(database_url, tmp_path, keys=[k2])
    try:
        service, _ = service_for(back)
        report = service.rewrap(OPERATOR)
        assert report.rewrapped == 12
        assert report.after == {"k2": 12}
        assert all(r["ciphertext"].startswith(f"{STORED_PREFIX}k2:") for r in _rows(back).values())
        assert decrypt_all(back) == plain
    finally:
        back.close()


def test_a_master_key_still_wrapping_data_keys_is_not_retired(
    sqlite_url: str, tmp_path: Path
) -> None:
    from byok_plugin.core.crypto import add_master_key_to_file, create_key_file

    key_file = tmp_path / "master.keys"
    old = create_key_file(key_file)
    app = make_app(sqlite_url, tmp_path, extra=ENVELOPES)
    try:
        service, _ = service_for(app)
        service.set_key(OPERATOR, "acme", "openai", random_key("openai"), test=False)
    finally:
        app.close()
    add_master_key_to_file(key_file)
    app = make_app(sqlite_url, tmp_path, extra=ENVELOPES)
    try:
        service, _ = service_for(app)
        with pytest.raises(
            KeyringError, match=f"1 workspace data keys are still wrapped under master key {old.id}"
        ):
            service.retire_master_key(OPERATOR, old.id)
        service.rewrap(OPERATOR)
        kept = service.retire_master_key(OPERATOR, old.id)
        assert kept.exists()
        app.data_keys.forget()
        (row,) = app.key_store.find("acme", "openai")
        assert app.key_access.decrypt(row).startswith("sk-proj-")
    finally:
        app.close()


def test_data_key_store_keeps_the_first_writer(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url, tmp_path, keys=[master_key()])
    try:
        store = DataKeyStore(app.engine)
        first = store.add("acme", WrappedDataKey("local", "k1", b"first-blob"), "c1")
        second = store.add("acme", WrappedDataKey("local", "k1", b"second-blob"), "c2")
        assert second.check_value == "c1"
        assert first.wrapped.blob == second.wrapped.blob == b"first-blob"
        assert store.swap(first, WrappedDataKey("local", "k2", b"new")) is True
        assert store.swap(first, WrappedDataKey("local", "k3", b"newer")) is False  # stale
        assert store.get("acme").wrapped == WrappedDataKey("local", "k2", b"new")  # type: ignore[union-attr]
        assert "blob" not in repr(store.get("acme"))
    finally:
        app.close()


def test_the_data_key_hooks_are_declared_non_blocking_only_with_the_local_keyring(
    tmp_path: Path,
) -> None:
    from byok_hookspecs import blocking_implementations

    from byok_plugin.defaults import DefaultPlugin
    from byok_plugin.host.runner import RUN_HOOKS
    from byok_plugin.settings import Settings

    home = {"BYOK_HOME": str(tmp_path)}
    local = DefaultPlugin(App(Settings.from_environ(home)))
    assert {"byok_wrap_data_key", "byok_unwrap_data_key", "byok_key_provider"} <= (
        local.byok_nonblocking_hooks
    )
    kms = App(Settings.from_environ({**home, "BYOK_KEY_PROVIDER": "aws-kms"}))
    declared = DefaultPlugin(kms).byok_nonblocking_hooks
    assert "byok_unwrap_data_key" not in declared
    assert "byok_key_provider" in declared
    # the runner asks about the unwrap hook too: a KMS plugin that blocks sends calls to threads
    pm = plugin_manager_for(App(Settings.from_environ(home)), load_entrypoints=False)
    assert blocking_implementations(pm, RUN_HOOKS) == []
    pm.register(TestKms(), name="test-kms")
    assert ("byok_unwrap_data_key", "test-kms") in blocking_implementations(pm, RUN_HOOKS)


def test_hook_byok_rewrap_data_key_moves_data_keys_inside_the_kms(
    database_url: str, tmp_path: Path
) -> None:
    kms = TestKms()
    app = make_app(database_url, tmp_path, keys=[master_key()], extra=ENVELOPES)
    try:
        service, pm = service_for(app, kms)
        plain = {}
        for workspace in ("acme", "globex", "initech"):
            plain[workspace] = random_key("openai")
            service.set_key(OPERATOR, workspace, "openai", plain[workspace], test=False)
        kms.rotate()
        unwraps = kms.unwraps
        report = service.rewrap(OPERATOR, batch_size=2)
        assert (report.data_keys_rewrapped, report.kek) == (3, "test-kms:kek-2")
        assert kms.rewraps == 3
        assert kms.unwraps == unwraps  # no data key left the KMS
        assert app.data_keys.store.count_by_kek() == {"test-kms:kek-2": 3}
        for workspace, api_key in plain.items():
            app.data_keys.forget()
            credential = pm.hook.byok_resolve_credential(
                request=CredentialRequest(workspace, "openai", "gpt-4o", actor=OPERATOR)
            )
            assert credential.api_key == api_key
        # the default (local keyring) has no KMS-side rewrap: it answers None
        assert app.key_encryption.rewrap("acme", WrappedDataKey("local", "k1", b"x")) is None
    finally:
        app.close()


def test_byok_keys_delete_workspace_shreds_it_and_asks_for_confirmation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from byok_plugin.cli import main

    k1 = master_key("k1")
    database = f"sqlite:///{tmp_path / 'byok.db'}"
    app = make_app(database, tmp_path, keys=[k1], extra=ENVELOPES)
    try:
        service, _ = service_for(app)
        for provider in ("openai", "exa"):
            service.set_key(OPERATOR, "acme", provider, random_key(provider), test=False)
    finally:
        app.close()
    for name, value in {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": database,
        "BYOK_ENCRYPTION_KEYS": f"k1:{base64.b64encode(k1.secret).decode()}",
        **ENVELOPES,
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    refused = runner.invoke(main, ["keys", "delete-workspace", "-w", "acme"])
    assert refused.exit_code == 2
    assert "add --yes" in refused.output
    result = runner.invoke(main, ["keys", "delete-workspace", "-w", "acme", "--yes"])
    assert result.exit_code == 0, result.output
    assert "deleted 2 keys of workspace 'acme'" in result.output
    assert "its data key was destroyed" in result.output
    after = make_app(database, tmp_path, keys=[k1], extra=ENVELOPES)
    try:
        assert after.key_store.list_keys("acme") == []
        assert after.data_keys.store.get("acme") is None
    finally:
        after.close()


def test_no_data_key_or_api_key_reaches_a_log_line_or_an_error(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    kms = TestKms()
    app = make_app(sqlite_url, tmp_path, keys=[master_key("k1")], extra=ENVELOPES)
    texts: list[str] = []
    try:
        service, pm = service_for(app)
        api_keys = [random_key("openai"), random_key("exa")]
        service.set_key(OPERATOR, "acme", "openai", api_keys[0], test=False)
        service.set_key(OPERATOR, "acme", "exa", api_keys[1], test=False)
        data_key = app.data_keys.get("acme")
        assert data_key is not None
        secret = data_key.secret
        texts.append(repr(data_key))
        texts.append(repr(app.data_keys.store.get("acme")))
        # a tampered data key, then a KMS that does not answer
        raw = bytearray(base64.b64decode(_data_key_row(app, "acme")["wrapped"]))
        raw[-1] ^= 1
        _set_data_key_row(app, "acme", wrapped=base64.b64encode(bytes(raw)).decode())
        app.data_keys.forget()
        with pytest.raises(DataKeyUnreadable) as info:
            pm.hook.byok_resolve_credential(
                request=CredentialRequest("acme", "openai", "gpt-4o", actor=OPERATOR)
            )
        texts.append(str(info.value))
        pm.register(kms)
        kms.down = True
        with pytest.raises(DataKeyUnavailable) as down:
            service.set_key(OPERATOR, "globex", "openai", random_key("openai"), test=False)
        texts.append(str(down.value))
    finally:
        app.close()
    texts.append(caplog.text)
    haystack = "\n".join(texts)
    for form in (secret.hex(), base64.b64encode(secret).decode(), secret.decode("latin-1")):
        assert form not in haystack
    for api_key in api_keys:
        assert api_key[8:24] not in haystack


def test_a_wrapped_data_key_replaced_by_another_valid_one_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    k1 = master_key("k1")
    app, _ = _two_workspaces(database_url, tmp_path, [k1])
    try:
        # a well-formed wrapping, for the right workspace and master key, of ANOTHER data key
        kek, blob = Keyring([k1]).wrap_data_key("acme", secrets.token_bytes(32))
        _set_data_key_row(app, "acme", kek_id=kek, wrapped=base64.b64encode(blob).decode())
        with pytest.raises(DataKeyUnreadable, match="another key than the one stored"):
            _reveal_fresh(app, "acme")
    finally:
        app.close()


def test_a_key_is_not_stored_under_a_data_key_destroyed_meanwhile(
    database_url: str, tmp_path: Path
) -> None:
    k1 = master_key("k1")
    first = make_app(database_url, tmp_path, keys=[k1], extra=ENVELOPES)
    other = make_app(database_url, tmp_path, keys=[k1], extra=ENVELOPES)  # another process
    try:
        service, _ = service_for(first)
        service.set_key(OPERATOR, "acme", "openai", random_key("openai"), label="a", test=False)
        assert first.data_keys.cached == 1
        other_service, _ = service_for(other)
        assert other_service.delete_workspace(OPERATOR, "acme") == (1, True)
        # the first process still holds the destroyed data key in its cache
        with pytest.raises(DataKeyUnavailable, match="was destroyed or replaced"):
            service.set_key(OPERATOR, "acme", "openai", random_key("openai"), label="b", test=False)
        assert first.key_store.list_keys("acme") == []
        # tried again: a new data key, and the key decrypts
        api_key = random_key("openai")
        service.set_key(OPERATOR, "acme", "openai", api_key, label="b", test=False)
        (row,) = other.key_store.find("acme", "openai")
        assert other.key_access.decrypt(row) == api_key
    finally:
        first.close()
        other.close()


def test_rewrap_to_envelopes_killed_part_way_and_run_again(
    database_url: str, tmp_path: Path
) -> None:
    import subprocess
    import sys
    from datetime import UTC, datetime

    from keys_support import keyring_value

    from byok_plugin.core.crypto import KeyBinding
    from byok_plugin.store.keys_repo import new_key_id

    k1, rows_count = master_key("k1"), 400
    ring = Keyring([k1])
    now = datetime.now(UTC)
    plain: dict[str, str] = {}
    rows = []
    for i in range(rows_count):
        workspace, provider = f"ws-{i // 5:03d}", PROVIDERS[i % 5]
        key_id, api_key = new_key_id(), random_key(provider)
        plain[key_id] = api_key
        rows.append(
            {
                "id": key_id,
                "workspace_id": workspace,
                "provider": provider,
                "label": "default",
                "ciphertext": ring.encrypt(api_key, KeyBinding(workspace, provider, key_id)),
                "master_key_id": k1.id,
                "hint": "x",
                "fingerprint": "hs256:x",
                "status": "enabled",
                "created_at": now,
                "updated_at": now,
            }
        )
    seed = make_app(database_url, tmp_path, keys=[k1])
    try:
        seed.key_store.record_master_key(k1)
        with seed.engine.begin() as conn:
            conn.execute(sa.insert(workspace_keys), rows)
    finally:
        seed.close()
    env = {
        **os.environ,
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_ENCRYPTION_KEYS": keyring_value(k1),
        "PYTHONUNBUFFERED": "1",
        **ENVELOPES,
    }
    command = [sys.executable, "-m", "byok_plugin", "keys", "rewrap"]
    proc = subprocess.Popen(
        [*command, "--batch-size", "20", "--pause", "0.05"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    batches = 0
    for line in proc.stdout:
        if line.startswith("  batch:"):
            batches += 1
            if batches == 3:
                proc.kill()  # SIGKILL: no clean-up of any kind
                break
    proc.wait(timeout=30)
    assert proc.returncode == -9

    def decrypt_all() -> dict[str, str]:
        app = make_app(database_url, tmp_path, keys=[k1], extra=ENVELOPES)
        try:
            found = app.key_store.batch_not_under("-", after_id=None, limit=2 * rows_count)
            return {row.id: app.key_access.decrypt(row) for row in found}
        finally:
            app.close()

    check = make_app(database_url, tmp_path, keys=[k1])
    try:
        counts = check.key_store.count_by_master_key()
    finally:
        check.close()
    assert counts[ENVELOPE_MASTER_KEY_ID] >= 3 * 20  # the committed batches stayed...
    assert counts["k1"] > 0  # ...and it really was interrupted
    assert decrypt_all() == plain  # every row, either side of the kill

    done = subprocess.run([*command, "--batch-size", "100"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"rewrapped {counts['k1']} rows under their workspace's data key" in done.stdout
    assert f"after: {rows_count} keys under their workspace's data key" in done.stdout
    assert "80 data keys wrapped by local:k1" in done.stdout
    assert decrypt_all() == plain
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                           check=False)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "rewrapped 0 rows under their workspace's data key" in again.stdout
    assert "data keys: 0 rewrapped under local:k1" in again.stdout


# --- another worker crypto-shreds a workspace and stores a new key ------------------------------


def test_a_worker_reads_a_key_stored_under_a_data_key_replaced_by_another_worker(
    database_url: str, tmp_path: Path
) -> None:
    k1 = master_key("k1")
    # two processes' apps on one store; the reader keeps data keys for the default 300 s
    writer = make_app(database_url, tmp_path, keys=[k1], extra=ENVELOPES)
    reader = make_app(database_url, tmp_path, keys=[k1], extra=ENVELOPES)
    try:
        service, _ = service_for(writer)
        old_key = random_key("openai")
        service.set_key(OPERATOR, "acme", "openai", old_key, test=False)
        (old_row,) = reader.key_store.find("acme", "openai")
        assert reader.key_access.decrypt(old_row) == old_key
        assert reader.data_keys.cached == 1  # the old data key, cached

        assert service.delete_workspace(OPERATOR, "acme") == (1, True)
        new_key = random_key("openai")
        service.set_key(OPERATOR, "acme", "openai", new_key, test=False)
        (new_row,) = reader.key_store.find("acme", "openai")
        # not "altered, copied" for the cache's 300 s: the new data key is read at once
        assert reader.key_access.decrypt(new_row) == new_key
        cached, current = reader.data_keys.get("acme"), writer.data_keys.get("acme")
        assert cached is not None
        assert current is not None
        assert cached.check_value == current.check_value

        # a row that does not decrypt under the data key stored now is still reported
        tampered = new_row.ciphertext[:-4] + (
            "AAAA" if new_row.ciphertext[-4:] != "AAAA" else "BBBB"
        )
        with writer.engine.begin() as conn:
            conn.execute(
                sa.update(workspace_keys)
                .where(workspace_keys.c.id == new_row.id)
                .values(ciphertext=tampered)
            )
        (bad_row,) = reader.key_store.find("acme", "openai")
        with pytest.raises(CiphertextMismatch):
            reader.key_access.decrypt(bad_row)
        assert reader.data_keys.cached == 1  # the current data key stays cached

        # replaced once more, then destroyed: a copy of the last row (a backup) restored is
        # reported as destroyed, not as tampered with
        assert service.delete_workspace(OPERATOR, "acme") == (1, True)
        service.set_key(OPERATOR, "acme", "openai", random_key("openai"), test=False)
        backup = [r for r in _rows(writer).values() if r["workspace_id"] == "acme"]
        assert service.delete_workspace(OPERATOR, "acme") == (1, True)
        with writer.engine.begin() as conn:
            conn.execute(sa.insert(workspace_keys), backup)
        (restored,) = reader.key_store.find("acme", "openai")
        with pytest.raises(DataKeyDestroyed):
            reader.key_access.decrypt(restored)
        assert reader.data_keys.cached == 0
    finally:
        writer.close()
        reader.close()


@pytest.mark.postgres
def test_the_key_change_listener_drops_the_data_key_of_a_deleted_workspace(
    postgres_url: str, tmp_path: Path
) -> None:
    import time

    k1 = master_key("k1")
    writer = make_app(postgres_url, tmp_path, keys=[k1], extra=ENVELOPES)
    reader = make_app(postgres_url, tmp_path, keys=[k1], extra=ENVELOPES)
    try:
        service, _ = service_for(writer)
        _, reader_pm = service_for(reader)
        for workspace in ("acme", "globex"):
            service.set_key(OPERATOR, workspace, "openai", random_key("openai"), test=False)
        listener = reader.resolver.listener
        assert listener is not None
        assert listener.wait_listening()
        for workspace in ("acme", "globex"):
            reader_pm.hook.byok_resolve_credential(
                request=CredentialRequest(workspace, "openai", "gpt-4o", actor=OPERATOR)
            )
        assert reader.data_keys.cached == 2

        before = listener.received
        service.set_key(OPERATOR, "globex", "anthropic", random_key("anthropic"), test=False)
        deadline = time.monotonic() + 20  # against a hung test, not a timed assertion
        while listener.received == before and time.monotonic() < deadline:
            time.sleep(0.002)
        assert reader.data_keys.cached == 2  # one provider's key change keeps the data keys

        before = listener.received
        assert service.delete_workspace(OPERATOR, "acme") == (1, True)
        while listener.received == before and time.monotonic() < deadline:
            time.sleep(0.002)
        assert listener.received > before
        # the deleted workspace's data key is forgotten at the notification, the other kept
        assert reader.data_keys.cached == 1
        assert reader.data_keys.get("globex") is not None
    finally:
        writer.close()
        reader.close()
