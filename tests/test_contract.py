"""The hook contract itself: documented specs, plugin loading and selection, secret-free values."""

from __future__ import annotations

import ast
import inspect
import re
from decimal import Decimal
from pathlib import Path

import pluggy
import pytest
from byok_hookspecs import (
    PROJECT_NAME,
    USAGE_COUNTS,
    Action,
    Actor,
    Charge,
    Credential,
    CredentialRequest,
    CredentialSource,
    Usage,
    add_to,
    get_plugin_manager,
    hookimpl,
    hookspecs,
    selected_plugins,
)

ROOT = Path(__file__).resolve().parents[1]
HOOK_NAMES = sorted(name for name in dir(hookspecs) if name.startswith("byok_"))


def _spec_functions():
    return [(name, getattr(hookspecs, name)) for name in HOOK_NAMES]


def test_there_are_hooks() -> None:
    assert "byok_resolve_credential" in HOOK_NAMES
    assert len(HOOK_NAMES) >= 8


@pytest.mark.parametrize(("name", "spec"), _spec_functions(), ids=HOOK_NAMES)
def test_every_hookspec_is_fully_documented(name: str, spec) -> None:
    doc = inspect.getdoc(spec)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith("."), f"{name}: the first line must be a one-sentence summary"
    for param in inspect.signature(spec).parameters:
        assert f":param {param}:" in doc, f"{name} does not document :param {param}:"
    assert ":returns:" in doc, f"{name} does not document :returns:"
    opts = getattr(spec, f"{PROJECT_NAME}_spec")
    if opts.get("firstresult"):
        assert "Stops at first non-None result." in doc, f"{name} is firstresult"
    else:
        assert "Stops at first non-None result." not in doc


@pytest.mark.parametrize(("name", "spec"), _spec_functions(), ids=HOOK_NAMES)
def test_every_hookspec_is_fully_typed(name: str, spec) -> None:
    signature = inspect.signature(spec)
    for param in signature.parameters.values():
        assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name}) untyped"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return type"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hook_is_in_the_plugin_hooks_docs(name: str) -> None:
    docs = (ROOT / "docs" / "plugin_hooks.md").read_text()
    assert re.search(rf"^## `?{name}\(", docs, re.MULTILINE), f"docs/plugin_hooks.md lacks {name}"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hook_has_a_test(name: str) -> None:
    """As datasette does: a test function named test_hook_<name>... must exist for each hook."""
    tests = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                tests.add(node.name)
    assert any(t == f"test_hook_{name}" or t.startswith(f"test_hook_{name}_") for t in tests), (
        f"no test named test_hook_{name}[_...] under tests/"
    )


def test_hookimpl_with_an_unknown_name_is_rejected() -> None:
    class Typo:
        @hookimpl
        def byok_resolve_credentials(self, request):  # one letter too many
            return None

    pm = pluggy.PluginManager(PROJECT_NAME)
    add_to(pm, load_entrypoints=False)
    pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError, match="byok_resolve_credentials"):
        pm.check_pending()


def test_hookimpl_with_an_unknown_argument_is_rejected() -> None:
    class Wrong:
        @hookimpl
        def byok_is_hosted(self, provider, model, region):
            return True

    pm = pluggy.PluginManager(PROJECT_NAME)
    add_to(pm, load_entrypoints=False)
    with pytest.raises(pluggy.PluginValidationError, match="region"):
        pm.register(Wrong())


def test_add_to_refuses_a_manager_of_another_project() -> None:
    with pytest.raises(ValueError, match="project 'byok'"):
        add_to(pluggy.PluginManager("myhost"), load_entrypoints=False)


def test_get_plugin_manager_loads_the_default_plugin_from_its_entry_point() -> None:
    pm = get_plugin_manager()
    names = dict(pm.list_name_plugin())
    assert "byok_plugin" in names
    dists = {dist.project_name for _, dist in pm.list_plugin_distinfo()}
    assert "byok-plugin" in dists


def test_default_implementations_are_all_trylast() -> None:
    pm = get_plugin_manager()
    builtins = [pm.get_plugin("byok_plugin"), pm.get_plugin("byok_plugin.defaults")]
    assert None not in builtins
    hooks = set()
    for plugin in builtins:
        for caller in pm.get_hookcallers(plugin):
            (impl,) = [i for i in caller.get_hookimpls() if i.plugin is plugin]
            assert impl.trylast, f"the default {caller.name} must be trylast"
            hooks.add(caller.name)
    assert hooks == set(HOOK_NAMES), "the default plugin implements every hook"


def test_each_manager_gets_its_own_default_plugin_bound_to_it() -> None:
    first, second = get_plugin_manager(), get_plugin_manager()
    one, two = first.get_plugin("byok_plugin.defaults"), second.get_plugin("byok_plugin.defaults")
    assert one is not two
    assert one._pm is first
    assert two._pm is second


@pytest.mark.parametrize(
    ("environ", "loaded"),
    [
        ({}, True),
        ({"BYOK_LOAD_PLUGINS": ""}, False),
        ({"BYOK_LOAD_PLUGINS": "byok_plugin"}, True),
        ({"BYOK_LOAD_PLUGINS": "byok-plugin"}, True),  # the distribution's name works too
        ({"BYOK_LOAD_PLUGINS": "something_else"}, False),
        ({"BYOK_BLOCK_PLUGINS": "byok_plugin"}, False),
        ({"BYOK_BLOCK_PLUGINS": " other , byok_plugin "}, False),
        ({"BYOK_BLOCK_PLUGINS": "other"}, True),
    ],
)
def test_plugin_choice_by_environment(environ: dict[str, str], loaded: bool) -> None:
    assert any(ep.name == "byok_plugin" for ep in selected_plugins(environ)) is loaded
    pm = pluggy.PluginManager(PROJECT_NAME)
    add_to(pm, environ=environ)
    assert (pm.get_plugin("byok_plugin") is not None) is loaded
    # a block used for selection is lifted afterwards: the host may still register it
    assert not pm.is_blocked("byok_plugin")


def test_add_to_keeps_the_hosts_own_plugins() -> None:
    class HostPlugin:
        @hookimpl(tryfirst=True)
        def byok_is_hosted(self, provider: str, model: str) -> bool | None:
            return provider == "inhouse"

    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.register(HostPlugin(), name="host")
    add_to(pm, environ={"BYOK_LOAD_PLUGINS": ""})
    assert pm.hook.byok_is_hosted(provider="inhouse", model="m") is True


def test_secrets_stay_out_of_repr_and_str() -> None:
    secret = "sk-" + "s3cr3t" * 8
    request = CredentialRequest(
        workspace_id="acme", provider="openai", model="gpt-4o-mini", block_key=secret
    )
    credential = Credential(
        api_key=secret, provider="openai", source=CredentialSource.WORKSPACE, hint="sk-s3c...cr3t"
    )
    for value in (request, credential):
        assert secret not in repr(value)
        assert secret not in str(value)
        assert secret[3:12] not in repr(value)
    assert "sk-s3c...cr3t" in repr(credential)


def test_values_are_frozen() -> None:
    usage = Usage(provider="openai", model="gpt-4o", input_tokens=3)
    with pytest.raises(AttributeError):
        usage.input_tokens = 4  # type: ignore[misc]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_usage_rejects_impossible_counts(bad) -> None:
    with pytest.raises(ValueError, match="output_tokens"):
        Usage(provider="openai", model="gpt-4o", output_tokens=bad)


@pytest.mark.parametrize("name", USAGE_COUNTS)
@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_usage_rejects_an_impossible_count_in_any_field(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=f"Usage.{name} must be a non-negative integer"):
        Usage(provider="openai", model="gpt-4o", **{"input_tokens": 2, name: bad})


def test_usage_validation_keeps_its_meaning_off_the_common_case() -> None:
    """The checks of the common case (plain ints, no tool uses) and of the rest agree."""

    class Count(int):
        pass

    assert Usage("openai", "m", output_tokens=Count(3)).output_tokens == 3  # an int, as before
    assert Usage("openai", "m", tool_uses=[]).tool_uses == ()  # type: ignore[arg-type]
    uses = Usage("openai", "m", tool_uses=(("web_search", 2), ("code", 1))).tool_uses
    assert uses == (("code", 1), ("web_search", 2))
    with pytest.raises(ValueError, match="tool_uses"):
        Usage("openai", "m", tool_uses=(("web_search", 1), ("web_search", 2)))
    with pytest.raises(ValueError, match="tool_uses"):
        Usage("openai", "m", tool_uses=(("web_search", 0),))
    for uses_ in ((), (("web_search", 1),)):
        with pytest.raises(TypeError, match="reported_cost"):
            Usage("openai", "m", tool_uses=uses_, reported_cost=0.5)  # type: ignore[arg-type]
    assert Usage("openai", "m", reported_cost=Decimal("0.5")).reported_cost == Decimal("0.5")


def test_charge_is_decimal_and_never_negative() -> None:
    with pytest.raises(TypeError):
        Charge(amount=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        Charge(amount=Decimal("-0.01"))


@pytest.mark.parametrize(
    ("source", "is_byok", "billed"),
    [
        (CredentialSource.BLOCK, False, False),
        (CredentialSource.WORKSPACE, True, False),
        (CredentialSource.ORGANIZATION, True, False),
        (CredentialSource.PLATFORM, False, True),
    ],
)
def test_credential_source_decides_who_pays(source, is_byok: bool, billed: bool) -> None:
    credential = Credential(api_key="k", provider="openai", source=source)
    assert credential.is_byok is is_byok
    assert credential.billed_by_platform is billed


def test_actor_roles() -> None:
    actor = Actor(id="ann", roles={"acme": "admin"})
    assert actor.role_in("acme") == "admin"
    assert actor.role_in("other") is None
    assert Action.MANAGE_KEYS == "keys.manage"


def test_usage_counts_names_every_count_of_a_usage() -> None:
    from dataclasses import fields

    from byok_hookspecs import USAGE_COUNTS

    ints = tuple(f.name for f in fields(Usage) if f.type in ("int", int))
    assert ints == USAGE_COUNTS
