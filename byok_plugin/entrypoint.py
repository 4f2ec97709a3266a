"""The object the entry point ``byok = byok_plugin.entrypoint:plugin`` loads.

It reads its configuration from the environment the first time a hook needs it, so that loading
the plugin costs nothing and a host that never calls a hook never opens a store.
"""

from byok_plugin.defaults import DefaultPlugin

plugin = DefaultPlugin()
