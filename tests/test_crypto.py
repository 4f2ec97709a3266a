"""The keyring and AES-GCM encryption bound to a key's row (no database here)."""

from __future__ import annotations

import base64
import os
import re
import secrets
import stat
import threading
from pathlib import Path

import pytest
from byok_hookspecs import CredentialUnavailable
from hypothesis import given, settings
from hypothesis import strategies as st
from keys_support import keyring_value, master_key

from byok_plugin.core.crypto import (
    KeyBinding,
    Keyring,
    MasterKey,
    add_master_key_to_file,
    create_key_file,
    generate_master_key,
    master_key_id_of,
    parse_keyring,
    remove_master_key_from_file,
    restore_master_key_to_file,
)
from byok_plugin.core.errors import (
    CiphertextMismatch,
    KeyDecryptionError,
    KeyringError,
    MalformedCiphertext,
    NoMasterKey,
    UnknownMasterKey,
)

SECRET = "sk-proj-" + secrets.token_urlsafe(40)
ROW = KeyBinding("acme", "openai", "key_abcdefgh12345678")


def _raw(stored: str) -> bytearray:
    return bytearray(base64.b64decode(stored.rsplit(":", 1)[1]))


def _stored(kid: str, raw: bytes) -> str:
    return f"byok:v1:{kid}:{base64.b64encode(raw).decode()}"


def test_round_trip_in_the_versioned_stored_form() -> None:
    ring = Keyring([master_key("k1")])
    stored = ring.encrypt(SECRET, ROW)
    assert re.fullmatch(r"byok:v1:k1:[A-Za-z0-9+/=]+", stored)
    assert master_key_id_of(stored) == "k1"
    assert ring.decrypt(stored, ROW) == SECRET
    # a fresh 96-bit nonce each time: the same key never encrypts to the same text
    again = ring.encrypt(SECRET, ROW)
    assert again != stored
    assert _raw(again)[:12] != _raw(stored)[:12]
    assert len(_raw(stored)) == 12 + len(SECRET.encode()) + 16


@pytest.mark.parametrize(
    "other",
    [
        KeyBinding("acme-2", "openai", ROW.key_id),
        KeyBinding("acme", "mistral", ROW.key_id),
        KeyBinding("acme", "openai", "key_zzzzzzzzzzzzzzzz"),
    ],
    ids=["other-workspace", "other-provider", "other-row"],
)
def test_a_ciphertext_copied_to_another_row_does_not_decrypt(other: KeyBinding) -> None:
    ring = Keyring([master_key()])
    stored = ring.encrypt(SECRET, ROW)
    with pytest.raises(CiphertextMismatch) as info:
        ring.decrypt(stored, other)
    err = info.value
    assert isinstance(err, CredentialUnavailable)
    assert (err.workspace_id, err.provider, err.key_id) == (
        other.workspace_id,
        other.provider,
        other.key_id,
    )
    assert other.workspace_id in str(err)
    assert other.key_id in str(err)
    assert SECRET not in str(err)


def test_the_associated_data_is_unambiguous() -> None:
    pairs = [
        (KeyBinding("a|b", "c", "k"), KeyBinding("a", "b|c", "k")),
        (KeyBinding("ab", "c", "k"), KeyBinding("a", "bc", "k")),
        (KeyBinding("a", "", "bk"), KeyBinding("a", "b", "k")),
    ]
    ring = Keyring([master_key()])
    for one, two in pairs:
        assert one.associated_data() != two.associated_data()
        with pytest.raises(CiphertextMismatch):
            ring.decrypt(ring.encrypt(SECRET, one), two)


@settings(max_examples=60, deadline=None)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_is_detected(position: int, bit: int) -> None:
    ring = Keyring([MasterKey("k1", b"\x01" * 32)])
    stored = ring.encrypt(SECRET, ROW)
    raw = _raw(stored)
    raw[position % len(raw)] ^= 1 << bit
    with pytest.raises(CiphertextMismatch) as info:
        ring.decrypt(_stored("k1", bytes(raw)), ROW)
    assert info.value.reason == "tampered"


def test_a_wrong_master_key_under_the_same_id_does_not_decrypt() -> None:
    stored = Keyring([master_key("k1")]).encrypt(SECRET, ROW)
    with pytest.raises(CiphertextMismatch):
        Keyring([master_key("k1")]).decrypt(stored, ROW)


def test_an_unknown_master_key_id_is_named() -> None:
    stored = Keyring([master_key("old")]).encrypt(SECRET, ROW)
    with pytest.raises(UnknownMasterKey) as info:
        Keyring([master_key("new")]).decrypt(stored, ROW)
    assert info.value.master_key_id == "old"
    assert "'old'" in str(info.value)
    assert "acme" in str(info.value)
    assert isinstance(info.value, KeyDecryptionError)


@pytest.mark.parametrize(
    "stored",
    ["sk-plaintext-by-mistake", "byok:v2:k1:AAAA", "byok:v1:k1:not base64!", "byok:v1:k1:AAAA"],
)
def test_malformed_stored_values_are_refused(stored: str) -> None:
    with pytest.raises(MalformedCiphertext) as info:
        Keyring([master_key("k1")]).decrypt(stored, ROW)
    assert info.value.reason == "malformed"
    assert "sk-plaintext" not in str(info.value)


def test_the_first_key_encrypts_and_every_key_decrypts() -> None:
    old, new = master_key("old"), master_key("new")
    stored_old = Keyring([old]).encrypt(SECRET, ROW)
    ring = Keyring.from_environment_value(keyring_value(new, old))
    assert ring.current.id == "new"
    assert ring.ids == ("new", "old")
    assert ring.decrypt(stored_old, ROW) == SECRET
    assert master_key_id_of(ring.encrypt(SECRET, ROW)) == "new"


def _message(value: str) -> str:
    with pytest.raises(KeyringError) as info:
        parse_keyring(value, source="BYOK_ENCRYPTION_KEYS")
    return str(info.value)


def test_malformed_keyrings_are_named_without_their_key_material() -> None:
    short = base64.b64encode(os.urandom(31)).decode()
    good = base64.b64encode(os.urandom(32)).decode()
    assert "31 bytes" in _message(f"k1:{short}")
    assert "entry 2" in _message(f"k1:{good},k2:{short}")
    assert "not valid base64" in _message("k1:%%%%")
    assert "not 'id:base64key'" in _message(good)
    assert "appears twice" in _message(f"k1:{good},k1:{good}")
    assert "not valid" in _message(f"bad id:{good}")
    for value in (f"k1:{short}", f"k1:{good},k2:{short}", good, f"k1:{good},k1:{good}"):
        message = _message(value)
        assert short not in message
        assert good not in message


def test_no_master_key_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(NoMasterKey) as info:
        Keyring.load(encryption_keys=None, key_file=tmp_path / "master.keys")
    message = str(info.value)
    assert "byok init" in message
    assert "BYOK_ENCRYPTION_KEYS" in message
    with pytest.raises(NoMasterKey):
        Keyring.from_environment_value(" , ")


def test_master_keys_never_show_in_repr_or_str() -> None:
    key = generate_master_key()
    ring = Keyring([key])
    shown = repr(key) + str(key) + repr(ring) + str(ring)
    for form in (key.secret.hex(), base64.b64encode(key.secret).decode(), repr(key.secret)):
        assert form not in shown
    assert key.id in repr(ring)


def test_the_key_file_is_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "home" / "master.keys"
    key = create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert "BACK UP THIS FILE" in text
    assert Keyring.from_file(path).current.id == key.id
    with pytest.raises(KeyringError, match="never overwritten"):
        create_key_file(path)
    assert path.read_text() == text


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.keys"
    create_key_file(path)
    path.chmod(0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        Keyring.from_file(path)


def test_a_new_master_key_goes_first_and_keeps_the_old_ones(tmp_path: Path) -> None:
    path = tmp_path / "master.keys"
    old = create_key_file(path)
    stored = Keyring.from_file(path).encrypt(SECRET, ROW)
    new = add_master_key_to_file(path)
    ring = Keyring.from_file(path)
    assert ring.ids == (new.id, old.id)
    assert ring.decrypt(stored, ROW) == SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # no temporary file left behind; the (empty, private) lock file that serializes edits stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [".master.keys.lock", "master.keys"]
    lock = tmp_path / ".master.keys.lock"
    assert lock.stat().st_size == 0
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_fingerprints_are_keyed_and_scoped() -> None:
    one, two = master_key("k1"), master_key("k2")
    ring = Keyring([one, two])

    def fp(workspace: str = "acme", provider: str = "openai", kid: str = "k1") -> str:
        return ring.fingerprint(
            SECRET, workspace_id=workspace, provider=provider, master_key_id=kid
        )

    assert fp() == fp()
    assert re.fullmatch(r"hs256:[0-9a-f]{32}", fp())
    assert len({fp(), fp(workspace="other"), fp(provider="mistral"), fp(kid="k2")}) == 4
    import hashlib

    assert fp()[6:] not in hashlib.sha256(SECRET.encode()).hexdigest()


def test_key_file_edits_at_the_same_time_lose_no_key(tmp_path: Path) -> None:
    """Each edit reads, changes and replaces the file under one lock: none overwrites another."""
    path = tmp_path / "master.keys"
    first = create_key_file(path)
    added: list[str] = []
    errors: list[BaseException] = []

    def add() -> None:
        try:
            added.append(add_master_key_to_file(path).id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(Keyring.from_file(path).ids) == {first.id, *added}
    assert len(added) == 12


def test_retiring_from_a_file_keeps_the_key_aside_and_refuses_the_current_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "master.keys"
    old = create_key_file(path)
    new = add_master_key_to_file(path)
    with pytest.raises(KeyringError, match=f"master key {new.id} is the current one"):
        remove_master_key_from_file(path, new.id)
    kept = remove_master_key_from_file(path, old.id)
    assert Keyring.from_file(path).ids == (new.id,)
    assert Keyring.from_file(kept).ids == (old.id,)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    # put back, retired again: the first kept file is not overwritten
    restore_master_key_to_file(path, Keyring.from_file(kept).current)
    assert Keyring.from_file(path).ids == (new.id, old.id)
    again = remove_master_key_from_file(path, old.id)
    assert again != kept
    assert kept.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".master.keys.")) == [
        ".master.keys.lock"
    ]  # no temporary file left behind
