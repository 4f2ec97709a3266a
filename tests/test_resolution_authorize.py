"""Resolution asks ``byok_authorize`` for every request, an absent actor included; a block naming
its key by label is never served by the organization's key while the workspace has a key of its
own with that label (disabled or cooling down).

A real SQLite file and a real PostgreSQL database (``database_url``), keys stored through the
real key service, resolution asked through a real plugin manager; the runner's tests call the
provider emulator over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
import pytest
from byok_hookspecs import (
    Action,
    Actor,
    AuditEvent,
    Credential,
    CredentialRequest,
    CredentialSource,
    CredentialUnavailable,
    FailureReason,
    NotAuthorized,
    ProviderFailure,
    Role,
    hookimpl,
)
from keys_support import OPERATOR, make_app, master_key, random_key, service_for
from test_resolution_from_memory import statements

from byok_plugin.app import App
from byok_plugin.cli.demo import DemoStack
from byok_plugin.cli.run import run_workflow
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.run_result import BlockStatus, RunResult
from byok_plugin.host.workflow import parse_workflow
from byok_plugin.keys.service import KeyService
from byok_plugin.resolution.organizations import Organizations, org_owner

WS = "acme"


class Audit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def byok_audit(self, event: AuditEvent) -> None:
        self.events.append(event)


class HostRuns:
    """A host's plugin that authorizes its own runs (no actor) to use keys, and nothing else."""

    def __init__(self) -> None:
        self.asked: list[tuple[Actor | None, str, Action]] = []

    @hookimpl
    def byok_authorize(self, actor: Actor | None, workspace_id: str, action: Action) -> bool | None:
        self.asked.append((actor, workspace_id, action))
        return True if actor is None and action is Action.USE_KEYS else None


@dataclass
class World:
    app: App
    pm: pluggy.PluginManager
    keys: KeyService
    orgs: Organizations
    audit: Audit
    org: str

    def store(self, owner: str, provider: str, label: str = "default") -> str:
        return self.keys.set_key(
            OPERATOR, owner, provider, random_key(provider), label=label, test=False
        ).key.id

    def resolve(self, provider: str, model: str, **kwargs: Any) -> Credential:
        return self.pm.hook.byok_resolve_credential(
            request=CredentialRequest(kwargs.pop("workspace", WS), provider, model, **kwargs)
        )


def _world(database_url: str, home: Path, cache_seconds: str) -> Iterator[World]:
    env = {
        "BYOK_PLATFORM_KEYS_OPENAI": random_key("openai"),
        "BYOK_KEY_CACHE_SECONDS": cache_seconds,
    }
    app = make_app(database_url, home, keys=[master_key()], extra=env)
    audit = Audit()
    keys, pm = service_for(app, audit)
    orgs = app.organizations(pm)
    org = f"org-{secrets.token_hex(3)}"
    orgs.create(OPERATOR, org)
    orgs.attach(OPERATOR, org, WS)
    yield World(app, pm, keys, orgs, audit, org)
    app.close()


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    yield from _world(database_url, tmp_path, "0")  # every resolution reads the store


@pytest.fixture
def cached_world(database_url: str, tmp_path: Path) -> Iterator[World]:
    yield from _world(database_url, tmp_path, "60")  # lists kept: only key changes drop them


MEMBER = Actor("alice", roles={WS: Role.MEMBER})
OUTSIDER = Actor("mallory", roles={"other-ws": Role.ADMIN})

# --- byok_authorize, asked for every request ---------------------------------------------------


@pytest.mark.parametrize("served_by", ["workspace", "organization", "platform", "block", "label"])
def test_a_request_without_an_actor_is_refused_whichever_key_would_serve_it(
    world: World, served_by: str
) -> None:
    request: dict[str, Any] = {}
    if served_by == "workspace":
        world.store(WS, "openai")
    elif served_by == "organization":
        world.store(org_owner(world.org), "openai")
    elif served_by == "block":
        request["block_key"] = random_key("openai")
    elif served_by == "label":
        world.store(WS, "openai", label="team")
        request["key_label"] = "team"
    # platform: the workspace has no key, the platform's serves a hosted model
    expected = CredentialSource.WORKSPACE if served_by == "label" else CredentialSource(served_by)

    with pytest.raises(NotAuthorized) as refused:
        world.resolve("openai", "gpt-4o", **request)
    text = str(refused.value)
    assert refused.value.actor_id is None
    assert refused.value.workspace_id == WS
    assert "names no actor" in text
    assert "WorkflowRunner.run(actor=...)" in text
    assert "CredentialRequest(actor=...)" in text
    denied = [e for e in world.audit.events if e.action == "access.denied"]
    assert len(denied) == 1
    assert denied[0].actor_id is None
    assert denied[0].outcome == "denied"
    assert "names no actor" in denied[0].detail

    # a member of the workspace is served, an outsider is refused like the absent actor
    assert world.resolve("openai", "gpt-4o", actor=MEMBER, **request).source is expected
    with pytest.raises(NotAuthorized, match=r"mallory may not keys\.use in workspace 'acme'"):
        world.resolve("openai", "gpt-4o", actor=OUTSIDER, **request)


def test_a_plugin_may_authorize_the_hosts_own_runs(world: World) -> None:
    key_id = world.store(WS, "openai")
    host = HostRuns()
    world.pm.register(host)
    assert world.resolve("openai", "gpt-4o").key_id == key_id
    assert host.asked == [(None, WS, Action.USE_KEYS)]  # asked, and its answer let it through
    # it answers for the absent actor only: an outsider is still refused by the default rule
    with pytest.raises(NotAuthorized):
        world.resolve("openai", "gpt-4o", actor=OUTSIDER)


# --- a label the workspace has, disabled or cooling: never the organization's key --------------


def test_a_disabled_workspace_label_is_not_served_by_the_organizations_key(world: World) -> None:
    own = world.store(WS, "anthropic", label="localization")
    pooled = world.store(org_owner(world.org), "anthropic", label="localization")
    ask = {"key_label": "localization", "block_id": "translate", "actor": MEMBER}
    assert world.resolve("anthropic", "claude-haiku-4-5", **ask).key_id == own

    world.keys.disable(OPERATOR, WS, "anthropic", label="localization")
    with pytest.raises(CredentialUnavailable) as refused:
        world.resolve("anthropic", "claude-haiku-4-5", **ask)
    text = str(refused.value)
    assert "labelled 'localization'" in text
    assert "that key is disabled" in text
    assert f"organization {world.org!r}" in text
    assert "byok keys enable --workspace acme --provider anthropic --label localization" in text
    assert pooled not in text

    # deleted: the workspace has no key with that label at all, so the organization's serves
    world.keys.delete_keys(OPERATOR, WS, "anthropic", label="localization")
    credential = world.resolve("anthropic", "claude-haiku-4-5", **ask)
    assert (credential.key_id, credential.source) == (pooled, CredentialSource.ORGANIZATION)
    # stored anew: the workspace's own key wins again
    own = world.store(WS, "anthropic", label="localization")
    assert world.resolve("anthropic", "claude-haiku-4-5", **ask).key_id == own

    # cooling down after a provider's refusal: the block fails too, the organization's key waits
    refused_by_provider = ProviderFailure(
        FailureReason.RATE_LIMIT, CredentialSource.WORKSPACE, key_id=own, status=429
    )
    with pytest.raises(CredentialUnavailable, match="was refused"):
        world.resolve("anthropic", "claude-haiku-4-5", failure=refused_by_provider, **ask)
    with pytest.raises(CredentialUnavailable) as refused:
        world.resolve("anthropic", "claude-haiku-4-5", **ask)
    assert "is cooling down" in str(refused.value)
    assert own in str(refused.value)
    assert f"workspace {WS!r}" in str(refused.value)


def test_the_disabled_label_is_seen_through_the_key_cache(cached_world: World) -> None:
    """With key lists cached, disabling, deleting and storing the workspace's key each show at
    the next resolution (whether the workspace has the label is kept with the cached list)."""
    w = cached_world
    own = w.store(WS, "anthropic", label="localization")
    pooled = w.store(org_owner(w.org), "anthropic", label="localization")
    ask = {"key_label": "localization", "actor": MEMBER}
    assert w.resolve("anthropic", "claude-haiku-4-5", **ask).key_id == own
    w.keys.disable(OPERATOR, WS, "anthropic", label="localization")
    with pytest.raises(CredentialUnavailable, match="that key is disabled"):
        w.resolve("anthropic", "claude-haiku-4-5", **ask)
    # asked again: the lists and the disabled label come from memory, the store is not read
    # (on SQLite: on PostgreSQL the listener's own notice of the change may drop them meanwhile)
    with (
        statements(w.app.engine) as seen,
        pytest.raises(CredentialUnavailable, match="that key is disabled"),
    ):
        w.resolve("anthropic", "claude-haiku-4-5", **ask)
    if w.app.engine.dialect.name == "sqlite":
        assert [s for _, s in seen if "byok_workspace_keys" in s] == []
    w.keys.delete_keys(OPERATOR, WS, "anthropic", label="localization")
    for _ in range(2):
        assert w.resolve("anthropic", "claude-haiku-4-5", **ask).key_id == pooled
    w.store(WS, "anthropic", label="localization")
    w.keys.disable(OPERATOR, WS, "anthropic", label="localization")
    with pytest.raises(CredentialUnavailable, match="that key is disabled"):
        w.resolve("anthropic", "claude-haiku-4-5", **ask)


# --- over the runner, against the emulator -----------------------------------------------------

DOCUMENT: dict[str, Any] = {
    "name": "translate",
    "version": "1.0.0",
    "inputs": {"text": {"type": "string"}},
    "blocks": {
        "draft": {"type": "agent", "model": "gpt-4o-mini", "prompt": "Notes on {{inputs.text}}"},
        "translate": {
            "type": "agent",
            "model": "claude-haiku-4-5",
            "prompt": "Translate: {{draft.content}}",
            "key": {"label": "localization"},
        },
        "result": {"type": "output", "value": "{{translate.content}}"},
    },
    "edges": [{"from": "draft", "to": "translate"}, {"from": "translate", "to": "result"}],
}


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url)
    yield built
    built.close()


def _run(stack: DemoStack, actor: Actor | None) -> RunResult:
    return asyncio.run(
        run_workflow(
            stack.pm,
            parse_workflow(DOCUMENT, source="translate.json"),
            workspace_id=WS,
            inputs={"text": "heat pumps"},
            environ=stack.environ,
            actor=actor,
        )
    )


def _posts(emulator: EmulatorServer) -> list[Any]:
    return [c for c in emulator.calls() if c.method == "POST"]


def test_a_run_without_an_actor_makes_no_call(stack: DemoStack, emulator: EmulatorServer) -> None:
    stack.store_workspace_keys(WS, ("openai", "anthropic"))
    keys = KeyService.for_app(stack.app, stack.pm)
    keys.set_key(OPERATOR, WS, "anthropic", stack.block_key, label="localization", test=False)

    result = _run(stack, None)
    assert not result.ok
    draft = result.blocks["draft"]
    assert draft.status is BlockStatus.FAILED
    assert "names no actor" in (draft.error or "")
    assert "WorkflowRunner.run(actor=...)" in (draft.error or "")
    assert _posts(emulator) == []  # nothing was sent to a provider
    assert list(stack.app.ledger.rows()) == []

    # the member who started the run: it runs on the workspace's keys
    result = _run(stack, MEMBER)
    assert result.ok, result.error
    assert result.blocks["translate"].source == CredentialSource.WORKSPACE
    assert len(_posts(emulator)) == 2


def test_a_run_whose_labelled_key_is_disabled_fails_that_block(
    stack: DemoStack, emulator: EmulatorServer
) -> None:
    stack.store_workspace_keys(WS, ("openai",))
    keys = KeyService.for_app(stack.app, stack.pm)
    orgs = stack.app.organizations(stack.pm)
    orgs.create(OPERATOR, "bigco")
    orgs.attach(OPERATOR, "bigco", WS)
    pooled = stack.workspace_keys["anthropic"]  # a key the emulator accepts
    keys.set_key(OPERATOR, WS, "anthropic", stack.block_key, label="localization", test=False)
    keys.set_key(
        OPERATOR, org_owner("bigco"), "anthropic", pooled, label="localization", test=False
    )
    keys.disable(OPERATOR, WS, "anthropic", label="localization")

    result = _run(stack, MEMBER)
    translate = result.blocks["translate"]
    assert result.blocks["draft"].status is BlockStatus.COMPLETED
    assert translate.status is BlockStatus.FAILED
    assert "labelled 'localization'" in (translate.error or "")
    assert "byok keys enable --workspace acme" in (translate.error or "")
    assert emulator.calls("anthropic", api_key=pooled) == []
    assert emulator.calls("anthropic", api_key=stack.block_key) == []

    # the workspace's key deleted: the organization's key with that label serves the block
    keys.delete_keys(OPERATOR, WS, "anthropic", label="localization")
    result = _run(stack, MEMBER)
    assert result.ok, result.error
    assert result.blocks["translate"].source == CredentialSource.ORGANIZATION
    assert len(emulator.calls("anthropic", api_key=pooled)) == 1
