"""One module per emulated provider API, sharing the pipeline in :mod:`.base`."""

from __future__ import annotations

from byok_plugin.host.emulator.apis.anthropic import AnthropicAPI
from byok_plugin.host.emulator.apis.base import ProviderAPI
from byok_plugin.host.emulator.apis.exa import ExaAPI
from byok_plugin.host.emulator.apis.google import GoogleAPI
from byok_plugin.host.emulator.apis.mistral import MistralAPI
from byok_plugin.host.emulator.apis.openai import OpenAIAPI

API_CLASSES: tuple[type[ProviderAPI], ...] = (
    OpenAIAPI,
    AnthropicAPI,
    GoogleAPI,
    MistralAPI,
    ExaAPI,
)

__all__ = [
    "API_CLASSES",
    "AnthropicAPI",
    "ExaAPI",
    "GoogleAPI",
    "MistralAPI",
    "OpenAIAPI",
    "ProviderAPI",
]
