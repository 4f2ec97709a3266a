"""Several processes setting keys at once against one PostgreSQL database.

Each worker is a real process (multiprocessing, spawn) with its own engine; they all wait at a
barrier and then write to the same workspace and provider.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from pathlib import Path

import pytest
from keys_support import (
    OPERATOR,
    concurrent_set_worker,
    keyring_value,
    make_app,
    master_key,
    random_key,
    service_for,
)

pytestmark = pytest.mark.postgres

WORKERS = 5


def _run(postgres_url: str, tmp_path: Path, keyring: str, jobs: list[list[tuple[str, str]]]):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(len(jobs))
    with ctx.Pool(len(jobs)) as pool:
        pending = [
            pool.apply_async(
                concurrent_set_worker,
                (postgres_url, str(tmp_path), keyring, barrier, "acme", "openai", job),
            )
            for job in jobs
        ]
        return [p.get(timeout=120) for p in pending]


def test_concurrent_sets_keep_the_limit_and_lose_nothing(postgres_url: str, tmp_path: Path) -> None:
    k1 = master_key("k1")
    # Each worker first sets the label "shared" 3 times (so the first write anywhere creates it
    # and every later one replaces it), then tries 4 labels of its own: 20 attempts, 9 slots.
    jobs = [
        [("shared", random_key("openai")) for _ in range(3)]
        + [(f"w{w}-{i}", random_key("openai")) for i in range(4)]
        for w in range(WORKERS)
    ]
    results = _run(postgres_url, tmp_path, keyring_value(k1), jobs)

    stored = [s for r in results for s in r["stored"]]
    refused = [label for r in results for label in r["refused"]]
    assert len(stored) + len(refused) == WORKERS * 7  # every call answered, none crashed

    app = make_app(postgres_url, tmp_path, keys=[k1])
    try:
        rows = app.key_store.list_keys("acme", "openai")
        labels = Counter(r.label for r in rows)
        # the limit held, labels stayed unique
        assert len(rows) == 10
        assert max(labels.values()) == 1
        # no lost write: a replacement is never refused, new labels took the 9 free slots...
        assert labels["shared"] == 1
        assert "shared" not in refused
        new_labels_stored = [s for s in stored if s[0] != "shared"]
        assert len(new_labels_stored) == 9
        assert len(refused) == WORKERS * 4 - 9
        # ...every stored new label is there with the worker's own key...
        by_id = {r.id: r for r in rows}
        access = app.key_access
        for label, key_id, api_key in new_labels_stored:
            assert by_id[key_id].label == label
            assert access.credential("acme", "openai", key_id).api_key == api_key
        # ...and the "shared" label was replaced one writer at a time: each replacement names
        # the row the previous writer left, so the chain covers all 15 writes exactly once.
        events = app.audit_store.events("acme")
        shared = {key_id: api_key for label, key_id, api_key in stored if label == "shared"}
        assert len(shared) == WORKERS * 3
        replaced = [
            e.detail.rsplit("replaces ", 1)[1]
            for e in events
            if e.action == "key.replaced" and e.key_id in shared
        ]
        created = [e for e in events if e.action == "key.created" and e.key_id in shared]
        assert len(created) == 1
        assert len(replaced) == WORKERS * 3 - 1
        assert len(set(replaced)) == len(replaced)  # no row was replaced twice
        (survivor,) = set(shared) - set(replaced)
        assert by_id[survivor].label == "shared"
        assert access.credential("acme", "openai", survivor).api_key == shared[survivor]
    finally:
        app.close()


def test_the_limit_holds_when_workers_race_for_the_last_slot(
    postgres_url: str, tmp_path: Path
) -> None:
    k1 = master_key("k1")
    app = make_app(postgres_url, tmp_path, keys=[k1])
    try:
        service, _ = service_for(app)
        for i in range(9):
            service.set_key(
                OPERATOR, "acme", "openai", random_key("openai"), label=f"{i}", test=False
            )
    finally:
        app.close()
    jobs = [[(f"last-{w}", random_key("openai"))] for w in range(WORKERS)]
    results = _run(postgres_url, tmp_path, keyring_value(k1), jobs)
    assert sum(len(r["stored"]) for r in results) == 1
    assert sum(len(r["refused"]) for r in results) == WORKERS - 1
