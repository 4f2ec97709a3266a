"""Getting a plugin manager that knows the ``byok`` hooks and the installed plugins.

Which installed plugins load is chosen by the environment, as llm and tox do:

- ``BYOK_LOAD_PLUGINS=a,b``: load only these entry points (by entry-point or distribution name);
  set but empty, load none.
- ``BYOK_BLOCK_PLUGINS=a,b``: load every plugin but these.

A name in either that matches no installed plugin (a typo) is logged as a warning, with the names
that would match, since it silently loads nothing (``BYOK_LOAD_PLUGINS``) or blocks nothing
(``BYOK_BLOCK_PLUGINS``): :func:`unmatched_plugin_names` says which.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import metadata

import pluggy

from byok_hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME, hookspecs

log = logging.getLogger("byok.plugins")
#: the variables that choose plugins by name
PLUGIN_VARIABLES = ("BYOK_LOAD_PLUGINS", "BYOK_BLOCK_PLUGINS")


def get_plugin_manager() -> pluggy.PluginManager:
    """A new plugin manager with the ``byok`` hooks and the installed plugins loaded."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    add_to(pm)
    return pm


def _names(value: str) -> set[str]:
    return {part.strip() for part in value.split(",") if part.strip()}


def selected_plugins(environ: Mapping[str, str] | None = None) -> list[metadata.EntryPoint]:
    """The entry points of group ``byok`` that the environment lets load, in install order."""
    env = os.environ if environ is None else environ
    allowed = _names(env["BYOK_LOAD_PLUGINS"]) if "BYOK_LOAD_PLUGINS" in env else None
    blocked = _names(env.get("BYOK_BLOCK_PLUGINS", ""))
    chosen = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        names = {ep.name}
        if ep.dist is not None:
            names.add(ep.dist.name)
        if names & blocked:
            continue
        if allowed is not None and not names & allowed:
            continue
        chosen.append(ep)
    return chosen


def installed_plugin_names() -> set[str]:
    """Every name :data:`PLUGIN_VARIABLES` can use: the entry points of group ``byok`` and their
    distributions."""
    names = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        names.add(ep.name)
        if ep.dist is not None:
            names.add(ep.dist.name)
    return names


def unmatched_plugin_names(environ: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """The names in ``BYOK_LOAD_PLUGINS`` and ``BYOK_BLOCK_PLUGINS`` that match no installed
    plugin, by variable (only the variables with such names), each list sorted."""
    env = os.environ if environ is None else environ
    installed = installed_plugin_names()
    found = {}
    for variable in PLUGIN_VARIABLES:
        unknown = sorted(_names(env.get(variable, "")) - installed)
        if unknown:
            found[variable] = unknown
    return found


def add_to(
    pm: pluggy.PluginManager,
    *,
    load_entrypoints: bool = True,
    environ: Mapping[str, str] | None = None,
) -> pluggy.PluginManager:
    """Add the ``byok`` hook specs to a host's own plugin manager and load the installed plugins.

    Call it once per manager. Every plugin, including those registered afterwards, then receives
    ``byok_manager_ready(pm)``.

    :param pm: the host's manager; its project name must be ``byok`` for the markers to match.
    :param load_entrypoints: load the plugins of entry-point group ``byok``.
    :param environ: where ``BYOK_LOAD_PLUGINS`` / ``BYOK_BLOCK_PLUGINS`` are read (``os.environ``).
    :returns: the same manager.
    """
    if pm.project_name != PROJECT_NAME:
        raise ValueError(
            f"plugin manager project is {pm.project_name!r}; byok hooks need project {PROJECT_NAME!r}"
        )
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        for variable, unknown in unmatched_plugin_names(environ).items():
            log.warning(
                "%s names %s, which no installed plugin is called (installed: %s)",
                variable,
                ", ".join(unknown),
                ", ".join(sorted(installed_plugin_names())) or "none",
            )
        chosen = {ep.name for ep in selected_plugins(environ)}
        skipped = {
            ep.name
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
            if ep.name not in chosen and not pm.is_blocked(ep.name)
        }
        for name in skipped:
            pm.set_blocked(name)
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        finally:
            for name in skipped:
                pm.unblock(name)
    pm.check_pending()
    pm.hook.byok_manager_ready.call_historic(kwargs={"pm": pm})
    return pm
