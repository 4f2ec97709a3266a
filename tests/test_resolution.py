"""Credential resolution: the precedence table, cooldowns, fallback policies, and the errors.

Everything runs on a real store (a SQLite file; the store-dependent rules on PostgreSQL too), with
keys stored through the real key service, and the hooks called through a real plugin manager.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pluggy
import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    Actor,
    AuditEvent,
    Credential,
    CredentialRequest,
    CredentialSource,
    CredentialUnavailable,
    FailureReason,
    NoCredential,
    NotAuthorized,
    ProviderFailure,
    Role,
    UnpricedModel,
    Usage,
    hookimpl,
)
from keys_support import OPERATOR, keyring_value, make_app, master_key, random_key, service_for

from byok_plugin.app import App
from byok_plugin.core.errors import KeyDecryptionError, StoreUnavailable
from byok_plugin.keys.service import KeyService
from byok_plugin.manager import plugin_manager_for
from byok_plugin.resolution.resolver import KeyListCache
from byok_plugin.resolution.workspace_settings import FallbackPolicy
from byok_plugin.store.keys_repo import StoredKey
from byok_plugin.store.tables import workspace_keys

WORKSPACE = CredentialSource.WORKSPACE
PLATFORM = CredentialSource.PLATFORM
BLOCK = CredentialSource.BLOCK
PROVIDERS = ("openai", "anthropic", "google", "mistral", "exa")


class Audit:
    """Records the audit events that go through the hooks."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def byok_audit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def actions(self) -> list[str]:
        return [e.action for e in self.events]


@dataclass
class World:
    app: App
    pm: pluggy.PluginManager
    service: KeyService
    audit: Audit
    platform: dict[str, list[str]] = field(default_factory=dict)

    def store(self, workspace: str, provider: str, label: str = "default") -> tuple[str, str]:
        """Store a random real-shaped key; returns (key id, key)."""
        api_key = random_key(provider)
        result = self.service.set_key(
            OPERATOR, workspace, provider, api_key, label=label, test=False
        )
        return result.key.id, api_key

    def resolve(self, workspace: str, provider: str, model: str, **kwargs: Any) -> Credential:
        return self.pm.hook.byok_resolve_credential(
            request=CredentialRequest(workspace, provider, model, **{"actor": OPERATOR, **kwargs})
        )


def _world(database_url: str, home: Path, *, platform: bool = True, **extra: str) -> World:
    keys: dict[str, list[str]] = {}
    env = dict(extra)
    if platform:
        for provider in PROVIDERS:
            keys[provider] = [random_key(provider), random_key(provider)]
            env[f"BYOK_PLATFORM_KEYS_{provider.upper()}"] = ",".join(keys[provider])
    app = make_app(database_url, home, keys=[master_key()], extra=env)
    audit = Audit()
    service, pm = service_for(app, audit)
    return World(app, pm, service, audit, keys)


@pytest.fixture
def world(sqlite_url: str, tmp_path: Path) -> World:
    w = _world(sqlite_url, tmp_path)
    yield w
    w.app.close()


@pytest.fixture
def any_world(database_url: str, tmp_path: Path) -> World:
    """A world on SQLite and on PostgreSQL, with the key-list cache off so that every call reads
    the store."""
    w = _world(database_url, tmp_path, BYOK_KEY_CACHE_SECONDS="0")
    yield w
    w.app.close()


# --- the precedence table -------------------------------------------------------------------------

MODELS = [
    # provider, model or tool, hosted by the platform (shipped catalog)
    ("openai", "gpt-4o", True),
    ("openai", "o3", False),
    ("anthropic", "claude-sonnet-4-5", True),
    ("anthropic", "claude-opus-4-1", False),
    ("google", "gemini-2.5-flash", True),
    ("mistral", "magistral-medium-latest", False),
    ("exa", "exa-search", True),
]

# block key given, workspace key stored, platform pool configured -> expected source or error
ROWS = [
    pytest.param(True, True, True, BLOCK, id="block-beats-workspace"),
    pytest.param(True, False, False, BLOCK, id="block-alone"),
    pytest.param(False, True, True, WORKSPACE, id="workspace-beats-platform"),
    pytest.param(False, True, False, WORKSPACE, id="workspace-alone"),
    pytest.param(False, False, True, "platform-if-hosted", id="platform-for-hosted-only"),
    pytest.param(False, False, False, "none", id="nothing-configured"),
]


@pytest.mark.parametrize(("provider", "model", "hosted"), MODELS)
@pytest.mark.parametrize(("block", "stored", "pool", "expected"), ROWS)
def test_precedence_table(
    sqlite_url: str,
    tmp_path: Path,
    provider: str,
    model: str,
    hosted: bool,
    block: bool,
    stored: bool,
    pool: bool,
    expected: object,
) -> None:
    w = _world(sqlite_url, tmp_path, platform=pool)
    ws = f"ws-{secrets.token_hex(3)}"
    block_key = random_key(provider) if block else None
    key_id = api_key = None
    if stored:
        key_id, api_key = w.store(ws, provider)
    request = {"block_key": block_key, "block_id": "b1", "run_id": "r1"}
    try:
        if expected == "platform-if-hosted":
            expected = PLATFORM if hosted else "none"
        if expected == "none":
            with pytest.raises(NoCredential) as info:
                w.resolve(ws, provider, model, **request)
            message = str(info.value)
            assert ws in message
            assert model in message
            # says exactly what to configure
            assert f"byok keys set --workspace {ws} --provider {provider}" in message
            if not hosted:
                assert "does not host" in message
            else:
                assert f"BYOK_PLATFORM_KEYS_{provider.upper()}" in message
            return
        credential = w.resolve(ws, provider, model, **request)
        assert credential.source is expected
        assert credential.provider == provider
        assert not credential.fallback
        if expected is BLOCK:
            assert credential.api_key == block_key
            assert credential.key_id == "block:b1"
            assert not credential.is_byok
            assert not credential.billed_by_platform
        elif expected is WORKSPACE:
            assert credential.api_key == api_key
            assert credential.key_id == key_id
            assert credential.is_byok
            assert credential.hint == f"{api_key[:6]}...{api_key[-4:]}" or "..." in credential.hint
        else:
            assert credential.api_key in w.platform[provider]
            assert credential.billed_by_platform
            assert credential.key_id.startswith(f"env:BYOK_PLATFORM_KEYS_{provider.upper()}[")
        # streamed or not, the same rule
        again = w.resolve(ws, provider, model, stream=True, **request)
        assert again.source is credential.source
    finally:
        w.app.close()


# --- workspace keys: round-robin, disabled, cooldown, cache ---------------------------------------


def test_hook_byok_resolve_credential_round_robin_skips_disabled_keys(any_world: World) -> None:
    w = any_world
    ids = [w.store("acme", "anthropic", label=f"k{i}")[0] for i in range(3)]
    served = [w.resolve("acme", "anthropic", "claude-haiku-4-5").key_id for _ in range(6)]
    assert sorted(served) == sorted(ids * 2)
    assert served[:3] != served[3:] or len(set(served[:3])) == 3  # each once per round
    assert len(set(served[:3])) == 3

    w.service.disable(OPERATOR, "acme", "anthropic", key_id=ids[1])
    served = {w.resolve("acme", "anthropic", "claude-haiku-4-5").key_id for _ in range(6)}
    assert served == {ids[0], ids[2]}

    # every key disabled: as if the workspace had none (the platform serves hosted models)
    w.service.disable(OPERATOR, "acme", "anthropic")
    assert w.resolve("acme", "anthropic", "claude-haiku-4-5").source is PLATFORM
    with pytest.raises(NoCredential):
        w.resolve("acme", "anthropic", "claude-opus-4-1")  # not hosted


def test_key_changes_through_the_hooks_reach_a_cached_resolver(world: World) -> None:
    w = world
    assert w.app.settings.key_cache_seconds == 2.0
    key_id, _ = w.store("acme", "openai")
    assert w.resolve("acme", "openai", "gpt-4o").key_id == key_id  # cached now
    w.service.delete_keys(OPERATOR, "acme", "openai", key_id=key_id)
    assert w.resolve("acme", "openai", "gpt-4o").source is PLATFORM  # not the deleted key
    new_id, new_key = w.store("acme", "openai", label="second")
    credential = w.resolve("acme", "openai", "gpt-4o")
    assert (credential.key_id, credential.api_key) == (new_id, new_key)


def test_cooldown_is_shared_by_workers_through_the_store(database_url: str, tmp_path: Path) -> None:
    # two workers (two apps, two resolvers, two plugin managers) on one database
    a = _world(database_url, tmp_path / "a", BYOK_KEY_CACHE_SECONDS="0")
    b_app = App(a.app.settings)
    b_audit = Audit()
    _, b_pm = service_for(b_app, b_audit)
    try:
        first, _ = a.store("acme", "mistral", label="first")
        second, _ = a.store("acme", "mistral", label="second")
        failure = ProviderFailure(FailureReason.RATE_LIMIT, WORKSPACE, key_id=first, status=429)
        retry = a.resolve("acme", "mistral", "mistral-small-latest", failure=failure)
        assert retry.key_id == second
        assert not retry.fallback
        # the other worker now skips the key in cooldown, every time
        for _ in range(4):
            credential = b_pm.hook.byok_resolve_credential(
                request=CredentialRequest("acme", "mistral", "mistral-small-latest", actor=OPERATOR)
            )
            assert credential.key_id == second
        with a.app.engine.connect() as conn:
            until = conn.execute(
                sa.select(workspace_keys.c.cooldown_until).where(workspace_keys.c.id == first)
            ).scalar_one()
        assert until is not None
        assert "key.cooldown" in a.audit.actions()
    finally:
        a.app.close()
        b_app.close()


@pytest.mark.parametrize(
    ("reason", "status", "served"),
    [(FailureReason.RATE_LIMIT, 429, True), (FailureReason.AUTH, 401, False)],
    ids=["rate_limit", "auth"],
)
def test_every_worker_applies_the_fallback_policy_to_the_stored_cooldown_reason(
    database_url: str, tmp_path: Path, reason: FailureReason, status: int, served: bool
) -> None:
    """Under ``on_rate_limit``, the worker that saw the 429 and a worker that did not both fall
    back to the platform key; after a 401 neither does."""
    a = _world(database_url, tmp_path / "a", BYOK_KEY_CACHE_SECONDS="0")
    b_app = App(a.app.settings)
    _, b_pm = service_for(b_app, Audit())
    try:
        a.app.workspace_settings.set_fallback_policy("acme", "on_rate_limit", actor_id="admin")
        key_id, _ = a.store("acme", "openai")
        failure = ProviderFailure(reason, WORKSPACE, key_id=key_id, status=status)
        stored = b_app.key_access.enabled_keys("acme", "openai")
        assert [(k.id, k.cooldown_reason) for k in stored] == [(key_id, None)]

        def resolve_in_a() -> Credential:
            return a.resolve("acme", "openai", "gpt-4o", failure=failure)

        def resolve_in_b() -> Credential:
            return b_pm.hook.byok_resolve_credential(
                request=CredentialRequest("acme", "openai", "gpt-4o", actor=OPERATOR)
            )

        if not served:
            with pytest.raises(CredentialUnavailable):
                resolve_in_a()
        else:
            assert resolve_in_a().fallback
        # the reason is stored with the cooldown (the SQLite fast reader included)
        (cooling,) = b_app.resolver.enabled_keys("acme", "openai")
        assert cooling.cooldown_reason == reason.value
        assert cooling.cooldown_until is not None
        for resolve in (resolve_in_b, lambda: a.resolve("acme", "openai", "gpt-4o")):
            if served:
                credential = resolve()
                assert (credential.source, credential.fallback) == (PLATFORM, True)
            else:
                with pytest.raises(CredentialUnavailable, match="cooling down"):
                    resolve()
        # ending the cooldown forgets its reason
        b_app.key_access.end_cooldown(key_id)
        (ended,) = b_app.key_access.enabled_keys("acme", "openai")
        assert (ended.cooldown_until, ended.cooldown_reason) == (None, None)
    finally:
        a.app.close()
        b_app.close()


def test_a_failure_naming_another_workspaces_key_cools_nothing(world: World) -> None:
    w = world
    victim, _ = w.store("victim", "openai")
    mine, _ = w.store("mine", "openai")
    failure = ProviderFailure(FailureReason.AUTH, WORKSPACE, key_id=victim, status=401)
    # the named key is not one of this workspace's: nothing is cooled, its own key serves
    assert w.resolve("mine", "openai", "gpt-4o", failure=failure).key_id == mine
    assert "key.cooldown" not in w.audit.actions()
    assert w.resolve("victim", "openai", "gpt-4o").key_id == victim  # untouched


def test_key_list_cache_expires_and_is_bounded() -> None:
    now = [100.0]
    cache = KeyListCache(2.0, max_entries=3, clock=lambda: now[0])
    cache.put("w1", "openai", ())
    assert cache.get("w1", "openai") == ()
    now[0] += 2.01
    assert cache.get("w1", "openai") is None
    for i in range(5):
        cache.put(f"w{i}", "openai", ())
    assert len(cache) == 3
    assert cache.get("w0", "openai") is None  # the oldest went first
    assert cache.get("w4", "openai") == ()
    cache.invalidate("w4")
    assert cache.get("w4", "openai") is None
    assert KeyListCache(0).get("w", "p") is None  # off


def _stored(key_id: str, ciphertext: str, workspace_id: str = "w1") -> StoredKey:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return StoredKey(
        id=key_id,
        workspace_id=workspace_id,
        provider="openai",
        label="",
        hint="sk-...abcd",
        fingerprint="f",
        status="enabled",
        master_key_id="m1",
        created_by=None,
        created_at=at,
        updated_by=None,
        updated_at=at,
        last_used_at=None,
        cooldown_until=None,
        ciphertext=ciphertext,
    )


def test_key_list_cache_keeps_decrypted_credentials_only_as_long_as_their_list() -> None:
    now = [100.0]
    revealed: list[str] = []

    def reveal(key: StoredKey) -> Credential:
        revealed.append(key.id)
        return Credential(f"sk-plain-{key.ciphertext}", "openai", CredentialSource.WORKSPACE)

    cache = KeyListCache(2.0, clock=lambda: now[0])
    first, second = _stored("k1", "c1"), _stored("k2", "c2")
    cache.put("w1", "openai", (first, second))
    assert cache.credential(first, reveal).api_key == "sk-plain-c1"
    assert cache.credential(first, reveal) is cache.credential(first, reveal)
    assert cache.credential(second, reveal).api_key == "sk-plain-c2"
    assert revealed == ["k1", "k2"]  # each decrypted once while its list is cached
    # a key read since (replaced: same id, new ciphertext) is not in the cached list: decrypted
    replaced = _stored("k1", "c1-new")
    assert cache.credential(replaced, reveal).api_key == "sk-plain-c1-new"
    assert revealed == ["k1", "k2", "k1"]
    # the credentials go with their list: invalidated, expired
    cache.invalidate("w1", "openai")
    cache.put("w1", "openai", (first,))
    cache.credential(first, reveal)
    assert revealed == ["k1", "k2", "k1", "k1"]
    now[0] += 2.01
    cache.credential(first, reveal)
    assert revealed == ["k1", "k2", "k1", "k1", "k1"]
    assert cache.credentials_held == 0  # its list had expired: nothing kept
    # an entry nobody reads again goes at the next use of the cache, with its plaintext
    idle = _stored("k9", "c9", workspace_id="w2")
    cache.put("w2", "openai", (idle,))
    cache.credential(idle, reveal)
    assert cache.credentials_held == 1
    now[0] += 2.01
    assert cache.credentials_held == 1
    cache.get("w3", "openai")  # any read drops what has expired
    assert cache.credentials_held == 0
    assert len(cache) == 0
    cache.put("w1", "openai", (first,))
    cache.credential(first, reveal)
    cache.clear()
    assert cache.credentials_held == 0
    # with the cache off nothing is kept
    off = KeyListCache(0)
    off.put("w1", "openai", (first,))
    off.credential(first, reveal)
    off.credential(first, reveal)
    assert len(revealed) == 9
    assert off.credentials_held == 0


# --- errors are errors, never a platform fallback ---------------------------------------------------


def test_decryption_failure_is_an_error_not_a_fallback(database_url: str, tmp_path: Path) -> None:
    w = _world(database_url, tmp_path, BYOK_KEY_CACHE_SECONDS="0")
    key_id, _ = w.store("acme", "openai")
    w.app.workspace_settings.set_fallback_policy("acme", "on_error", actor_id="test")
    # the same database read by a worker holding another master key
    other = App(
        type(w.app.settings).from_environ(
            {**w.app.settings.environ, "BYOK_ENCRYPTION_KEYS": keyring_value(master_key("k2"))}
        )
    )
    _, other_pm = service_for(other)
    try:
        with pytest.raises(KeyDecryptionError) as info:
            other_pm.hook.byok_resolve_credential(
                request=CredentialRequest("acme", "openai", "gpt-4o", actor=OPERATOR)
            )
        assert isinstance(info.value, CredentialUnavailable)
        assert key_id in str(info.value)
        assert "acme" in str(info.value)
        # a tampered ciphertext in the right worker: an error too, even with fallback on_error
        with w.app.engine.begin() as conn:
            stored = conn.execute(
                sa.select(workspace_keys.c.ciphertext).where(workspace_keys.c.id == key_id)
            ).scalar_one()
            flipped = stored[:-6] + ("A" if stored[-6] != "A" else "B") + stored[-5:]
            conn.execute(
                sa.update(workspace_keys)
                .where(workspace_keys.c.id == key_id)
                .values(ciphertext=flipped)
            )
        with pytest.raises(CredentialUnavailable, match=key_id):
            w.resolve("acme", "openai", "gpt-4o")
    finally:
        other.close()
        w.app.close()


def test_a_store_that_does_not_answer_is_an_error(sqlite_url: str, tmp_path: Path) -> None:
    w = _world(sqlite_url, tmp_path, BYOK_KEY_CACHE_SECONDS="0")
    try:
        w.store("acme", "openai")
        with w.app.engine.begin() as conn:  # the table vanishes under the running worker
            conn.execute(sa.text("ALTER TABLE byok_workspace_keys RENAME TO gone"))
        with pytest.raises(StoreUnavailable) as info:
            w.resolve("acme", "openai", "gpt-4o")  # hosted, platform keys configured: no matter
        assert isinstance(info.value, CredentialUnavailable)
    finally:
        w.app.close()


def test_unreachable_database_is_an_error(tmp_path: Path) -> None:
    app = make_app(
        "postgresql+psycopg://nobody:x@127.0.0.1:9/none",
        tmp_path,
        keys=[master_key()],
        extra={"BYOK_PLATFORM_KEYS_OPENAI": random_key("openai")},
    )
    pm = plugin_manager_for(app, load_entrypoints=False)
    with pytest.raises(StoreUnavailable) as info:  # not the platform key
        pm.hook.byok_resolve_credential(
            request=CredentialRequest("acme", "openai", "gpt-4o", actor=OPERATOR)
        )
    assert isinstance(info.value, CredentialUnavailable)


def test_unpriced_platform_call_is_refused_before_the_call(sqlite_url: str, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"models": {"gpt-next": {"provider": "openai", "hosted": True}}}))
    w = _world(sqlite_url, tmp_path, BYOK_CATALOG_FILE=str(catalog))
    try:
        with pytest.raises(UnpricedModel, match="gpt-next"):
            w.resolve("acme", "openai", "gpt-next")
        # the workspace's own key needs no price: the workspace pays the provider
        key_id, _ = w.store("acme", "openai")
        assert w.resolve("acme", "openai", "gpt-next").key_id == key_id
    finally:
        w.app.close()
    allowed = _world(
        sqlite_url.replace(".db", "2.db"),
        tmp_path,
        BYOK_CATALOG_FILE=str(catalog),
        BYOK_ALLOW_UNPRICED="1",
    )
    try:
        assert allowed.resolve("acme", "openai", "gpt-next").source is PLATFORM
    finally:
        allowed.app.close()


# --- fallback policies ----------------------------------------------------------------------------

POLICY_CASES = [
    (FallbackPolicy.NEVER, FailureReason.RATE_LIMIT, False),
    (FallbackPolicy.NEVER, FailureReason.AUTH, False),
    (FallbackPolicy.NEVER, FailureReason.ERROR, False),
    (FallbackPolicy.ON_RATE_LIMIT, FailureReason.RATE_LIMIT, True),
    (FallbackPolicy.ON_RATE_LIMIT, FailureReason.AUTH, False),
    (FallbackPolicy.ON_RATE_LIMIT, FailureReason.ERROR, False),
    (FallbackPolicy.ON_ERROR, FailureReason.RATE_LIMIT, True),
    (FallbackPolicy.ON_ERROR, FailureReason.AUTH, True),
    (FallbackPolicy.ON_ERROR, FailureReason.ERROR, True),
]


@pytest.mark.parametrize(("policy", "reason", "falls_back"), POLICY_CASES)
def test_fallback_policy(
    sqlite_url: str, tmp_path: Path, policy: FallbackPolicy, reason: FailureReason, falls_back: bool
) -> None:
    w = _world(sqlite_url, tmp_path)
    try:
        key_id, _ = w.store("acme", "openai")
        if policy is not FallbackPolicy.NEVER:
            w.app.workspace_settings.set_fallback_policy("acme", policy, actor_id="admin")
        status = {FailureReason.RATE_LIMIT: 429, FailureReason.AUTH: 401}.get(reason, 500)
        failure = ProviderFailure(reason, WORKSPACE, key_id=key_id, status=status)
        if falls_back:
            credential = w.resolve("acme", "openai", "gpt-4o", failure=failure, run_id="r9")
            assert credential.source is PLATFORM
            assert credential.fallback
            assert credential.api_key in w.platform["openai"]
            event = next(e for e in w.audit.events if e.action == "fallback.used")
            assert event.key_id == key_id
            assert reason.value in event.detail
            assert policy.value in event.detail
            # until the cooldown ends, the platform keeps serving, still as a fallback
            later = w.resolve("acme", "openai", "gpt-4o")
            assert later.source is PLATFORM
            assert later.fallback
        else:
            with pytest.raises(CredentialUnavailable) as info:
                w.resolve("acme", "openai", "gpt-4o", failure=failure)
            message = str(info.value)
            assert key_id in message
            assert f"'{policy.value}'" in message
            assert f"HTTP {status}" in message
            assert "byok fallback set --workspace acme" in message
            assert "fallback.used" not in w.audit.actions()
            if reason is FailureReason.ERROR:
                # a 5xx is not a refusal: no cooldown, the block's retry may use the key again
                assert "refused" not in message
                assert "not a refusal" in message
                assert w.resolve("acme", "openai", "gpt-4o").key_id == key_id
                assert "key.cooldown" not in w.audit.actions()
                return
            # and while the key cools down, plain requests fail the same way
            with pytest.raises(CredentialUnavailable, match="cooling down"):
                w.resolve("acme", "openai", "gpt-4o")
        assert "key.cooldown" in w.audit.actions()
    finally:
        w.app.close()


def test_fallback_policy_is_stored_per_workspace(database_url: str, tmp_path: Path) -> None:
    w = _world(database_url, tmp_path)
    try:
        store = w.app.workspace_settings
        assert store.fallback_policy("acme") is FallbackPolicy.NEVER
        store.set_fallback_policy("acme", "on-rate-limit", actor_id="admin")
        store.set_fallback_policy("other", FallbackPolicy.ON_ERROR, actor_id="admin")
        assert store.fallback_policy("acme") is FallbackPolicy.ON_RATE_LIMIT
        store.set_fallback_policy("acme", "on_error", actor_id="admin2")
        settings = store.get("acme")
        assert settings.fallback_policy is FallbackPolicy.ON_ERROR
        assert settings.updated_by == "admin2"
        assert store.fallback_policy("other") is FallbackPolicy.ON_ERROR
        with pytest.raises(ValueError, match="never, on_rate_limit, on_error"):
            store.set_fallback_policy("acme", "sometimes", actor_id="admin")
    finally:
        w.app.close()


def test_fallback_to_an_unhosted_model_is_no_credential(world: World) -> None:
    w = world
    key_id, _ = w.store("acme", "openai")
    w.app.workspace_settings.set_fallback_policy("acme", "on_error", actor_id="admin")
    failure = ProviderFailure(FailureReason.RATE_LIMIT, WORKSPACE, key_id=key_id, status=429)
    with pytest.raises(NoCredential, match="does not host"):
        w.resolve("acme", "openai", "o3", failure=failure)


def test_a_block_key_is_never_replaced(world: World) -> None:
    w = world
    w.store("acme", "openai")
    w.app.workspace_settings.set_fallback_policy("acme", "on_error", actor_id="admin")
    failure = ProviderFailure(FailureReason.AUTH, BLOCK, key_id="block:b1", status=401)
    with pytest.raises(CredentialUnavailable, match="never replaced"):
        w.resolve(
            "acme",
            "openai",
            "gpt-4o",
            block_key=random_key("openai"),
            block_id="b1",
            failure=failure,
        )


def test_a_failed_platform_key_cools_down_and_the_next_serves(world: World) -> None:
    w = world
    first = w.resolve("acme", "google", "gemini-2.5-flash")
    failure = ProviderFailure(FailureReason.RATE_LIMIT, PLATFORM, key_id=first.key_id, status=429)
    second = w.resolve("acme", "google", "gemini-2.5-flash", failure=failure)
    assert second.key_id != first.key_id
    assert all(
        w.resolve("acme", "google", "gemini-2.5-flash").key_id == second.key_id for _ in range(3)
    )
    with pytest.raises(CredentialUnavailable, match="all 2 platform google keys are cooling down"):
        w.resolve(
            "acme",
            "google",
            "gemini-2.5-flash",
            failure=ProviderFailure(FailureReason.RATE_LIMIT, PLATFORM, key_id=second.key_id),
        )


# --- plugins, authorization, secrets --------------------------------------------------------------


class Overrides:
    """A plugin that decides hosting and hands out its own platform key."""

    def __init__(self, key: str) -> None:
        self.key = key

    @hookimpl
    def byok_is_hosted(self, provider: str, model: str) -> bool | None:
        if model == "gpt-4o":
            return False  # this platform stopped hosting gpt-4o
        if model == "o3":
            return True  # and hosts o3
        return None

    @hookimpl
    def byok_platform_key(self, provider: str, model: str) -> str | None:
        return self.key if provider == "openai" else None


def test_resolution_asks_the_hosting_and_platform_key_hooks(world: World) -> None:
    w = world
    plugin_key = random_key("openai")
    w.pm.register(Overrides(plugin_key))
    with pytest.raises(NoCredential, match="does not host openai model 'gpt-4o'"):
        w.resolve("acme", "openai", "gpt-4o")
    credential = w.resolve("acme", "openai", "o3")
    assert credential.source is PLATFORM
    assert credential.api_key == plugin_key
    assert credential.key_id is not None
    assert credential.key_id.startswith("platform:")
    assert plugin_key not in credential.key_id


def test_an_actor_must_be_allowed_to_use_the_workspace_keys(world: World) -> None:
    w = world
    key_id, _ = w.store("acme", "openai")
    member = Actor("ann", roles={"acme": Role.MEMBER})
    assert w.resolve("acme", "openai", "gpt-4o", actor=member).key_id == key_id
    stranger = Actor("eve", roles={"other": Role.ADMIN})
    with pytest.raises(NotAuthorized, match="eve"):
        w.resolve("acme", "openai", "gpt-4o", actor=stranger)
    denied = [e for e in w.audit.events if e.action == "access.denied"]
    assert denied
    assert denied[-1].actor_id == "eve"
    assert denied[-1].outcome == "denied"


def test_keys_never_leak_into_reprs_errors_or_logs(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    w = world
    secrets_ = []
    with caplog.at_level(logging.DEBUG):
        key_id, stored = w.store("acme", "openai")
        secrets_.append(stored)
        block = random_key("anthropic")
        secrets_.append(block)
        seen = [
            w.resolve("acme", "openai", "gpt-4o"),
            w.resolve("acme", "anthropic", "claude-haiku-4-5", block_key=block, block_id="b"),
            w.resolve("acme", "google", "gemini-2.5-pro"),
        ]
        failure = ProviderFailure(FailureReason.AUTH, WORKSPACE, key_id=key_id, status=401)
        with pytest.raises(CredentialUnavailable) as info:
            w.resolve("acme", "openai", "gpt-4o", failure=failure)
    secrets_ += [c.api_key for c in seen]
    texts = [caplog.text, str(info.value), *map(repr, seen), *(repr(e) for e in w.audit.events)]
    request = CredentialRequest("acme", "openai", "gpt-4o", block_key=block, actor=OPERATOR)
    texts.append(repr(request))
    for text in texts:
        for secret in secrets_:
            assert secret not in text
            assert secret[6:-4] not in text  # not even the middle of it


def test_last_used_times_are_written_in_a_batch(world: World) -> None:
    w = world
    key_id, _ = w.store("acme", "exa")
    w.resolve("acme", "exa", "exa-search")
    assert w.app.resolver.flush_last_used() == 1
    with w.app.engine.connect() as conn:
        used = conn.execute(
            sa.select(workspace_keys.c.last_used_at).where(workspace_keys.c.id == key_id)
        ).scalar_one()
    assert used is not None
    assert abs((datetime.now(UTC) - used).total_seconds()) < 60
    assert w.app.resolver.flush_last_used() == 0  # nothing pending


@pytest.mark.parametrize("via_add_to", [True, False], ids=["add_to", "bare_hookspecs"])
def test_a_default_plugin_registered_by_the_host_is_bound_or_says_it_is_not(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, via_add_to: bool
) -> None:
    """A host that registers DefaultPlugin itself after add_to() gets it bound through the
    historic byok_manager_ready; one that adds the specs by hand gets a warning and the
    plugin's own defaults."""
    from byok_hookspecs import PROJECT_NAME, add_to, hookspecs

    from byok_plugin.defaults import DefaultPlugin

    platform_key = random_key("openai")
    app = make_app(
        sqlite_url, tmp_path, keys=[master_key()], extra={"OPENAI_API_KEY_1": platform_key}
    )
    pm = pluggy.PluginManager(PROJECT_NAME)
    if via_add_to:
        add_to(pm, load_entrypoints=False)
    else:
        pm.add_hookspecs(hookspecs)
    pm.register(DefaultPlugin(app))
    try:
        with caplog.at_level(logging.WARNING, logger="byok.audit"):
            credential = pm.hook.byok_resolve_credential(
                request=CredentialRequest("acme", "openai", "gpt-4.1", actor=OPERATOR)
            )
        assert credential.api_key == platform_key
        assert credential.key_id == "env:OPENAI_API_KEY_1"
        assert ("not bound to its plugin manager" in caplog.text) is not via_add_to
    finally:
        app.close()


# --- a block that names a stored key by label -----------------------------------------------------


def test_a_label_selects_that_stored_key_as_byok(any_world: World) -> None:
    w = any_world
    w.store("acme", "anthropic")  # the workspace's default key
    key_id, api_key = w.store("acme", "anthropic", label="localization")
    w.store("other", "anthropic", label="localization")  # another workspace's: never served
    for _ in range(3):  # not round-robin: always the named key
        credential = w.resolve(
            "acme", "anthropic", "claude-sonnet-4-5", key_label="localization", block_id="t"
        )
        assert (credential.source, credential.key_id, credential.api_key) == (
            WORKSPACE,
            key_id,
            api_key,
        )
        assert credential.is_byok
        assert not credential.fallback
    charge = w.pm.hook.byok_compute_charge(
        usage=Usage("anthropic", "claude-sonnet-4-5", input_tokens=1000, output_tokens=100),
        credential=credential,
    )
    assert charge.amount == 0
    assert charge.reason == "byok"
    assert charge.list_cost is not None
    assert charge.list_cost > 0


@pytest.mark.parametrize("policy", ["never", "on_error"])
def test_a_missing_or_disabled_label_fails_and_never_falls_back(
    any_world: World, policy: str
) -> None:
    w = any_world
    w.store("acme", "anthropic")  # another enabled key, and a platform pool: neither may serve
    w.app.workspace_settings.set_fallback_policy("acme", policy, actor_id="admin")
    with pytest.raises(CredentialUnavailable) as missing:
        w.resolve("acme", "anthropic", "claude-sonnet-4-5", key_label="localization", block_id="t")
    message = str(missing.value)
    assert "block t asks for the anthropic key labelled 'localization'" in message
    assert "does not exist" in message
    assert "the platform key is not used" in message
    assert "byok keys set --workspace acme --provider anthropic --label localization" in message
    w.store("acme", "anthropic", label="localization")
    w.service.disable(OPERATOR, "acme", "anthropic", label="localization")
    w.app.resolver.key_changed("acme", "anthropic")
    with pytest.raises(CredentialUnavailable) as disabled:
        w.resolve("acme", "anthropic", "claude-sonnet-4-5", key_label="localization")
    assert "is disabled" in str(disabled.value)
    assert "byok keys enable --workspace acme --provider anthropic --label localization" in str(
        disabled.value
    )


def test_a_refused_labelled_key_cools_down_audited_and_is_never_replaced(any_world: World) -> None:
    w = any_world
    w.store("acme", "openai")
    key_id, _ = w.store("acme", "openai", label="team")
    w.app.workspace_settings.set_fallback_policy("acme", "on_error", actor_id="admin")
    failure = ProviderFailure(FailureReason.RATE_LIMIT, WORKSPACE, key_id=key_id, status=429)
    with pytest.raises(CredentialUnavailable, match="never served by another"):
        w.resolve("acme", "openai", "gpt-4o", key_label="team", failure=failure, block_id="b")
    cooled = [e for e in w.audit.events if e.action == "key.cooldown"]
    assert [(e.key_id, e.workspace_id) for e in cooled] == [(key_id, "acme")]
    stored = w.app.key_access.enabled_keys("acme", "openai")
    assert next(k for k in stored if k.id == key_id).cooldown_reason == "rate_limit"
    with pytest.raises(CredentialUnavailable, match="is cooling down"):
        w.resolve("acme", "openai", "gpt-4o", key_label="team")
    # unlabelled blocks still have the workspace's other key
    assert w.resolve("acme", "openai", "gpt-4o").key_id != key_id


def test_a_labelled_key_needs_the_same_authorization(world: World) -> None:
    w = world
    key_id, _ = w.store("acme", "openai", label="team")
    member = Actor("ann", roles={"acme": Role.MEMBER})
    assert w.resolve("acme", "openai", "gpt-4o", key_label="team", actor=member).key_id == key_id
    stranger = Actor("eve", roles={"other": Role.ADMIN})
    with pytest.raises(NotAuthorized, match="eve"):
        w.resolve("acme", "openai", "gpt-4o", key_label="team", actor=stranger)


def test_a_platform_key_given_as_a_block_key_is_refused(world: World) -> None:
    w = world
    platform_key = w.platform["openai"][1]
    with pytest.raises(CredentialUnavailable, match="is one of the platform's keys") as info:
        w.resolve("acme", "openai", "gpt-4o", block_key=platform_key, block_id="b")
    assert platform_key not in str(info.value)


def test_a_block_key_of_a_long_block_id_is_referenced_within_the_ledger_and_audit(
    any_world: World,
) -> None:
    # a host's block ids may be long (the reference runner's are at most 64 characters): its
    # block key's reference must still fit the ledger's key_id (120) and the audit's (80)
    from byok_hookspecs import Charge, Usage, UsageRecord

    w = any_world
    block = random_key("openai")
    long_id = "pipeline/" + "stage-" * 24 + "summarise"
    credential = w.resolve("acme", "openai", "gpt-4o", block_key=block, block_id=long_id)
    assert credential.key_id is not None
    assert credential.key_id.startswith("block:")
    assert len(credential.key_id) <= 80
    other = w.resolve("acme", "openai", "gpt-4o", block_key=block, block_id=long_id + "-2")
    assert other.key_id != credential.key_id
    short = w.resolve("acme", "openai", "gpt-4o", block_key=block, block_id="b1")
    assert short.key_id == "block:b1"
    w.pm.hook.byok_record_usage(
        record=UsageRecord(
            idempotency_key="run-long:block:1",
            workspace_id="acme",
            usage=Usage("openai", "gpt-4o", input_tokens=10, output_tokens=5),
            charge=Charge(amount=Decimal(0), reason="block_key"),
            source=credential.source,
            key_id=credential.key_id,
            block_id=long_id[:200],
        )
    )
    row = w.app.ledger.get("run-long:block:1")
    assert row is not None
    assert row.key_id == credential.key_id
