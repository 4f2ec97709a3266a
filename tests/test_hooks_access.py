"""byok_authorize and byok_audit through a real plugin manager."""

from __future__ import annotations

import logging

import pluggy
import pytest
from byok_hookspecs import PROJECT_NAME, Action, Actor, AuditEvent, Role, add_to, hookimpl

from byok_plugin import App, Settings, plugin_manager_for


@pytest.fixture
def pm(isolated_home) -> pluggy.PluginManager:
    app = App(Settings.from_environ({"BYOK_HOME": str(isolated_home)}))
    return plugin_manager_for(app, environ={"BYOK_LOAD_PLUGINS": "byok_plugin"})


ADMIN = Actor(id="ada", roles={"acme": Role.ADMIN})
MEMBER = Actor(id="mo", roles={"acme": Role.MEMBER, "beta": Role.ADMIN})
STRANGER = Actor(id="sam", roles={"beta": Role.MEMBER})
OPERATOR = Actor(id="ops", operator=True)


@pytest.mark.parametrize(
    ("actor", "action", "allowed"),
    [
        (ADMIN, Action.READ_KEYS, True),
        (ADMIN, Action.MANAGE_KEYS, True),
        (ADMIN, Action.USE_KEYS, True),
        (MEMBER, Action.READ_KEYS, True),
        (MEMBER, Action.USE_KEYS, True),
        (MEMBER, Action.READ_USAGE, True),
        (MEMBER, Action.MANAGE_KEYS, False),  # admin in beta, member in acme
        (STRANGER, Action.READ_KEYS, None),  # not in the workspace: no answer, so deny
        (STRANGER, Action.MANAGE_KEYS, None),
        (None, Action.READ_KEYS, None),
        (OPERATOR, Action.MANAGE_KEYS, True),
    ],
)
def test_hook_byok_authorize_default_roles(pm, actor, action, allowed) -> None:
    assert pm.hook.byok_authorize(actor=actor, workspace_id="acme", action=action) is allowed


def test_hook_byok_authorize_with_no_implementation_answers_nothing() -> None:
    pm = pluggy.PluginManager(PROJECT_NAME)
    add_to(pm, environ={"BYOK_LOAD_PLUGINS": ""})
    assert pm.hook.byok_authorize(actor=OPERATOR, workspace_id="acme", action="keys.read") is None


def test_hook_byok_authorize_a_host_plugin_overrides_the_default(pm) -> None:
    class Suspended:
        @hookimpl
        def byok_authorize(self, actor, workspace_id, action):
            return False if workspace_id == "acme" else None

    pm.register(Suspended())
    assert pm.hook.byok_authorize(actor=ADMIN, workspace_id="acme", action="keys.read") is False


def test_hook_byok_audit_every_implementation_sees_the_event(pm, caplog) -> None:
    seen: list[AuditEvent] = []

    class Exporter:
        @hookimpl
        def byok_audit(self, event: AuditEvent) -> None:
            seen.append(event)

    pm.register(Exporter())
    event = AuditEvent(
        action="key.created", workspace_id="acme", actor_id="ada", provider="openai", key_id="k1"
    )
    with caplog.at_level(logging.INFO, logger="byok.audit"):
        pm.hook.byok_audit(event=event)
    assert seen == [event]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "byok.audit"]
    assert "key.created" in line
    assert "workspace=acme" in line
    assert "key=k1" in line


def test_hook_byok_manager_ready_reaches_plugins_registered_before_and_after() -> None:
    seen: list[tuple[str, pluggy.PluginManager]] = []

    class Early:
        @hookimpl
        def byok_manager_ready(self, pm):
            seen.append(("early", pm))

    class Late:
        @hookimpl
        def byok_manager_ready(self, pm):
            seen.append(("late", pm))

    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.register(Early())
    add_to(pm, environ={"BYOK_LOAD_PLUGINS": ""})
    assert seen == [("early", pm)]
    pm.register(Late())  # historic: replayed on registration
    assert seen == [("early", pm), ("late", pm)]


def test_hook_byok_manager_ready_lets_resolution_ask_other_plugins(isolated_home) -> None:
    """The entry-point default plugin, loaded by byok_hookspecs alone, asks the manager's hooks."""
    from byok_hookspecs import CredentialRequest, NoCredential, get_plugin_manager

    class NothingHosted:
        @hookimpl(tryfirst=True)
        def byok_is_hosted(self, provider, model):
            return False

    pm = get_plugin_manager()
    pm.register(NothingHosted())
    request = CredentialRequest(
        workspace_id="acme", provider="openai", model="gpt-4o-mini", actor=OPERATOR
    )
    # gpt-4o-mini is hosted by default; the plugin says otherwise and the default resolution obeys
    with pytest.raises(NoCredential):
        pm.hook.byok_resolve_credential(request=request)
