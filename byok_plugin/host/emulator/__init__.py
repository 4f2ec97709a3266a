"""A local provider emulator: OpenAI, Anthropic, Google Gemini, Mistral and Exa on loopback.

It speaks each provider's wire format (streaming included), checks keys, answers deterministic
content with realistic usage, injects faults on request and records every call::

    from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind

    with EmulatorServer() as emulator:
        emulator.add_key("openai", key, label="workspace-a")
        emulator.add_fault(Fault(FaultKind.RATE_LIMIT, provider="openai", retry_after=0))
        env = emulator.environ()           # BYOK_OPENAI_BASE_URL=... for the provider clients
        ...
        assert emulator.calls("openai")[-1].key_label == "workspace-a"

Tests get it from the ``emulator`` pytest fixture (:mod:`byok_plugin.host.emulator.testing`).
"""

from __future__ import annotations

from byok_plugin.host.emulator.app import BASE_PATHS, build_app
from byok_plugin.host.emulator.faults import Fault, FaultKind, key_fingerprint
from byok_plugin.host.emulator.server import BASE_URL_VARS, EmulatorServer
from byok_plugin.host.emulator.state import PROVIDERS, EmulatorState, RecordedCall

__all__ = [
    "BASE_PATHS",
    "BASE_URL_VARS",
    "PROVIDERS",
    "EmulatorServer",
    "EmulatorState",
    "Fault",
    "FaultKind",
    "RecordedCall",
    "build_app",
    "key_fingerprint",
]
