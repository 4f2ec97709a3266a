"""Cooldowns follow the provider: a key answered 429 with ``Retry-After: 7`` (or Gemini's
``RetryInfo.retryDelay: "7s"``) is skipped for 7 s by every worker, through the store.

Real worker processes (spawn), a real store (SQLite file and PostgreSQL), real HTTP against the
emulator and its fault API. No timed assertion: the test checks the ``cooldown_until`` stored.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    CredentialRequest,
    CredentialSource,
    CredentialUnavailable,
    FailureReason,
    ProviderFailure,
    calling_inline,
)
from cooldown_support import call_with_resolved_keys
from keys_support import OPERATOR, keyring_value, make_app, master_key, service_for

from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.resolution.resolver import MAX_COOLDOWN_SECONDS, Resolver
from byok_plugin.store.tables import workspace_keys

MODELS = {"openai": "gpt-4o-mini", "google": "gemini-2.5-flash"}


def _worker(environ: dict[str, str], workspace: str, provider: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:  # a process of its own for each worker
        return pool.apply(call_with_resolved_keys, (environ, workspace, provider, MODELS[provider]))


@pytest.mark.parametrize("provider", ["openai", "google"])
def test_a_429_with_retry_after_7_is_skipped_7_s_by_two_worker_processes(
    emulator: EmulatorServer, database_url: str, tmp_path: Path, provider: str
) -> None:
    keys = [master_key()]
    app = make_app(database_url, tmp_path, keys=keys)
    service, _ = service_for(app)
    first_key = emulator.new_key(provider, label="first")
    second_key = emulator.new_key(provider, label="second")
    first = service.set_key(OPERATOR, "ws", provider, first_key, label="first", test=False).key
    second = service.set_key(OPERATOR, "ws", provider, second_key, label="second", test=False).key
    emulator.add_fault(Fault.for_key(FaultKind.RATE_LIMIT, first_key, retry_after=7, times=None))
    environ = {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_ENCRYPTION_KEYS": keyring_value(*keys),
        "BYOK_VALIDATE_KEYS": "0",
        **emulator.environ(),
    }
    try:
        one = _worker(environ, "ws", provider)
        # the first worker met the 429 on the first key, and the second key served it
        assert one["used"] == [first.id, second.id]
        assert one["hints"] == [7.0]
        with app.engine.connect() as conn:
            row = conn.execute(
                sa.select(workspace_keys.c.cooldown_until, workspace_keys.c.cooldown_reason).where(
                    workspace_keys.c.id == first.id
                )
            ).one()
        # the cooldown ends 7 s after the refusal, not after the fixed 30 s
        refused_between = (
            datetime.fromisoformat(one["started"]),
            datetime.fromisoformat(one["ended"]),
        )
        assert refused_between[0] + timedelta(seconds=7) <= row.cooldown_until
        assert row.cooldown_until <= refused_between[1] + timedelta(seconds=7)
        assert row.cooldown_reason == "rate_limit"
        # another worker process skips the cooling key without calling with it
        two = _worker(environ, "ws", provider)
        assert two["pid"] != one["pid"]
        assert two["used"] == [second.id]
        assert two["hints"] == []
        calls = [c for c in emulator.calls(provider) if c.method == "POST"]
        assert [c.key_label for c in calls] == ["first", "second", "second"]
        assert [c.status for c in calls] == [429, 200, 200]
    finally:
        app.close()


def test_a_retry_after_is_bounded_and_absent_means_the_fixed_cooldown(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = make_app(sqlite_url, tmp_path, keys=[master_key()])
    service, pm = service_for(app)
    try:
        stored = [
            service.set_key(OPERATOR, "ws", "openai", k, label=f"k{i}", test=False).key
            for i, k in enumerate(
                ["sk-proj-" + "a" * 40, "sk-proj-" + "b" * 40, "sk-proj-" + "c" * 40]
            )
        ]
        for key, hint in zip(stored, [10 * 86400.0, None, float("nan")], strict=True):
            before = app.clock()
            failure = ProviderFailure(
                FailureReason.RATE_LIMIT, CredentialSource.WORKSPACE, key.id, 429, hint
            )
            request = CredentialRequest("ws", "openai", "gpt-4o", actor=OPERATOR, failure=failure)
            if key is stored[-1]:  # no usable key left, and the fallback policy is never
                with pytest.raises(CredentialUnavailable, match="no other usable"):
                    pm.hook.byok_resolve_credential(request=request)
            else:  # another stored key serves
                assert pm.hook.byok_resolve_credential(request=request).key_id != key.id
            with app.engine.connect() as conn:
                until = conn.execute(
                    sa.select(workspace_keys.c.cooldown_until).where(workspace_keys.c.id == key.id)
                ).scalar_one()
            expected = MAX_COOLDOWN_SECONDS if hint == 10 * 86400.0 else 30.0
            assert before + timedelta(seconds=expected) <= until
            assert until <= app.clock() + timedelta(seconds=expected)
    finally:
        app.close()


class FakeTime:
    """A clock that only moves when resolution sleeps: what it waited is exact, never timed."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self.slept: list[float] = []

    def clock(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)


@pytest.mark.parametrize("max_wait", [10.0, 3.0])
def test_when_every_key_is_cooling_resolution_waits_up_to_its_bound(
    database_url: str, tmp_path: Path, max_wait: float
) -> None:
    app = make_app(database_url, tmp_path, keys=[master_key()])
    service, pm = service_for(app)
    fake = FakeTime()
    resolver = Resolver(
        keys=app.key_access,
        engine=app.engine,
        workspace_settings=app.workspace_settings,
        billing=app.billing,
        platform_keys=app.platform_keys,
        clock=fake.clock,
        cache_seconds=0,
        max_wait_seconds=max_wait,
        sleep=fake.sleep,
        organizations=app.organization_store,
    )
    try:
        a, b = (
            service.set_key(OPERATOR, "ws", "openai", "sk-proj-" + c * 40, label=c, test=False).key
            for c in "ab"
        )
        for key, retry_after in ((a, 8.0), (b, 5.0)):
            failure = ProviderFailure(
                FailureReason.RATE_LIMIT, CredentialSource.WORKSPACE, key.id, 429, retry_after
            )
            with contextlib.suppress(CredentialUnavailable):  # b's refusal leaves no key
                resolver.resolve(
                    CredentialRequest("ws", "openai", "gpt-4o", actor=OPERATOR, failure=failure), pm
                )
        request = CredentialRequest("ws", "openai", "gpt-4o", actor=OPERATOR)
        if max_wait < 5:  # the first key comes back in 5 s: longer than the bound, no wait
            with pytest.raises(CredentialUnavailable, match="cooling down"):
                resolver.resolve(request, pm)
            assert fake.slept == []
            return
        credential = resolver.resolve(request, pm)
        assert credential.key_id == b.id  # the first to come back
        assert fake.slept == [5.0]
        assert credential.waited == 5.0
        # on a host's event loop, resolution never waits
        failure = ProviderFailure(
            FailureReason.RATE_LIMIT, CredentialSource.WORKSPACE, b.id, 429, 5.0
        )
        with contextlib.suppress(CredentialUnavailable):
            resolver.resolve(replace(request, failure=failure), pm)
        with calling_inline(), pytest.raises(CredentialUnavailable, match="cooling down"):
            resolver.resolve(request, pm)
        assert fake.slept == [5.0]
        # a credential that did not wait says 0
        fake.sleep(10)
        assert resolver.resolve(request, pm).waited == 0.0
    finally:
        resolver.close()
        app.close()
