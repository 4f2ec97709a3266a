"""The hosted-model catalog: which providers, models and tools exist, and which the platform hosts.

"Hosted" means the platform may serve the model or tool on its own (billed) key when a workspace
has no key of its own. The catalog ships as ``byok_plugin/data/catalog.json``; an operator
overrides or extends it with a file of the same shape (``BYOK_CATALOG_FILE``), whose entries are
merged field by field over the shipped ones, so ``{"models": {"gpt-4o": {"hosted": false}}}`` is
enough to stop hosting one model. Any plugin can also answer ``byok_is_hosted`` before the default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from byok_plugin.core.json_file import JsonFileError, printable_text, read_json_file

__all__ = [
    "Catalog",
    "CatalogError",
    "ModelInfo",
    "ProviderInfo",
    "catalog_for",
    "load_catalog",
    "parse_catalog",
    "shipped_catalog",
]

SHIPPED = "catalog.json"
MODEL_KINDS = frozenset({"chat", "tool"})
#: the longest provider id: what the ledger's provider column holds
MAX_PROVIDER_LENGTH = 40
#: a provider's key variable prefix (``OPENAI`` for ``OPENAI_API_KEY_2``): a variable name's
#: characters, short enough that the platform key's id (``env:OPENAI_API_KEY_2``) fits the
#: ledger's and the audit log's key id columns
_ENV_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


class CatalogError(ValueError):
    """A catalog file is malformed; the message names the file and the JSON path."""


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """A provider: its id (``openai``), display name and the prefixes of its key variables."""

    id: str
    name: str
    env_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model or tool: which provider serves it and whether the platform hosts it."""

    id: str
    provider: str
    kind: str = "chat"
    hosted: bool = False
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    """An immutable view of the catalog, with lookups by ``(provider, model or alias)``."""

    version: str
    providers: Mapping[str, ProviderInfo]
    models: Mapping[str, ModelInfo]
    source: str = "<catalog>"
    _by_name: Mapping[tuple[str, str], ModelInfo] = field(
        default_factory=dict, repr=False, compare=False
    )

    def model(self, provider: str, model: str) -> ModelInfo | None:
        """The entry for a model or tool, by its id or one of its aliases; ``None`` if unknown."""
        return self._by_name.get((provider, model))

    def is_hosted(self, provider: str, model: str) -> bool:
        """True when the platform hosts this model or tool; unknown models are not hosted."""
        info = self._by_name.get((provider, model))
        return info is not None and info.hosted

    def canonical(self, provider: str, model: str) -> str:
        """The catalog id of a model given by alias (the name itself when unknown)."""
        info = self._by_name.get((provider, model))
        return info.id if info is not None else model

    def provider_of(self, model: str) -> str | None:
        """The provider that serves a model, when the catalog knows it."""
        info = self.models.get(model)
        if info is not None:
            return info.provider
        for (provider, name), _ in self._by_name.items():
            if name == model:
                return provider
        return None

    def models_of(self, provider: str) -> list[ModelInfo]:
        return [info for info in self.models.values() if info.provider == provider]

    def hosted_models(self) -> list[ModelInfo]:
        return [info for info in self.models.values() if info.hosted]


def _fail(source: str, path: str, message: str) -> CatalogError:
    # the path holds the file's own keys: written so that the message stays one printable line
    return CatalogError(f"catalog {source}: {printable_text(path)}: {message}")


def _read_json(path: Path) -> Any:
    """The document of an operator's catalog file (see :mod:`byok_plugin.core.json_file`)."""
    try:
        return read_json_file(path, "catalog")[1]
    except JsonFileError as exc:
        raise CatalogError(str(exc)) from None


def _str(source: str, path: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, path, f"must be a non-empty string, not {value!r}")
    if not value.isprintable():  # shown on the settings page and in messages
        raise _fail(source, path, f"must not hold control characters, not {value!r}")
    return value


def _str_list(source: str, path: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(source, path, f"must be a list of strings, not {value!r}")
    return tuple(_str(source, f"{path}[{i}]", item) for i, item in enumerate(value))


def _merge_raw(base: dict[str, Any], override: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Merge an override document over a base one, entry by entry and field by field."""
    if not isinstance(override, Mapping):
        raise _fail(source, "$", "the document must be a JSON object")
    merged = {
        "version": base.get("version", ""),
        "providers": {k: dict(v) for k, v in base.get("providers", {}).items()},
        "models": {k: dict(v) for k, v in base.get("models", {}).items()},
    }
    if "version" in override:
        merged["version"] = override["version"]
    for section in ("providers", "models"):
        entries = override.get(section, {})
        if not isinstance(entries, Mapping):
            raise _fail(source, section, "must be an object of id -> entry")
        for key, entry in entries.items():
            if not isinstance(entry, Mapping):
                raise _fail(source, f"{section}.{key}", "must be an object")
            merged[section].setdefault(key, {}).update(entry)
    unknown = set(override) - {"version", "description", "providers", "models"}
    if unknown:
        raise _fail(source, "$", f"unknown keys {sorted(unknown)}")
    return merged


def parse_catalog(data: Any, source: str = "<catalog>") -> Catalog:
    """Validate a catalog document (the shape of ``catalog.json``) and build the lookups."""
    if not isinstance(data, Mapping):
        raise _fail(source, "$", "the document must be a JSON object")
    version = _str(source, "version", data.get("version", "unversioned"))
    raw_providers = data.get("providers", {})
    raw_models = data.get("models", {})
    if not isinstance(raw_providers, Mapping):
        raise _fail(source, "providers", "must be an object of id -> entry")
    if not isinstance(raw_models, Mapping):
        raise _fail(source, "models", "must be an object of id -> entry")

    providers: dict[str, ProviderInfo] = {}
    for pid, entry in raw_providers.items():
        path = f"providers.{pid}"
        _str(source, path, pid)
        if len(pid) > MAX_PROVIDER_LENGTH:
            raise _fail(source, path, f"a provider id is at most {MAX_PROVIDER_LENGTH} characters")
        if not isinstance(entry, Mapping):
            raise _fail(source, path, "must be an object")
        prefixes = _str_list(source, f"{path}.env_prefixes", entry.get("env_prefixes", []))
        for i, prefix in enumerate(prefixes):
            if not _ENV_PREFIX.fullmatch(prefix):
                raise _fail(
                    source,
                    f"{path}.env_prefixes[{i}]",
                    f"must be 1-40 letters, digits or '_' (a variable name's start, such as "
                    f"'OPENAI'), not {prefix!r}",
                )
        providers[pid] = ProviderInfo(
            id=pid,
            name=_str(source, f"{path}.name", entry.get("name", pid)),
            env_prefixes=prefixes,
        )

    models: dict[str, ModelInfo] = {}
    by_name: dict[tuple[str, str], ModelInfo] = {}
    for mid, entry in raw_models.items():
        path = f"models.{mid}"
        _str(source, path, mid)
        if not isinstance(entry, Mapping):
            raise _fail(source, path, "must be an object")
        provider = _str(source, f"{path}.provider", entry.get("provider"))
        if provider not in providers:
            raise _fail(
                source,
                f"{path}.provider",
                f"unknown provider {provider!r} (known: {', '.join(sorted(providers))})",
            )
        kind = entry.get("kind", "chat")
        if not isinstance(kind, str) or kind not in MODEL_KINDS:
            raise _fail(
                source, f"{path}.kind", f"must be one of {sorted(MODEL_KINDS)}, not {kind!r}"
            )
        hosted = entry.get("hosted", False)
        if not isinstance(hosted, bool):
            raise _fail(source, f"{path}.hosted", f"must be true or false, not {hosted!r}")
        aliases = _str_list(source, f"{path}.aliases", entry.get("aliases", []))
        info = ModelInfo(id=mid, provider=provider, kind=kind, hosted=hosted, aliases=aliases)
        models[mid] = info
        for name in (mid, *aliases):
            other = by_name.get((provider, name))
            if other is not None and other.id != mid:
                raise _fail(
                    source, path, f"name {name!r} is already used by {provider} model {other.id!r}"
                )
            by_name[(provider, name)] = info

    return Catalog(
        version=version,
        providers=MappingProxyType(providers),
        models=MappingProxyType(models),
        source=source,
        _by_name=MappingProxyType(by_name),
    )


def _shipped_raw() -> dict[str, Any]:
    text = resources.files("byok_plugin").joinpath("data", SHIPPED).read_text(encoding="utf-8")
    raw: dict[str, Any] = json.loads(text)
    return raw


def shipped_catalog() -> Catalog:
    """The catalog shipped in the package."""
    return parse_catalog(_shipped_raw(), source=f"byok_plugin/data/{SHIPPED}")


def load_catalog(override: Path | None = None) -> Catalog:
    """The shipped catalog, with an operator's override file merged over it when given."""
    if override is None:
        return shipped_catalog()
    merged = _merge_raw(_shipped_raw(), _read_json(override), str(override))
    return parse_catalog(merged, source=str(override))


def catalog_for(settings: Any) -> Catalog:
    """The catalog a :class:`~byok_plugin.settings.Settings` asks for (``BYOK_CATALOG_FILE``)."""
    return load_catalog(getattr(settings, "catalog_file", None))
