"""What the entry point ``byok = byok_plugin.entrypoint`` loads.

Its one hook puts a fresh :class:`DefaultPlugin` into each plugin manager, so that two managers in
one process never share a default plugin, its store or its manager. The plugin reads its
configuration from the environment the first time a hook needs it: loading costs nothing, and a
host that never calls a hook never opens a store.
"""

from __future__ import annotations

import pluggy
from byok_hookspecs import hookimpl

from byok_plugin.defaults import DefaultPlugin

#: the name the per-manager default plugin is registered under
DEFAULTS_NAME = "byok_plugin.defaults"


@hookimpl(trylast=True)
def byok_manager_ready(pm: pluggy.PluginManager) -> None:
    if pm.get_plugin(DEFAULTS_NAME) is None and not pm.is_blocked(DEFAULTS_NAME):
        pm.register(DefaultPlugin(), name=DEFAULTS_NAME)
