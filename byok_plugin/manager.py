"""A plugin manager whose default plugin is bound to a given :class:`App`."""

from __future__ import annotations

from collections.abc import Mapping

import pluggy
from byok_hookspecs import PROJECT_NAME, add_to, selected_plugins

from byok_plugin.app import App
from byok_plugin.defaults import DefaultPlugin

DEFAULT_PLUGIN_NAME = "byok_plugin"


def plugin_manager_for(
    app: App, *, load_entrypoints: bool = True, environ: Mapping[str, str] | None = None
) -> pluggy.PluginManager:
    """A manager with the default plugin bound to ``app`` and every other installed plugin.

    The default plugin is registered under its entry-point name, so the entry point's own,
    environment-configured instance is not loaded a second time. ``BYOK_BLOCK_PLUGINS`` and
    ``BYOK_LOAD_PLUGINS`` can leave it out, as any other plugin.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    env = app.settings.environ if environ is None else environ
    if any(ep.name == DEFAULT_PLUGIN_NAME for ep in selected_plugins(env)):
        pm.register(DefaultPlugin(app), name=DEFAULT_PLUGIN_NAME)
    add_to(pm, load_entrypoints=load_entrypoints, environ=env)
    return pm
