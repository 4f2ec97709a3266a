"""byok-plugin: bring your own key (BYOK) for AI workflow engines, as ``byok`` pluggy hooks."""

from byok_plugin.app import App
from byok_plugin.defaults import DefaultPlugin
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

__version__ = "0.1.0"

__all__ = ["App", "DefaultPlugin", "Settings", "__version__", "plugin_manager_for"]
