"""Resolution of a workspace key, and the default charge, against floors measured in the same run.

``python -m benchmarks resolve`` (``BENCH_RESOLVE_SIZES=1000,100000`` by default).

Setup: a SQLite store of N workspaces x 5 providers (one encrypted key each), written straight
into ``byok_workspace_keys`` with one ``executemany`` (each key encrypted and bound to its row as
the key service would).

Measured, call by call and alternating with the floor so that drift hits both alike:

- ``resolve``: ``pm.hook.byok_resolve_credential(request)`` through the real plugin manager and the
  default plugin, for a random (workspace, provider) each call. Two configurations:
  ``cold``, the key-list cache off (every call reads the store: the worst case) and ``warm``,
  the cache on and one workspace asked again and again (a running workflow: the key list and its
  decrypted key both come from the cache).
- ``floor``: a raw ``sqlite3`` point select of the same row + one AES-GCM decrypt of its
  ciphertext + one pluggy hook call with an empty implementation.

Target: median ratio at most 3x, and the same at 1,000 and 100,000 workspaces (an index lookup,
nothing that grows with N).

Also: ``pm.hook.byok_compute_charge`` on a platform credential against the same arithmetic done
by hand with Decimals.
"""

from __future__ import annotations

import base64
import gc
import os
import random
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pluggy
from byok_hookspecs import (
    Credential,
    CredentialRequest,
    CredentialSource,
    Usage,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from byok_plugin.app import App
from byok_plugin.cli.context import OPERATOR
from byok_plugin.core.crypto import STORED_PREFIX, KeyBinding, Keyring, MasterKey
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

PROVIDERS = {
    "openai": "gpt-4o",
    "anthropic": "claude-sonnet-4-5",
    "google": "gemini-2.5-flash",
    "mistral": "mistral-small-latest",
    "exa": "exa-search",
}
SIZES = [int(s) for s in os.environ.get("BENCH_RESOLVE_SIZES", "1000,100000").split(",")]
ROUNDS = int(os.environ.get("BENCH_RESOLVE_ROUNDS", "4000"))
WARMUP = 200
TARGET = 3.0
NONCE = 12

_spec = pluggy.HookspecMarker("floor")
_impl = pluggy.HookimplMarker("floor")


class _FloorSpec:
    @_spec
    def floor_hook(self, value: int) -> None:
        """An empty hook."""


class _FloorImpl:
    @_impl
    def floor_hook(self, value: int) -> None:
        return None


def _floor_pm() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("floor")
    pm.add_hookspecs(_FloorSpec)
    pm.register(_FloorImpl())
    return pm


def _key_for(provider: str) -> str:
    body = secrets.token_urlsafe(36)
    return {"openai": "sk-proj-", "anthropic": "sk-ant-api03-"}.get(provider, "") + body


def build_store(root: Path, workspaces: int, master: MasterKey) -> tuple[Settings, float]:
    """A migrated SQLite store with ``workspaces`` x 5 keys; returns its settings and seconds."""
    started = time.perf_counter()
    env = {
        "BYOK_HOME": str(root),
        "BYOK_DATABASE_URL": f"sqlite:///{root / 'bench.db'}",
        "BYOK_ENCRYPTION_KEYS": f"{master.id}:{base64.b64encode(master.secret).decode()}",
        "BYOK_VALIDATE_KEYS": "0",
    }
    app = App(Settings.from_environ(env))
    _ = app.engine  # create and migrate
    app.close()
    keyring = Keyring([master])
    stamp = datetime(2026, 11, 1, tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    rows = []
    for w in range(workspaces):
        workspace = f"ws-{w:06d}"
        for provider in PROVIDERS:
            key_id = f"key_{secrets.token_urlsafe(12)}"
            api_key = _key_for(provider)
            rows.append(
                (
                    key_id,
                    workspace,
                    provider,
                    "default",
                    keyring.encrypt(api_key, KeyBinding(workspace, provider, key_id)),
                    master.id,
                    f"{api_key[:6]}...{api_key[-4:]}",
                    "hs256:" + secrets.token_hex(16),
                    "enabled",
                    stamp,
                    stamp,
                )
            )
    db = sqlite3.connect(root / "bench.db")
    with db:
        db.executemany(
            "INSERT INTO byok_workspace_keys (id, workspace_id, provider, label, ciphertext, "
            "master_key_id, hint, fingerprint, status, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    db.execute("ANALYZE")
    db.close()
    return Settings.from_environ(env), time.perf_counter() - started


def _paired(
    measured: Callable[[int], object], floor: Callable[[int], object], rounds: int
) -> tuple[list[float], list[float]]:
    """Alternate the two call by call; returns their times in microseconds."""
    for i in range(WARMUP):
        measured(i)
        floor(i)
    ours: list[float] = []
    base: list[float] = []
    clock = time.perf_counter_ns
    gc.collect()
    for i in range(rounds):
        t0 = clock()
        measured(i)
        t1 = clock()
        floor(i)
        t2 = clock()
        ours.append((t1 - t0) / 1000)
        base.append((t2 - t1) / 1000)
    return ours, base


def _report(name: str, ours: list[float], base: list[float], target: float | None) -> float:
    ratio_of_medians = statistics.median(ours) / statistics.median(base)
    paired = statistics.median(o / b for o, b in zip(ours, base, strict=True))
    verdict = ""
    if target is not None:
        verdict = "  OK" if paired <= target else f"  ABOVE TARGET {target:g}x"
    print(
        f"  {name:<34} median {statistics.median(ours):8.1f} us   floor "
        f"{statistics.median(base):7.1f} us   ratio {paired:5.2f}x (paired) "
        f"{ratio_of_medians:5.2f}x (medians){verdict}"
    )
    return paired


def bench_size(workspaces: int) -> dict[str, float]:
    master = MasterKey("bench", secrets.token_bytes(32))
    aead = AESGCM(master.secret)
    with tempfile.TemporaryDirectory(prefix="byok-bench-") as tmp:
        settings, seconds = build_store(Path(tmp), workspaces, master)
        print(f"{workspaces:,} workspaces x {len(PROVIDERS)} providers stored in {seconds:.1f} s")
        rng = random.Random(7)
        picks = [
            (f"ws-{rng.randrange(workspaces):06d}", rng.choice(list(PROVIDERS)))
            for _ in range(ROUNDS + WARMUP)
        ]
        # resolution asks byok_authorize about every request's actor (the default rule)
        requests = [CredentialRequest(w, p, PROVIDERS[p], actor=OPERATOR) for w, p in picks]

        raw = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"))
        floor_pm = _floor_pm()
        select = (
            "SELECT id, ciphertext FROM byok_workspace_keys "
            "WHERE workspace_id = ? AND provider = ? AND status = 'enabled'"
        )

        def floor(i: int, same_workspace: bool = False) -> None:
            workspace, provider = picks[0 if same_workspace else i]
            key_id, stored = raw.execute(select, (workspace, provider)).fetchone()
            sealed = base64.b64decode(stored[len(STORED_PREFIX) + len(master.id) + 1 :])
            aad = KeyBinding(workspace, provider, key_id).associated_data()
            aead.decrypt(sealed[:NONCE], sealed[NONCE:], aad)
            floor_pm.hook.floor_hook(value=i)

        results: dict[str, float] = {}
        for label, cache_seconds, same_workspace in [
            ("resolve, cold (cache off)", "0", False),
            ("resolve, warm (one workspace)", "2", True),
        ]:
            env = {**settings.environ, "BYOK_KEY_CACHE_SECONDS": cache_seconds}
            app = App(Settings.from_environ(env))
            pm = plugin_manager_for(app, load_entrypoints=False, environ={})
            hook = pm.hook.byok_resolve_credential

            def resolve(i: int, hook=hook, same_workspace=same_workspace) -> None:
                request = requests[0 if same_workspace else i]
                credential = hook(request=request)
                assert credential.source is CredentialSource.WORKSPACE

            def base_call(i: int, same_workspace=same_workspace) -> None:
                floor(i, same_workspace)  # the same row as the measured call

            ours, base = _paired(resolve, base_call, ROUNDS)
            results[label] = _report(label, ours, base, TARGET)
            app.resolver.flush_last_used()
            app.close()
        raw.close()
    return results


def bench_charge() -> float:
    app = App(Settings.from_environ({"BYOK_HOME": tempfile.gettempdir()}))
    pm = plugin_manager_for(app, load_entrypoints=False, environ={})
    usage = Usage(
        "openai",
        "gpt-5",
        input_tokens=12_000,
        cached_input_tokens=4_096,
        output_tokens=1_500,
        reasoning_tokens=2_304,
    )
    credential = Credential(api_key="sk-bench", provider="openai", source=CredentialSource.PLATFORM)
    rates = (Decimal("1.25"), Decimal("0.125"), Decimal("10"), Decimal("10"))
    million = Decimal(1_000_000)
    multiplier = Decimal(1)
    expected = pm.hook.byok_compute_charge(usage=usage, credential=credential).amount

    def charge(_: int) -> None:
        pm.hook.byok_compute_charge(usage=usage, credential=credential)

    def plain(_: int) -> None:
        total = (
            usage.input_tokens * rates[0]
            + usage.cached_input_tokens * rates[1]
            + usage.output_tokens * rates[2]
            + usage.reasoning_tokens * rates[3]
        ) / million
        assert total * multiplier == expected

    ours, base = _paired(charge, plain, ROUNDS)
    return _report("byok_compute_charge vs Decimal", ours, base, None)


def main() -> None:
    print(f"rounds {ROUNDS} per measurement (after {WARMUP} warm-up calls), target <= {TARGET:g}x")
    by_size = {}
    for size in SIZES:
        by_size[size] = bench_size(size)
    if len(by_size) > 1:
        for label in next(iter(by_size.values())):
            ratios = ", ".join(f"{s:,}: {r[label]:.2f}x" for s, r in by_size.items())
            print(f"  {label}: {ratios}")
    bench_charge()
