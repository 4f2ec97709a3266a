"""The key management service and the resolution API, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from byok_hookspecs import Credential, CredentialSource, CredentialUnavailable, KeyCheckStatus
from keys_support import OPERATOR, Recorder, make_app, master_key, random_key, service_for

from byok_plugin.app import App
from byok_plugin.core.crypto import MasterKey
from byok_plugin.core.errors import (
    CiphertextCopied,
    CiphertextMismatch,
    DuplicateKey,
    InvalidInput,
    InvalidKeyFormat,
    KeyDecryptionError,
    KeyLimitReached,
    KeyNotFound,
    KeyRejected,
    KeyringError,
    UnknownMasterKey,
    WrongMasterKey,
)
from byok_plugin.keys.service import KeyService
from byok_plugin.store.tables import workspace_keys


@pytest.fixture
def k1() -> MasterKey:
    return master_key("k1")


@pytest.fixture
def app(database_url: str, tmp_path: Path, k1: MasterKey) -> Iterator[App]:
    app = make_app(database_url, tmp_path, keys=[k1])
    yield app
    app.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def service(app: App, recorder: Recorder) -> KeyService:
    return service_for(app, recorder)[0]


def _set(service: KeyService, workspace: str, provider: str, label: str | None = None) -> str:
    key = random_key(provider)
    service.set_key(OPERATOR, workspace, provider, key, label=label, test=False)
    return key


def test_set_list_and_replace(app: App, service: KeyService, recorder: Recorder) -> None:
    key = random_key("openai")
    first = service.set_key(OPERATOR, "acme", "openai", key, test=False)
    assert first.key.label == "default"
    assert first.replaced is None
    assert first.check is None
    assert first.key.hint == f"{key[:6]}...{key[-4:]}"
    assert first.key.status == "enabled"
    assert first.key.created_by == "operator"
    assert key not in repr(first)

    newer = random_key("openai")
    second = service.set_key(OPERATOR, "acme", "OpenAI", newer, test=False)
    assert second.replaced is not None
    assert second.replaced.id == first.key.id
    assert second.key.id != first.key.id  # a new secret gets a new id

    _set(service, "acme", "mistral", "team")
    listed = service.list_keys(OPERATOR, "acme")
    assert [(k.provider, k.label) for k in listed] == [("mistral", "team"), ("openai", "default")]
    assert [k.provider for k in service.list_keys(OPERATOR, "acme", "mistral")] == ["mistral"]
    assert not hasattr(listed[0], "ciphertext")
    assert recorder.actions() == ["key.created", "key.replaced", "key.created"]
    assert "replaces " + first.key.id in recorder.events[1].detail

    (stored,) = app.key_access.enabled_keys("acme", "openai")
    assert app.key_access.reveal(stored).api_key == newer


def test_listing_never_decrypts(database_url: str, tmp_path: Path, service: KeyService) -> None:
    _set(service, "acme", "openai")
    # no master key at all: listing still works, since it never needs the plaintext
    keyless = make_app(database_url, tmp_path)
    try:
        other, _ = service_for(keyless)
        assert [k.provider for k in other.list_keys(OPERATOR, "acme")] == ["openai"]
        with pytest.raises(KeyDecryptionError, match="byok init"):
            keyless.key_access.reveal(keyless.key_access.enabled_keys("acme", "openai")[0])
    finally:
        keyless.close()


def test_at_most_ten_keys_per_provider(service: KeyService) -> None:
    for i in range(10):
        _set(service, "acme", "openai", f"k{i}")
    with pytest.raises(KeyLimitReached, match="already has 10 openai keys"):
        _set(service, "acme", "openai", "eleventh")
    _set(service, "acme", "openai", "k3")  # replacing one is still allowed
    _set(service, "acme", "anthropic", "k0")  # the limit is per provider
    _set(service, "other", "openai", "k0")  # and per workspace
    assert len(service.list_keys(OPERATOR, "acme", "openai")) == 10


def test_the_same_key_is_not_stored_twice(service: KeyService) -> None:
    key = random_key("anthropic")
    service.set_key(OPERATOR, "acme", "anthropic", key, label="one", test=False)
    with pytest.raises(DuplicateKey, match="as 'one'"):
        service.set_key(OPERATOR, "acme", "anthropic", key, label="two", test=False)
    # the same key in another workspace is another workspace's business
    service.set_key(OPERATOR, "beta", "anthropic", key, label="two", test=False)


def test_input_is_checked_before_anything_is_written(service: KeyService) -> None:
    key = random_key("openai")
    with pytest.raises(InvalidKeyFormat):
        service.set_key(OPERATOR, "acme", "anthropic", key, test=False)
    with pytest.raises(InvalidInput, match="unknown provider"):
        service.set_key(OPERATOR, "acme", "azure", key, test=False)
    with pytest.raises(InvalidInput, match="label"):
        service.set_key(OPERATOR, "acme", "openai", key, label=" x", test=False)
    with pytest.raises(InvalidInput, match="not both"):
        service.delete_keys(OPERATOR, "acme", "openai", key_id="key_abcdefgh", label="x")
    assert service.list_keys(OPERATOR, "acme") == []


def test_enable_disable_delete(app: App, service: KeyService) -> None:
    _set(service, "acme", "openai", "a")
    _set(service, "acme", "openai", "b")
    (disabled,) = service.disable(OPERATOR, "acme", "openai", label="a")
    assert disabled.status == "disabled"
    assert [k.label for k in app.key_access.enabled_keys("acme", "openai")] == ["b"]
    assert {k.label for k in service.list_keys(OPERATOR, "acme")} == {"a", "b"}

    app.key_access.cool_down(disabled.id, datetime.now(UTC) + timedelta(hours=1))
    (enabled,) = service.enable(OPERATOR, "acme", "openai", key_id=disabled.id)
    assert enabled.status == "enabled"
    assert enabled.cooldown_until is None

    (deleted,) = service.delete_keys(OPERATOR, "acme", "openai", key_id=disabled.id)
    assert deleted.label == "a"
    with pytest.raises(KeyNotFound, match="with id"):
        service.delete_keys(OPERATOR, "acme", "openai", key_id=disabled.id)
    with pytest.raises(KeyNotFound):
        service.enable(OPERATOR, "acme", "openai", label="nope")
    assert len(service.delete_keys(OPERATOR, "acme", "openai")) == 1
    assert service.list_keys(OPERATOR, "acme") == []


def test_the_resolution_api(database_url: str, tmp_path: Path, app: App, k1: MasterKey) -> None:
    service, _ = service_for(app)
    first = _set(service, "acme", "google", "first")
    second = _set(service, "acme", "google", "second")
    access = app.key_access
    keys = access.enabled_keys("acme", "google")
    assert [k.label for k in keys] == ["first", "second"]
    assert first not in repr(keys)
    assert keys[0].ciphertext not in repr(keys)

    credential = access.reveal(keys[1])
    assert isinstance(credential, Credential)
    assert (credential.api_key, credential.source, credential.is_byok) == (
        second,
        CredentialSource.WORKSPACE,
        True,
    )
    assert credential.key_id == keys[1].id
    assert credential.hint == keys[1].hint
    assert second not in repr(credential)
    assert access.credential("acme", "google", keys[0].id).api_key == first
    assert access.credential("acme", "google", "key_doesnotexist") is None

    now = datetime.now(UTC).replace(microsecond=0)
    assert access.mark_used(keys[0].id, now)
    assert not access.mark_used(keys[0].id, now - timedelta(minutes=1))  # never backwards
    assert access.cool_down(keys[1].id, now + timedelta(seconds=30))

    # another worker (its own app and engine) sees the same last use and cooldown
    worker = make_app(database_url, tmp_path, keys=[k1])
    try:
        seen = {k.label: k for k in worker.key_access.enabled_keys("acme", "google")}
        assert seen["first"].last_used_at == now
        assert seen["second"].in_cooldown(now)
        assert not seen["second"].in_cooldown(now + timedelta(seconds=31))
        assert worker.key_access.end_cooldown(keys[1].id)
    finally:
        worker.close()
    assert access.enabled_keys("acme", "google")[1].cooldown_until is None
    service.disable(OPERATOR, "acme", "google", label="first")
    assert access.credential("acme", "google", keys[0].id) is None


def _copy_ciphertext(app: App, source_id: str, target_id: str) -> None:
    with app.engine.begin() as conn:
        ciphertext = conn.execute(
            sa.select(workspace_keys.c.ciphertext).where(workspace_keys.c.id == source_id)
        ).scalar_one()
        conn.execute(
            sa.update(workspace_keys)
            .where(workspace_keys.c.id == target_id)
            .values(ciphertext=ciphertext)
        )


def _only(app: App, workspace: str, provider: str):
    (key,) = app.key_access.enabled_keys(workspace, provider)
    return key


@pytest.mark.parametrize(
    ("workspace", "provider"),
    [("acme", "openai"), ("beta", "openai"), ("acme", "mistral")],
    ids=["another-row", "another-workspace", "another-provider"],
)
def test_a_copied_ciphertext_fails_loudly(
    app: App, service: KeyService, workspace: str, provider: str
) -> None:
    service.set_key(OPERATOR, "acme", "openai", random_key("openai"), label="src", test=False)
    _set(service, workspace, provider, "dst")
    source = app.key_access.enabled_keys("acme", "openai")[0]
    target = next(k for k in app.key_access.enabled_keys(workspace, provider) if k.label == "dst")
    _copy_ciphertext(app, source.id, target.id)
    target = next(k for k in app.key_access.enabled_keys(workspace, provider) if k.label == "dst")
    with pytest.raises(CiphertextCopied) as info:
        app.key_access.reveal(target)
    err = info.value
    assert isinstance(err, CredentialUnavailable)
    assert err.reason == "copied"
    assert (err.workspace_id, err.provider, err.key_id) == (workspace, provider, target.id)
    assert err.source_key_id == source.id
    assert target.id in str(err)
    assert repr(workspace) in str(err)
    assert provider in str(err)


def test_a_flipped_byte_fails_loudly(app: App, service: KeyService) -> None:
    _set(service, "acme", "exa")
    key = _only(app, "acme", "exa")
    head, body = key.ciphertext.rsplit(":", 1)
    flipped = body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
    with app.engine.begin() as conn:
        conn.execute(
            sa.update(workspace_keys)
            .where(workspace_keys.c.id == key.id)
            .values(ciphertext=f"{head}:{flipped}")
        )
    with pytest.raises(CiphertextMismatch) as info:
        app.key_access.reveal(_only(app, "acme", "exa"))
    assert type(info.value) is CiphertextMismatch
    assert info.value.reason == "tampered"
    assert key.id in str(info.value)
    assert "exa" in str(info.value)


def test_a_wrong_master_key_fails_loudly(
    database_url: str, tmp_path: Path, app: App, service: KeyService
) -> None:
    _set(service, "acme", "anthropic")
    impostor = make_app(database_url, tmp_path, keys=[master_key("k1")])  # same id, other key
    try:
        with pytest.raises(WrongMasterKey) as info:
            impostor.key_access.reveal(_only(impostor, "acme", "anthropic"))
        assert info.value.master_key_id == "k1"
        assert "'acme'" in str(info.value)
        # and it refuses to write new keys the others could not share
        other, _ = service_for(impostor)
        with pytest.raises(KeyringError, match="refusing to encrypt"):
            _set(other, "acme", "openai")
    finally:
        impostor.close()


def test_a_missing_master_key_fails_loudly(
    database_url: str, tmp_path: Path, service: KeyService
) -> None:
    _set(service, "acme", "mistral")
    rotated = make_app(database_url, tmp_path, keys=[master_key("k2")])
    try:
        with pytest.raises(UnknownMasterKey) as info:
            rotated.key_access.reveal(_only(rotated, "acme", "mistral"))
        assert info.value.master_key_id == "k1"
        assert isinstance(info.value, CredentialUnavailable)
    finally:
        rotated.close()


def test_the_live_check_decides_what_is_stored(app: App) -> None:
    for status, stored in [
        (KeyCheckStatus.INVALID, False),
        (KeyCheckStatus.UNREACHABLE, False),
        (KeyCheckStatus.VALID, True),
        (KeyCheckStatus.SKIPPED, True),
    ]:
        recorder = Recorder(check=status)
        service, _ = service_for(app, recorder)
        key = random_key("openai")
        if stored:
            result = service.set_key(OPERATOR, "acme", "openai", key, label=status.value)
            assert result.check is not None
            assert result.check.status is status
        else:
            with pytest.raises(KeyRejected, match=status.value) as info:
                service.set_key(OPERATOR, "acme", "openai", key, label=status.value)
            assert key not in str(info.value)
            assert recorder.actions("error") == ["key.rejected"]
        assert recorder.checked == ["openai"]
    assert {k.label for k in app.key_access.enabled_keys("acme", "openai")} == {
        "valid",
        "skipped",
    }
    # no check at all when asked not to
    recorder = Recorder(check=KeyCheckStatus.INVALID)
    service, _ = service_for(app, recorder)
    service.set_key(OPERATOR, "acme", "openai", random_key("openai"), label="x", test=False)
    assert recorder.checked == []


def test_testing_stored_keys(app: App) -> None:
    recorder = Recorder(check=KeyCheckStatus.INVALID)
    service, _ = service_for(app, recorder)
    _set(service, "acme", "openai", "a")
    _set(service, "acme", "openai", "b")
    results = service.test_keys(OPERATOR, "acme", "openai")
    assert [(r.key.label, r.check.status) for r in results] == [
        ("a", KeyCheckStatus.INVALID),
        ("b", KeyCheckStatus.INVALID),
    ]
    assert recorder.actions("error") == ["key.tested", "key.tested"]
    with pytest.raises(KeyNotFound):
        service.test_keys(OPERATOR, "acme", "anthropic")
