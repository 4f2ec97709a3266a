"""Multi-row updates of the keys table never deadlock: two processes flushing last-used times
(each in its own shuffled order of keys) and a third rewrapping every key, 100 rounds, on
PostgreSQL. Row locks are taken in key id order, and a deadlock victim is tried again."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from keys_support import OPERATOR, keyring_value, make_app, master_key, random_key, service_for
from lock_order_support import WORKSPACES, flush_worker, rewrap_worker

pytestmark = pytest.mark.postgres

ROUNDS = 100


def test_two_flushers_and_a_rewrap_never_deadlock(postgres_url: str, tmp_path: Path) -> None:
    k1, k2 = master_key("k1"), master_key("k2")
    app = make_app(postgres_url, tmp_path, keys=[k1, k2])
    try:
        service, _ = service_for(app)
        for workspace in WORKSPACES:
            service.set_key(OPERATOR, workspace, "openai", random_key("openai"), test=False)
    finally:
        app.close()
    forward, back = keyring_value(k2, k1), keyring_value(k1, k2)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(3)
    with ctx.Pool(3) as pool:
        flushers = [
            pool.apply_async(
                flush_worker, (postgres_url, str(tmp_path), back, barrier, ROUNDS, seed)
            )
            for seed in (1, 2)
        ]
        rewrap = pool.apply_async(
            rewrap_worker, (postgres_url, str(tmp_path), [forward, back], barrier, ROUNDS)
        )
        results = [f.get(timeout=600) for f in flushers]
        rewrapped = rewrap.get(timeout=600)
    for result in results:
        assert result["warnings"] == []  # "could not record the last use ...: deadlock"
        assert result["flushed"] == [len(WORKSPACES)] * ROUNDS
    assert rewrapped["errors"] == []
    assert rewrapped["rewrapped"] == [len(WORKSPACES)] * ROUNDS
    # every key still decrypts, under the master key the last round left it
    check = make_app(postgres_url, tmp_path, keys=[k1, k2])
    try:
        for workspace in WORKSPACES:
            (key,) = check.key_store.list_keys(workspace, "openai")
            assert key.master_key_id == ("k1" if ROUNDS % 2 == 0 else "k2")
            assert check.key_access.credential(workspace, "openai", key.id).api_key
    finally:
        check.close()
