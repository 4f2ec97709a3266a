"""``byok keys rewrap``: several thousand rows, a real process killed part-way, then run again."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from keys_support import OPERATOR, keyring_value, make_app, master_key, random_key, service_for

from byok_plugin.core.crypto import (
    KeyBinding,
    Keyring,
    MasterKey,
    add_master_key_to_file,
    create_key_file,
)
from byok_plugin.core.errors import KeyringError
from byok_plugin.keys.service import KeyService
from byok_plugin.manager import plugin_manager_for
from byok_plugin.store.keys_repo import new_key_id
from byok_plugin.store.tables import workspace_keys

ROWS = 3000
PROVIDERS = ("openai", "anthropic", "google", "mistral", "exa")


def _seed(database_url: str, home: Path, k1: MasterKey) -> dict[str, str]:
    """ROWS keys under master key k1 (bulk-inserted): id -> plaintext."""
    app = make_app(database_url, home, keys=[k1])
    ring = Keyring([k1])
    now = datetime.now(UTC)
    plain: dict[str, str] = {}
    rows = []
    for i in range(ROWS):
        workspace, provider = f"ws-{i // 10:04d}", PROVIDERS[i % 5]
        key_id, api_key = new_key_id(), random_key(provider)
        plain[key_id] = api_key
        rows.append(
            {
                "id": key_id,
                "workspace_id": workspace,
                "provider": provider,
                "label": f"label-{i % 10}",
                "ciphertext": ring.encrypt(api_key, KeyBinding(workspace, provider, key_id)),
                "master_key_id": k1.id,
                "hint": "x",
                "fingerprint": ring.fingerprint(
                    api_key, workspace_id=workspace, provider=provider, master_key_id=k1.id
                ),
                "status": "enabled",
                "created_by": "seed",
                "created_at": now,
                "updated_by": "seed",
                "updated_at": now,
            }
        )
    try:
        app.key_store.record_master_key(k1)
        with app.engine.begin() as conn:
            conn.execute(sa.insert(workspace_keys), rows)
    finally:
        app.close()
    return plain


def _rewrap(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "byok_plugin", "keys", "rewrap", *args],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _decrypt_all(database_url: str, home: Path, keys: list[MasterKey]) -> dict[str, str]:
    app = make_app(database_url, home, keys=keys)
    try:
        # every row (none is under a master key named "-")
        rows = app.key_store.batch_not_under("-", after_id=None, limit=10 * ROWS)
        return {row.id: app.key_access.decrypt(row) for row in rows}
    finally:
        app.close()


def test_rewrap_killed_part_way_and_run_again(database_url: str, tmp_path: Path) -> None:
    k1, k2 = master_key("k1"), master_key("k2")
    plain = _seed(database_url, tmp_path, k1)
    env = {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_ENCRYPTION_KEYS": keyring_value(k2, k1),  # k2 now encrypts
    }

    # 1. start a slow rewrap and kill it (SIGKILL: no clean-up of any kind) after a few batches
    proc = _rewrap(env, "--batch-size", "40", "--pause", "0.05")
    assert proc.stdout is not None
    batches = 0
    for line in proc.stdout:
        if line.startswith("  batch:"):
            batches += 1
            if batches == 4:
                proc.kill()
                break
    proc.wait(timeout=30)
    assert proc.returncode == -9, proc.stderr.read() if proc.stderr else ""

    app = make_app(database_url, tmp_path, keys=[k2, k1])
    try:
        counts = app.key_store.count_by_master_key()
    finally:
        app.close()
    assert counts["k2"] >= 4 * 40  # the committed batches stayed...
    assert counts["k1"] > 0  # ...and it really was interrupted
    assert counts["k1"] + counts["k2"] == ROWS
    # every row, either side of the kill, still decrypts to its own key
    assert _decrypt_all(database_url, tmp_path, [k2, k1]) == plain

    # 2. run again to the end
    proc = _rewrap(env, "--batch-size", "500")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"rewrapped {counts['k1']} rows under k2" in out
    assert f"after: {ROWS} keys under master key k2" in out
    assert "master key(s) k1 any more: retire them with `byok keys retire-master-key ID`" in out

    # 3. the old key is gone from the keyring: nothing is lost
    assert _decrypt_all(database_url, tmp_path, [k2]) == plain

    # 4. once more: nothing to do (idempotent)
    proc = _rewrap({**env, "BYOK_ENCRYPTION_KEYS": keyring_value(k2)})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "rewrapped 0 rows under k2" in out


def test_rewrap_reports_what_it_cannot_decrypt_and_does_the_rest(
    database_url: str, tmp_path: Path
) -> None:
    k1, k2 = master_key("k1"), master_key("k2")
    old = make_app(database_url, tmp_path, keys=[k1])
    service, _ = service_for(old)
    for provider in PROVIDERS:
        service.set_key(OPERATOR, "acme", provider, random_key(provider), test=False)
    broken = old.key_access.enabled_keys("acme", "exa")[0]
    with old.engine.begin() as conn:
        conn.execute(
            sa.update(workspace_keys)
            .where(workspace_keys.c.id == broken.id)
            .values(ciphertext=broken.ciphertext[:-8] + "AAAAAAA=")
        )
    old.close()

    app = make_app(database_url, tmp_path, keys=[k2, k1])
    try:
        service, _ = service_for(app)
        dry = service.rewrap(OPERATOR, dry_run=True)
        assert (dry.rewrapped, len(dry.failures)) == (4, 1)
        assert app.key_store.count_by_master_key() == {"k1": 5}  # a dry run changes nothing

        report = service.rewrap(OPERATOR, batch_size=2)
        assert report.rewrapped == 4
        (failure,) = report.failures
        assert (failure.key_id, failure.provider, failure.reason) == (broken.id, "exa", "tampered")
        assert report.after == {"k1": 1, "k2": 4}
        assert not report.complete
        assert report.retirable == ()  # k1 still holds a row
        assert app.audit_store.events("*", action="key.rewrapped")[0].outcome == "error"
    finally:
        app.close()


def test_a_row_changed_since_it_was_read_is_left_alone(database_url: str, tmp_path: Path) -> None:
    k1 = master_key("k1")
    app = make_app(database_url, tmp_path, keys=[k1])
    try:
        service, _ = service_for(app)
        service.set_key(OPERATOR, "acme", "openai", random_key("openai"), label="a", test=False)
        service.set_key(OPERATOR, "acme", "openai", random_key("openai"), label="b", test=False)
        rows = app.key_store.batch_not_under("k2", after_id=None, limit=10)
        b = next(row for row in rows if row.label == "b")
        # meanwhile, an admin replaces key "a" (new row, new id) and "b" changes in place
        service.set_key(OPERATOR, "acme", "openai", random_key("openai"), label="a", test=False)
        with app.engine.begin() as conn:
            conn.execute(
                sa.update(workspace_keys)
                .where(workspace_keys.c.id == b.id)
                .values(ciphertext=b.ciphertext + "changed")
            )
        updates = [(row, "byok:v1:k2:stale", "k2", "hs256:stale") for row in rows]
        assert app.key_store.swap_ciphertexts(updates) == 0
        assert app.key_store.count_by_master_key() == {"k1": 2}
        fresh = app.key_store.batch_not_under("k2", after_id=None, limit=10)
        done = app.key_store.swap_ciphertexts([(fresh[0], "byok:v1:k2:new", "k2", "hs256:x")])
        assert done == 1
    finally:
        app.close()


class _StaleWriterAfterTheCheck:
    """The real key store; right after retirement's first count, a process that still encrypts
    under the old master key (it was not restarted after the rotation) stores a key."""

    def __init__(self, store: Any, stale_write: Callable[[], None]) -> None:
        self._store = store
        self._stale_write: Callable[[], None] | None = stale_write

    def count_by_master_key(self) -> dict[str, int]:
        counts = self._store.count_by_master_key()
        if self._stale_write is not None:
            write, self._stale_write = self._stale_write, None
            write()
        return counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_key_stored_under_the_master_key_while_it_is_retired_puts_it_back(
    database_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    key_file = home / "master.keys"
    old = create_key_file(key_file)
    new = add_master_key_to_file(key_file)
    app = make_app(database_url, home)  # reads the key file: new first
    stale = make_app(database_url, home, keys=[old, new])  # still encrypts under the old key
    try:
        _, stale_pm = service_for(stale)

        def stale_write() -> None:
            stale.key_service(stale_pm).set_key(
                OPERATOR, "ws-late", "openai", random_key("openai"), test=False
            )

        pm = plugin_manager_for(app, load_entrypoints=False)
        service = KeyService(
            store=_StaleWriterAfterTheCheck(app.key_store, stale_write),  # type: ignore[arg-type]
            access=app.key_access,
            keyring=lambda: app.keyring,
            pm=pm,
            key_file=key_file,
        )
        with pytest.raises(KeyringError, match="while it was being retired") as refused:
            service.retire_master_key(OPERATOR, old.id)
        assert "Restart every process" in str(refused.value)
        assert Keyring.from_file(key_file).ids == (new.id, old.id)  # put back
        assert not (home / f"master.keys.retired-{old.id}").exists()  # and no copy left aside
        assert app.key_store.count_by_master_key()[old.id] == 1
        # and the key stored meanwhile still decrypts with the file as it is now
        (row,) = app.key_store.batch_not_under(new.id, after_id=None, limit=10)
        assert app.key_access.decrypt(row).startswith("sk-")
    finally:
        stale.close()
        app.close()
