"""Resolution with envelope encryption and a warm data-key cache against today's path, same run.

``python -m benchmarks envelope`` (``BENCH_ENVELOPE_WORKSPACES=1000``, ``BENCH_ENVELOPE_ROUNDS``).

Two SQLite stores with the same N workspaces x 5 providers (one key each): ``direct``, every key
encrypted under the master key as today, and ``envelope``, every key under its workspace's data
key, the data keys wrapped by the same master key (``BYOK_KEY_ENVELOPES=1``). Both resolve through
the real plugin manager and the default plugin, with the key-list cache off
(``BYOK_KEY_CACHE_SECONDS=0``: every call reads the store and decrypts, the path where the data
key matters). The envelope store's data keys are unwrapped once beforehand (a warm data-key cache:
no KMS call per resolution). The two are called alternately, call by call, on the same random
(workspace, provider) sequence, so that drift hits both alike.

Target: envelope / direct, median of the paired ratios, at most 1.2x.
"""

from __future__ import annotations

import base64
import random
import secrets
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime
from os import environ
from pathlib import Path

from byok_hookspecs import CredentialRequest, CredentialSource

from byok_plugin.app import App
from byok_plugin.cli.context import OPERATOR
from byok_plugin.core.crypto import ENVELOPE_MASTER_KEY_ID, DataKey, KeyBinding, Keyring, MasterKey
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

from .bench_resolve import PROVIDERS, WARMUP, _key_for, _paired

WORKSPACES = int(environ.get("BENCH_ENVELOPE_WORKSPACES", "1000"))
ROUNDS = int(environ.get("BENCH_ENVELOPE_ROUNDS", "4000"))
TARGET = 1.2


def _build(root: Path, master: MasterKey, *, envelopes: bool) -> Settings:
    env = {
        "BYOK_HOME": str(root),
        "BYOK_DATABASE_URL": f"sqlite:///{root / 'bench.db'}",
        "BYOK_ENCRYPTION_KEYS": f"{master.id}:{base64.b64encode(master.secret).decode()}",
        "BYOK_VALIDATE_KEYS": "0",
        "BYOK_KEY_CACHE_SECONDS": "0",
        "BYOK_KEY_ENVELOPES": "1" if envelopes else "0",
    }
    app = App(Settings.from_environ(env))
    _ = app.engine  # create and migrate
    app.close()
    keyring = Keyring([master])
    stamp = datetime(2026, 11, 1, tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    rows, wrapped = [], []
    for w in range(WORKSPACES):
        workspace = f"ws-{w:06d}"
        data_key = None
        if envelopes:
            secret = secrets.token_bytes(32)
            data_key = DataKey(workspace, secret)
            kek, blob = keyring.wrap_data_key(workspace, secret)
            encoded = base64.b64encode(blob).decode()
            wrapped.append((workspace, "local", kek, encoded, data_key.check_value, stamp, stamp))
        for provider in PROVIDERS:
            key_id = f"key_{secrets.token_urlsafe(12)}"
            api_key = _key_for(provider)
            binding = KeyBinding(workspace, provider, key_id)
            if data_key is not None:
                ciphertext, under = data_key.encrypt(api_key, binding), ENVELOPE_MASTER_KEY_ID
            else:
                ciphertext, under = keyring.encrypt(api_key, binding), master.id
            rows.append(
                (key_id, workspace, provider, "default", ciphertext, under, "x", "hs256:x",
                 "enabled", stamp, stamp)
            )  # fmt: skip
    db = sqlite3.connect(root / "bench.db")
    with db:
        db.executemany(
            "INSERT INTO byok_workspace_keys (id, workspace_id, provider, label, ciphertext, "
            "master_key_id, hint, fingerprint, status, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.executemany(
            "INSERT INTO byok_data_keys (workspace_id, kek_provider, kek_id, wrapped, "
            "check_value, created_at, wrapped_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            wrapped,
        )
    db.execute("ANALYZE")
    db.close()
    return Settings.from_environ(env)


def main() -> None:
    print(
        f"{WORKSPACES:,} workspaces x {len(PROVIDERS)} providers, rounds {ROUNDS} (after "
        f"{WARMUP} warm-up calls), target envelope <= {TARGET:g}x direct"
    )
    master = MasterKey("bench", secrets.token_bytes(32))
    rng = random.Random(19)
    picks = [
        (f"ws-{rng.randrange(WORKSPACES):06d}", rng.choice(list(PROVIDERS)))
        for _ in range(ROUNDS + WARMUP)
    ]
    requests = [CredentialRequest(w, p, PROVIDERS[p], actor=OPERATOR) for w, p in picks]
    with (
        tempfile.TemporaryDirectory(prefix="byok-bench-direct-") as a,
        tempfile.TemporaryDirectory(prefix="byok-bench-envelope-") as b,
    ):
        started = time.perf_counter()
        direct = App(_build(Path(a), master, envelopes=False))
        envelope = App(_build(Path(b), master, envelopes=True))
        print(f"stores built in {time.perf_counter() - started:.1f} s")
        hooks = []
        for app in (direct, envelope):
            pm = plugin_manager_for(app, load_entrypoints=False, environ={})
            hooks.append(pm.hook.byok_resolve_credential)
        started = time.perf_counter()
        for w in range(WORKSPACES):  # warm the data-key cache: one unwrap per workspace
            envelope.data_keys.get(f"ws-{w:06d}")
        print(
            f"data-key cache warmed: {envelope.data_keys.cached:,} unwraps in "
            f"{time.perf_counter() - started:.2f} s"
        )

        def run(hook, i: int) -> None:  # type: ignore[no-untyped-def]
            credential = hook(request=requests[i])
            assert credential.source is CredentialSource.WORKSPACE

        ours, base = _paired(lambda i: run(hooks[1], i), lambda i: run(hooks[0], i), ROUNDS)
        paired = statistics.median(o / d for o, d in zip(ours, base, strict=True))
        medians = statistics.median(ours) / statistics.median(base)
        verdict = "OK" if paired <= TARGET else f"ABOVE TARGET {TARGET:g}x"
        print(
            f"  resolve, key-list cache off: envelope median {statistics.median(ours):.1f} us, "
            f"direct {statistics.median(base):.1f} us, ratio {paired:.3f}x (paired) "
            f"{medians:.3f}x (medians)  {verdict}"
        )
        assert envelope.data_keys.cached == WORKSPACES  # no unwrap (no KMS call) meanwhile
        for app in (direct, envelope):
            app.resolver.flush_last_used()
            app.close()
