"""The platform key pool: which variables it reads, round-robin, cooldown, and no leaks."""

from __future__ import annotations

import logging
import secrets
import threading
from collections import Counter
from pathlib import Path

import pytest

from byok_plugin.app import App
from byok_plugin.manager import plugin_manager_for
from byok_plugin.resolution.platform_keys import PlatformKeyPool, keys_from_environ, mask_key
from byok_plugin.settings import Settings

PREFIXES = {
    "openai": ["OPENAI"],
    "anthropic": ["ANTHROPIC"],
    "google": ["GEMINI", "GOOGLE"],
    "mistral": ["MISTRAL"],
    "exa": ["EXA"],
}


def _key(prefix: str = "sk-") -> str:
    return prefix + secrets.token_urlsafe(24)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_all_variable_forms_are_read_in_order_without_duplicates() -> None:
    k = [_key() for _ in range(6)]
    env = {
        "BYOK_PLATFORM_KEYS_OPENAI": f" {k[0]} , {k[1]},,",
        "OPENAI_API_KEY": k[2],
        "OPENAI_API_KEY_10": k[4],
        "OPENAI_API_KEY_2": k[3],
        "OPENAI_API_KEY_3": k[1],  # the same key twice is one key
        "OPENAI_API_KEY_X": k[5],  # not a numbered form: ignored
        "GEMINI_API_KEY_1": "g1-" + k[0],
        "GOOGLE_API_KEY": "g2-" + k[0],
        "EXA_API_KEY_1": "exa-" + k[0],
        "ANTHROPIC_API_KEY_1": "",  # empty: ignored
    }
    pools = keys_from_environ(env, PREFIXES)
    assert [p.key_id for p in pools["openai"]] == [
        "env:BYOK_PLATFORM_KEYS_OPENAI[0]",
        "env:BYOK_PLATFORM_KEYS_OPENAI[1]",
        "env:OPENAI_API_KEY",
        "env:OPENAI_API_KEY_2",
        "env:OPENAI_API_KEY_10",
    ]
    assert [p.api_key for p in pools["openai"]] == [k[0], k[1], k[2], k[3], k[4]]
    assert [p.key_id for p in pools["google"]] == ["env:GEMINI_API_KEY_1", "env:GOOGLE_API_KEY"]
    assert [p.key_id for p in pools["exa"]] == ["env:EXA_API_KEY_1"]
    assert "anthropic" not in pools
    assert "mistral" not in pools


def test_round_robin_skips_keys_in_cooldown_until_it_ends() -> None:
    clock = FakeClock()
    keys = [_key() for _ in range(3)]
    env = {f"OPENAI_API_KEY_{i + 1}": key for i, key in enumerate(keys)}
    pool = PlatformKeyPool.from_environ(env, PREFIXES, cooldown_seconds=30, clock=clock)
    got = [pool.acquire("openai") for _ in range(6)]
    assert [g.api_key for g in got if g] == keys + keys

    assert pool.cool_down("env:OPENAI_API_KEY_2")
    assert [pool.acquire("openai").key_id for _ in range(4)] == [  # type: ignore[union-attr]
        "env:OPENAI_API_KEY_1",
        "env:OPENAI_API_KEY_3",
        "env:OPENAI_API_KEY_1",
        "env:OPENAI_API_KEY_3",
    ]
    assert pool.cooling("openai") == (1, 30.0)
    clock.now += 30.5
    assert {pool.acquire("openai").key_id for _ in range(3)} == {  # type: ignore[union-attr]
        "env:OPENAI_API_KEY_1",
        "env:OPENAI_API_KEY_2",
        "env:OPENAI_API_KEY_3",
    }
    assert not pool.cool_down("env:NOT_A_POOL_KEY")


def test_every_key_cooling_down_means_no_key() -> None:
    clock = FakeClock()
    pool = PlatformKeyPool.from_environ(
        {"MISTRAL_API_KEY": _key("m-")}, PREFIXES, cooldown_seconds=10, clock=clock
    )
    pool.cool_down("env:MISTRAL_API_KEY", seconds=5)
    assert pool.acquire("mistral") is None
    assert pool.cooling("mistral") == (1, 5.0)
    clock.now += 5.01
    assert pool.acquire("mistral") is not None
    assert pool.acquire("anthropic") is None  # none configured


def test_concurrent_acquires_share_the_keys_evenly() -> None:
    keys = {f"ANTHROPIC_API_KEY_{i}": _key("sk-ant-") for i in range(1, 5)}
    pool = PlatformKeyPool.from_environ(keys, PREFIXES)
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(250):
            key = pool.acquire("anthropic")
            assert key is not None
            with lock:
                counts[key.key_id] += 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts.values()) == 2000
    assert set(counts.values()) == {500}


def test_keys_never_appear_in_repr_or_logs(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    secret = _key()
    env = {"BYOK_HOME": str(tmp_path), "OPENAI_API_KEY_1": secret}
    pool = PlatformKeyPool.from_environ(env, PREFIXES)
    key = pool.acquire("openai")
    assert key is not None
    assert secret not in repr(key)
    assert secret not in repr(pool)
    assert repr(pool) == "PlatformKeyPool(openai=1)"
    assert key.hint == f"{secret[:6]}...{secret[-4:]}"
    assert secret not in key.hint

    app = App(Settings.from_environ(env))
    with caplog.at_level(logging.DEBUG):
        pm = plugin_manager_for(app, load_entrypoints=False, environ={})
        assert pm.hook.byok_platform_key(provider="openai", model="gpt-4o") == secret
        assert pm.hook.byok_platform_key(provider="anthropic", model="claude-haiku-4-5") is None
    assert secret not in caplog.text
    assert secret not in repr(app)
    assert secret not in repr(app.settings)


def test_mask_key_shows_too_little_to_use() -> None:
    assert mask_key("sk-proj-abcdefghijklmnop1234") == "sk-pro...1234"
    assert mask_key("short-key") == "...ey"
    assert mask_key("abc") == "****"


def test_hook_byok_platform_key_rotates_the_pool(tmp_path: Path) -> None:
    a, b = _key("exa-"), _key("exa-")
    env = {"BYOK_HOME": str(tmp_path), "BYOK_PLATFORM_KEYS_EXA": f"{a},{b}"}
    pm = plugin_manager_for(App(Settings.from_environ(env)), load_entrypoints=False, environ={})
    got = [pm.hook.byok_platform_key(provider="exa", model="exa-search") for _ in range(4)]
    assert got == [a, b, a, b]
