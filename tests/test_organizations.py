"""Organizations: inherited key pools, opt-out, the authorization matrix, and the ledger source.

Every test runs on a real SQLite file and on PostgreSQL (``database_url``), with keys stored
through the real key service and resolution asked through a real plugin manager.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
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
    Usage,
    UsageRecord,
    hookimpl,
)
from keys_support import OPERATOR, leaks, make_app, master_key, random_key, service_for
from migration_support import model_differences

from byok_plugin.app import App
from byok_plugin.core.errors import InvalidInput
from byok_plugin.keys.service import KeyService
from byok_plugin.resolution.organizations import OrganizationNotFound, Organizations, org_owner
from byok_plugin.store import create_store_engine, ensure_migrated
from byok_plugin.store.tables import workspace_keys

ORG = CredentialSource.ORGANIZATION
WORKSPACE = CredentialSource.WORKSPACE
PLATFORM = CredentialSource.PLATFORM


class Audit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def byok_audit(self, event: AuditEvent) -> None:
        self.events.append(event)


@dataclass
class World:
    app: App
    pm: pluggy.PluginManager
    keys: KeyService
    orgs: Organizations
    audit: Audit
    platform: dict[str, list[str]]
    org: str
    ws: str

    def store(self, owner: str, provider: str, label: str = "default") -> tuple[str, str]:
        api_key = random_key(provider)
        result = self.keys.set_key(OPERATOR, owner, provider, api_key, label=label, test=False)
        return result.key.id, api_key

    def resolve(self, provider: str, model: str, **kwargs: Any) -> Credential:
        ws = kwargs.pop("workspace", self.ws)
        return self.pm.hook.byok_resolve_credential(
            request=CredentialRequest(ws, provider, model, **{"actor": OPERATOR, **kwargs})
        )


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    platform = {p: [random_key(p)] for p in ("openai", "anthropic", "exa")}
    env = {f"BYOK_PLATFORM_KEYS_{p.upper()}": ",".join(k) for p, k in platform.items()}
    env["BYOK_KEY_CACHE_SECONDS"] = "0"  # every call reads the store
    app = make_app(database_url, tmp_path, keys=[master_key()], extra=env)
    audit = Audit()
    keys, pm = service_for(app, audit)
    orgs = app.organizations(pm)
    org, ws = f"acme-{secrets.token_hex(3)}", f"ws-{secrets.token_hex(3)}"
    assert orgs.create(OPERATOR, org) is True
    assert orgs.create(OPERATOR, org) is False  # once
    orgs.attach(OPERATOR, org, ws)
    yield World(app, pm, keys, orgs, audit, platform, org, ws)
    app.close()


def test_the_tables_match_their_migration_and_the_ledger_takes_the_new_source(
    database_url: str,
) -> None:
    engine = create_store_engine(database_url)
    mine = {"byok_organizations", "byok_organization_workspaces"}
    try:
        ensure_migrated(engine)
        with engine.connect() as conn:
            assert model_differences(conn, mine) == []
    finally:
        engine.dispose()


# --- inheritance order ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "model"),
    [("openai", "gpt-4o"), ("anthropic", "claude-opus-4-1"), ("exa", "exa-search")],
)
def test_block_then_workspace_then_organization_then_platform(
    world: World, provider: str, model: str
) -> None:
    hosted = world.pm.hook.byok_is_hosted(provider=provider, model=model)
    # nothing stored: the platform for hosted models and tools only
    if hosted:
        assert world.resolve(provider, model).source is PLATFORM
    else:
        with pytest.raises(NoCredential):
            world.resolve(provider, model)
    # the organization's key comes before the platform's, and is BYOK
    org_key_id, org_key = world.store(org_owner(world.org), provider)
    credential = world.resolve(provider, model)
    assert (credential.source, credential.key_id, credential.api_key) == (ORG, org_key_id, org_key)
    assert credential.is_byok
    assert not credential.billed_by_platform
    assert not credential.fallback
    # the workspace's own key comes before the organization's
    ws_key_id, ws_key = world.store(world.ws, provider)
    credential = world.resolve(provider, model)
    assert (credential.source, credential.key_id, credential.api_key) == (
        WORKSPACE,
        ws_key_id,
        ws_key,
    )
    # the block's own key before all
    block_key = random_key(provider)
    credential = world.resolve(provider, model, block_key=block_key, block_id="b1")
    assert credential.source is CredentialSource.BLOCK
    assert credential.api_key == block_key
    # a workspace outside the organization inherits nothing
    outsider = f"ws-{secrets.token_hex(3)}"
    if hosted:
        assert world.resolve(provider, model, workspace=outsider).source is PLATFORM
    else:
        with pytest.raises(NoCredential):
            world.resolve(provider, model, workspace=outsider)


def test_a_workspace_that_opts_out_never_uses_the_pool(world: World) -> None:
    world.store(org_owner(world.org), "openai")
    world.store(org_owner(world.org), "anthropic")
    assert world.resolve("openai", "gpt-4o").source is ORG
    membership = world.orgs.set_opt_out(OPERATOR, world.ws, True)
    assert membership.opted_out
    assert membership.organization_id == world.org
    credential = world.resolve("openai", "gpt-4o")
    assert credential.source is PLATFORM
    assert credential.api_key in world.platform["openai"]
    with pytest.raises(NoCredential):  # not hosted: nothing left
        world.resolve("anthropic", "claude-opus-4-1")
    # listed as inherited but inactive; opting back in restores the pool
    _, inherited = world.orgs.inherited_keys(OPERATOR, world.ws)
    assert {k.key.provider for k in inherited} == {"openai", "anthropic"}
    assert not any(k.active for k in inherited)
    world.orgs.set_opt_out(OPERATOR, world.ws, False)
    assert world.resolve("anthropic", "claude-opus-4-1").source is ORG
    actions = [e.action for e in world.audit.events]
    assert "org.opted_out" in actions
    assert "org.opted_in" in actions


def test_refused_keys_cool_down_then_the_next_tier_serves(world: World) -> None:
    ws_key_id, _ = world.store(world.ws, "anthropic")
    org_a, key_a = world.store(org_owner(world.org), "anthropic", "a")
    org_b, key_b = world.store(org_owner(world.org), "anthropic", "b")
    model = "claude-opus-4-1"
    # the workspace's only key is refused: the organization's pool serves (not a fallback)
    failure = ProviderFailure(FailureReason.RATE_LIMIT, WORKSPACE, ws_key_id, 429)
    credential = world.resolve("anthropic", model, failure=failure)
    assert credential.source is ORG
    assert not credential.fallback
    # an organization key refused: stored cooldown, the other organization key serves
    failure = ProviderFailure(FailureReason.AUTH, ORG, org_a, 401)
    credential = world.resolve("anthropic", model, failure=failure)
    assert (credential.source, credential.key_id, credential.api_key) == (ORG, org_b, key_b)
    with world.app.engine.connect() as conn:
        row = conn.execute(
            sa.select(workspace_keys.c.cooldown_until, workspace_keys.c.cooldown_reason).where(
                workspace_keys.c.id == org_a
            )
        ).one()
    assert row.cooldown_until is not None
    assert row.cooldown_reason == "auth"
    # the last one refused too: the fallback policy (never) decides, naming the key
    failure = ProviderFailure(FailureReason.RATE_LIMIT, ORG, org_b, 429)
    with pytest.raises(CredentialUnavailable) as info:
        world.resolve("anthropic", model, failure=failure)
    assert org_b in str(info.value)
    assert key_a not in str(info.value)
    # every key is cooling now: no call is served by a cooling key
    with pytest.raises(CredentialUnavailable, match="cooling down"):
        world.resolve("anthropic", model)


def test_an_organization_key_a_provider_failed_on_is_not_cooled_down(world: World) -> None:
    """A 5xx or a timeout is not a refusal: under the default policy (never) the organization key
    is not put in cooldown, so the block's own retry may use it again."""
    org_a, key_a = world.store(org_owner(world.org), "anthropic", "a")
    model = "claude-opus-4-1"
    failure = ProviderFailure(FailureReason.ERROR, ORG, org_a, 503)
    with pytest.raises(CredentialUnavailable):  # no other key; the policy does not fall back
        world.resolve("anthropic", model, failure=failure)
    with world.app.engine.connect() as conn:
        until = conn.execute(
            sa.select(workspace_keys.c.cooldown_until).where(workspace_keys.c.id == org_a)
        ).scalar_one()
    assert until is None
    assert world.resolve("anthropic", model).api_key == key_a


def test_a_block_label_may_name_an_organization_key(world: World) -> None:
    org_key_id, org_key = world.store(org_owner(world.org), "openai", "shared")
    ws_key_id, ws_key = world.store(world.ws, "openai", "own")
    credential = world.resolve("openai", "gpt-4o", key_label="shared", block_id="b1")
    assert (credential.source, credential.api_key) == (ORG, org_key)
    credential = world.resolve("openai", "gpt-4o", key_label="own", block_id="b1")
    assert (credential.source, credential.api_key) == (WORKSPACE, ws_key)
    # the workspace's own key with the same label wins
    _, own_shared = world.store(world.ws, "openai", "shared")
    assert world.resolve("openai", "gpt-4o", key_label="shared").api_key == own_shared
    # opted out: the organization's label is not served, nor any other key
    world.orgs.set_opt_out(OPERATOR, world.ws, True)
    world.keys.delete_keys(OPERATOR, world.ws, "openai", label="shared")
    with pytest.raises(CredentialUnavailable, match="labelled 'shared'"):
        world.resolve("openai", "gpt-4o", key_label="shared")
    del org_key_id, ws_key_id


def test_an_organization_pool_is_not_a_workspace(world: World) -> None:
    world.store(org_owner(world.org), "openai")
    with pytest.raises(CredentialUnavailable, match="organization's key pool"):
        world.resolve("openai", "gpt-4o", workspace=org_owner(world.org))
    with pytest.raises(InvalidInput, match="reserved"):
        world.orgs.attach(OPERATOR, world.org, org_owner("other"))
    with pytest.raises(OrganizationNotFound, match="byok org create nope"):
        world.orgs.attach(OPERATOR, "nope", "ws-x")
    with pytest.raises(InvalidInput, match="organization id"):
        world.orgs.create(OPERATOR, "bad id!")


# --- authorization ----------------------------------------------------------------------------


def test_authorization_matrix(world: World) -> None:
    owner = org_owner(world.org)
    org_admin = Actor("olga", roles={owner: "admin"})
    org_member = Actor("otto", roles={owner: "member"})
    other_org_admin = Actor("eve", roles={org_owner("globex"): "admin", "ws-globex": "admin"})
    ws_admin = Actor("wanda", roles={world.ws: "admin"})
    ws_member = Actor("walt", roles={world.ws: "member"})
    anonymous = None

    # organization admins manage the organization's keys
    api_key = random_key("openai")
    stored = world.keys.set_key(org_admin, owner, "openai", api_key, test=False).key
    assert [k.id for k in world.orgs.list_keys(org_admin, world.org)] == [stored.id]
    # its members list them (masked), nobody else manages them
    assert [k.id for k in world.orgs.list_keys(org_member, world.org)] == [stored.id]
    for actor in (org_member, other_org_admin, ws_admin, ws_member, anonymous):
        with pytest.raises(NotAuthorized):
            world.keys.set_key(actor, owner, "openai", random_key("openai"), test=False)
        with pytest.raises(NotAuthorized):
            world.keys.delete_keys(actor, owner, "openai")
        with pytest.raises(NotAuthorized):
            world.keys.test_keys(actor, owner, "openai", key_id=stored.id)
    for actor in (other_org_admin, ws_admin, ws_member, anonymous):
        with pytest.raises(NotAuthorized):
            world.orgs.list_keys(actor, world.org)
    # a workspace's admins and members see what it inherits, masked; outsiders do not
    for actor in (ws_admin, ws_member, OPERATOR):
        membership, inherited = world.orgs.inherited_keys(actor, world.ws)
        assert membership is not None
        assert membership.organization_id == world.org
        assert [(k.key.id, k.key.hint, k.active) for k in inherited] == [
            (stored.id, stored.hint, True)
        ]
    for actor in (org_member, other_org_admin, anonymous):
        with pytest.raises(NotAuthorized):
            world.orgs.inherited_keys(actor, world.ws)
    # attaching a workspace takes an admin of both; opting out, the workspace's admin
    with pytest.raises(NotAuthorized):
        world.orgs.attach(org_admin, world.org, "ws-globex")
    with pytest.raises(NotAuthorized):
        world.orgs.attach(other_org_admin, world.org, "ws-globex")
    for actor in (org_admin, ws_member, anonymous):
        with pytest.raises(NotAuthorized):
            world.orgs.set_opt_out(actor, world.ws, True)
    assert world.orgs.set_opt_out(ws_admin, world.ws, True).opted_out
    denied = [e for e in world.audit.events if e.action == "access.denied"]
    assert denied
    assert all(e.outcome == "denied" for e in denied)
    assert any(e.workspace_id == owner and e.actor_id == "eve" for e in denied)


def test_inherited_keys_are_never_revealed(world: World) -> None:
    owner = org_owner(world.org)
    secrets_ = [world.store(owner, p)[1] for p in ("openai", "anthropic", "exa")]
    _, inherited = world.orgs.inherited_keys(Actor("walt", roles={world.ws: "member"}), world.ws)
    assert len(inherited) == 3
    shown = json.dumps([k.to_dict() for k in inherited]) + repr(inherited)
    assert leaks(shown, secrets_) == []
    assert all(k.to_dict()["inherited"] is True for k in inherited)
    assert all("ciphertext" not in k.to_dict() for k in inherited)
    # the database holds ciphertexts only
    with world.app.engine.connect() as conn:
        dump = "\n".join(str(tuple(r)) for r in conn.execute(sa.select(workspace_keys)).all())
    assert leaks(dump, secrets_) == []


# --- billing and the ledger -------------------------------------------------------------------


def test_an_organization_key_is_charged_nothing_and_recorded_as_such(world: World) -> None:
    world.store(org_owner(world.org), "openai")
    credential = world.resolve("openai", "gpt-4o")
    usage = Usage("openai", "gpt-4o", input_tokens=1000, output_tokens=500)
    charge = world.pm.hook.byok_compute_charge(usage=usage, credential=credential)
    assert charge.amount == Decimal(0)
    assert charge.reason == "byok"
    assert charge.list_cost is not None
    assert charge.list_cost > 0
    record = UsageRecord(
        f"run-{secrets.token_hex(3)}:b1:1",
        world.ws,
        usage,
        charge,
        credential.source,
        key_id=credential.key_id,
        run_id="r1",
    )
    world.pm.hook.byok_record_usage(record=record)
    row = world.app.ledger.get(record.idempotency_key)
    assert row is not None
    assert (row.source, row.key_id, row.amount, row.list_cost) == (
        ORG,
        credential.key_id,
        Decimal(0),
        charge.list_cost,
    )
    assert row.is_byok


def test_with_the_cache_on_an_opt_out_through_this_process_applies_at_once(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = make_app(sqlite_url, tmp_path, keys=[master_key()])  # the 2 s key-list cache
    keys, pm = service_for(app)
    orgs = app.organizations(pm)
    try:
        orgs.create(OPERATOR, "acme")
        orgs.attach(OPERATOR, "acme", "ws")
        keys.set_key(OPERATOR, org_owner("acme"), "anthropic", random_key("anthropic"), test=False)
        request = CredentialRequest("ws", "anthropic", "claude-opus-4-1", actor=OPERATOR)
        assert pm.hook.byok_resolve_credential(request=request).source is ORG
        orgs.set_opt_out(OPERATOR, "ws", True)
        with pytest.raises(NoCredential):
            pm.hook.byok_resolve_credential(request=request)
        orgs.set_opt_out(OPERATOR, "ws", False)
        assert pm.hook.byok_resolve_credential(request=request).source is ORG
    finally:
        app.close()
