"""The hosted-model catalog: shipped content, aliases, operator overrides and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from byok_hookspecs import hookimpl

from byok_plugin.app import App
from byok_plugin.billing.catalog import CatalogError, catalog_for, load_catalog, shipped_catalog
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

PROVIDERS = {"openai", "anthropic", "google", "mistral", "exa"}


def test_shipped_catalog_covers_every_provider_and_the_exa_tool() -> None:
    catalog = shipped_catalog()
    assert set(catalog.providers) == PROVIDERS
    for provider in PROVIDERS - {"exa"}:
        models = catalog.models_of(provider)
        assert any(m.hosted for m in models), f"{provider} has no hosted model"
        assert all(m.kind == "chat" for m in models)
    exa = catalog.model("exa", "exa-search")
    assert exa is not None
    assert exa.kind == "tool"
    assert exa.hosted
    assert catalog.provider_of("gemini-2.5-pro") == "google"


def test_hosted_and_not_hosted_models_are_told_apart() -> None:
    catalog = shipped_catalog()
    assert catalog.is_hosted("openai", "gpt-4o")
    assert not catalog.is_hosted("openai", "o3")  # shipped as not hosted
    assert not catalog.is_hosted("anthropic", "claude-opus-4-1")
    assert not catalog.is_hosted("openai", "no-such-model")  # unknown: never hosted
    # the provider is part of the key: a Mistral model is not hosted under another provider
    assert not catalog.is_hosted("openai", "mistral-large-latest")


def test_aliases_resolve_to_the_catalog_entry() -> None:
    catalog = shipped_catalog()
    assert catalog.canonical("anthropic", "claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert catalog.is_hosted("openai", "gpt-4o-2024-11-20")
    assert catalog.canonical("openai", "unknown-x") == "unknown-x"
    assert catalog.provider_of("claude-haiku-4-5-20251001") == "anthropic"


def test_override_file_merges_field_by_field(tmp_path: Path) -> None:
    override = tmp_path / "catalog.json"
    override.write_text(
        json.dumps(
            {
                "version": "acme-1",
                "models": {
                    "gpt-4o": {"hosted": False},
                    "o3": {"hosted": True},
                    "gpt-9": {"provider": "openai", "hosted": True},
                },
            }
        )
    )
    catalog = load_catalog(override)
    assert catalog.version == "acme-1"
    assert not catalog.is_hosted("openai", "gpt-4o")
    assert not catalog.is_hosted("openai", "gpt-4o-2024-08-06")  # aliases kept from the base
    assert catalog.is_hosted("openai", "o3")
    assert catalog.is_hosted("openai", "gpt-9")
    assert catalog.is_hosted("anthropic", "claude-sonnet-4-5")  # untouched entries stay


def test_hook_byok_is_hosted_follows_the_catalog_override(tmp_path: Path) -> None:
    override = tmp_path / "c.json"
    override.write_text(json.dumps({"models": {"gpt-4o": {"hosted": False}}}))
    settings = Settings.from_environ(
        {"BYOK_HOME": str(tmp_path), "BYOK_CATALOG_FILE": str(override)}
    )
    assert settings.catalog_file == override
    assert not catalog_for(settings).is_hosted("openai", "gpt-4o")
    pm = plugin_manager_for(App(settings), load_entrypoints=False, environ={})
    assert pm.hook.byok_is_hosted(provider="openai", model="gpt-4o") is False
    assert pm.hook.byok_is_hosted(provider="openai", model="gpt-4.1") is True


def test_hook_byok_is_hosted_a_plugin_answers_first(tmp_path: Path) -> None:
    class NothingHosted:
        @hookimpl
        def byok_is_hosted(self, provider: str, model: str) -> bool | None:
            return False if provider == "anthropic" else None

    pm = plugin_manager_for(
        App(Settings.from_environ({"BYOK_HOME": str(tmp_path)})), load_entrypoints=False, environ={}
    )
    pm.register(NothingHosted())
    assert pm.hook.byok_is_hosted(provider="anthropic", model="claude-sonnet-4-5") is False
    assert pm.hook.byok_is_hosted(provider="openai", model="gpt-4o") is True


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"models": {"gpt-4o": {"hosted": "yes"}}}, "models.gpt-4o.hosted: must be true or false"),
        ({"models": {"x": {"provider": "acme"}}}, "models.x.provider: unknown provider 'acme'"),
        ({"models": {"x": {"hosted": True}}}, "models.x.provider: must be a non-empty string"),
        ({"models": {"x": {"provider": "openai", "kind": "image"}}}, "models.x.kind: must be one"),
        ({"models": {"x": {"provider": "openai", "aliases": ["gpt-4o"]}}}, "already used by"),
        ({"models": []}, "models: must be an object"),
        ({"colour": 1}, "unknown keys ['colour']"),
        ([1, 2], "$: the document must be a JSON object"),
    ],
)
def test_bad_override_names_the_file_and_the_json_path(
    tmp_path: Path, document: object, expected: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_unreadable_or_invalid_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"missing\.json: cannot be read"):
        load_catalog(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"models": {\n  "x": }')
    with pytest.raises(CatalogError, match=r"broken\.json: not valid JSON \(line 2"):
        load_catalog(broken)


def test_hook_byok_is_hosted_has_no_answer_for_a_model_nobody_knows(isolated_home) -> None:
    from byok_plugin import App, Settings, plugin_manager_for

    app = App(Settings.from_environ({"BYOK_HOME": str(isolated_home)}))
    pm = plugin_manager_for(app, environ={"BYOK_LOAD_PLUGINS": "byok_plugin"})
    assert pm.hook.byok_is_hosted(provider="openai", model="gpt-4o-mini") is True
    assert pm.hook.byok_is_hosted(provider="openai", model="o3") is False  # known, BYOK only
    assert pm.hook.byok_is_hosted(provider="openai", model="gpt-4o-minii") is None
    assert pm.hook.byok_is_hosted(provider="exa", model="exa-search") is True
