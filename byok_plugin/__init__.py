"""byok-plugin: bring your own key (BYOK) for AI workflow engines, as ``byok`` pluggy hooks."""

import logging

from byok_plugin.app import App
from byok_plugin.defaults import DefaultPlugin
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

__version__ = "0.1.0"

# A library logs; the application decides where it goes (without this, Python's last-resort
# handler prints every warning on stderr). The ``byok`` command installs its own handler.
logging.getLogger("byok").addHandler(logging.NullHandler())

__all__ = ["App", "DefaultPlugin", "Settings", "__version__", "plugin_manager_for"]
