"""Who may do what with a workspace's keys: decided by byok_authorize, every denial audited."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from byok_hookspecs import Action, Actor, NotAuthorized, Role, hookimpl
from keys_support import (
    OPERATOR,
    Recorder,
    bare_service,
    make_app,
    master_key,
    random_key,
    service_for,
)

from byok_plugin.app import App
from byok_plugin.keys.service import KeyService

ADMIN_A = Actor("alice", {"ws-a": Role.ADMIN})
MEMBER_A = Actor("bob", {"ws-a": Role.MEMBER})
OUTSIDER = Actor("mallory", {"ws-b": Role.ADMIN})


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    app = make_app(database_url, tmp_path, keys=[master_key()])
    yield app
    app.close()


def _calls(
    key_id: str, ws: str = "ws-a"
) -> dict[str, Callable[[KeyService, Actor | None], object]]:
    """Every operation of the service on one workspace."""
    return {
        "list": lambda s, a: s.list_keys(a, ws),
        "set": lambda s, a: s.set_key(a, ws, "openai", random_key("openai"), test=False),
        "delete": lambda s, a: s.delete_keys(a, ws, "openai", key_id=key_id),
        "enable": lambda s, a: s.enable(a, ws, "openai", key_id=key_id),
        "disable": lambda s, a: s.disable(a, ws, "openai", key_id=key_id),
        "test": lambda s, a: s.test_keys(a, ws, "openai", key_id=key_id),
    }


MATRIX = [
    # actor, operations allowed (all others must be denied)
    (ADMIN_A, {"list", "set", "delete", "enable", "disable", "test"}),
    (MEMBER_A, {"list"}),
    (OUTSIDER, set()),
    (None, set()),
    (OPERATOR, {"list", "set", "delete", "enable", "disable", "test"}),
]


@pytest.mark.parametrize(
    ("actor", "allowed"), MATRIX, ids=["admin", "member", "other-ws", "anonymous", "operator"]
)
def test_the_authorization_matrix(app: App, actor: Actor | None, allowed: set[str]) -> None:
    recorder = Recorder()
    service, _ = service_for(app, recorder)
    for name in ["list", "set", "test", "disable", "enable", "delete"]:
        stored = service.set_key(
            OPERATOR, "ws-a", "openai", random_key("openai"), label=f"for-{name}", test=False
        )
        recorder.events.clear()
        call = _calls(stored.key.id)[name]
        if name in allowed:
            call(service, actor)
            assert "access.denied" not in recorder.actions(), name
        else:
            with pytest.raises(NotAuthorized) as info:
                call(service, actor)
            assert info.value.workspace_id == "ws-a"
            (event,) = recorder.events
            assert (event.action, event.outcome, event.workspace_id) == (
                "access.denied",
                "denied",
                "ws-a",
            )
            assert event.actor_id == (actor.id if actor else None)
            expected = Action.READ_KEYS if name == "list" else Action.MANAGE_KEYS
            assert expected.value in event.detail
    # denials also reach the audit table through the default plugin
    denied = app.audit_store.events("ws-a", action="access.denied")
    assert len(denied) == 6 - len(allowed)


def test_an_admin_of_one_workspace_cannot_touch_another(app: App) -> None:
    service, _ = service_for(app)
    stored = service.set_key(OPERATOR, "ws-b", "openai", random_key("openai"), test=False)
    for _name, call in _calls(stored.key.id, ws="ws-b").items():
        with pytest.raises(NotAuthorized):
            call(service, ADMIN_A)  # admin of ws-a only
        with pytest.raises(NotAuthorized):
            call(service, MEMBER_A)
    (kept,) = service.list_keys(OPERATOR, "ws-b")
    assert (kept.id, kept.status) == (stored.key.id, "enabled")


def test_with_no_authorize_implementation_everything_is_denied(app: App) -> None:
    recorder = Recorder()
    service, pm = bare_service(app, recorder)
    assert pm.hook.byok_authorize.get_hookimpls() == []
    key_id = "key_doesnotmatter1"
    for actor in (ADMIN_A, MEMBER_A, OPERATOR, None):
        for name, call in _calls(key_id).items():
            recorder.events.clear()
            with pytest.raises(
                NotAuthorized, match="no installed plugin implements byok_authorize"
            ):
                call(service, actor)
            (event,) = recorder.events
            assert event.outcome == "denied", name
            assert "no authorization answer" in event.detail
    with pytest.raises(NotAuthorized):
        service.rewrap(Actor("someone"))


def test_an_explicit_refusal_from_a_plugin_wins(app: App) -> None:
    class Deny:
        @hookimpl
        def byok_authorize(self, actor, workspace_id, action):
            return False if workspace_id == "locked" else None

    recorder = Recorder()
    service, _ = service_for(app, Deny(), recorder)
    with pytest.raises(NotAuthorized) as denied:
        service.list_keys(OPERATOR, "locked")
    assert "no installed plugin" not in str(denied.value)  # a plugin did answer
    assert recorder.events[-1].detail == "keys.read: list keys"
    assert service.list_keys(OPERATOR, "open") == []


def test_only_the_operator_may_rewrap(app: App) -> None:
    recorder = Recorder()
    service, _ = service_for(app, recorder)
    with pytest.raises(NotAuthorized):
        service.rewrap(ADMIN_A)
    assert recorder.actions("denied") == ["access.denied"]
    report = service.rewrap(OPERATOR)
    assert report.rewrapped == 0
    assert report.complete


def test_only_the_operator_may_retire_a_master_key(app: App) -> None:
    recorder = Recorder()
    service, _ = service_for(app, recorder)
    for actor in (ADMIN_A, MEMBER_A, None):
        with pytest.raises(NotAuthorized):
            service.retire_master_key(actor, "mk_anything")
    assert recorder.actions("denied") == ["access.denied"] * 3
    assert all("retire master key" in e.detail for e in recorder.events)
