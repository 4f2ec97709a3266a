"""A pytest plugin: the ``emulator`` fixture. Register it with ``pytest_plugins`` in conftest.py.

One emulator server runs for the whole session (``emulator_server``); the ``emulator`` fixture hands
it to a test with no keys, no faults and an empty call log, and clears them again afterwards::

    def test_x(emulator):
        key = emulator.new_key("openai", label="workspace-a")
        ... # call emulator.base_url("openai") with key
        assert emulator.calls("openai", api_key=key)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from byok_plugin.host.emulator.server import EmulatorServer


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    """The session's emulator, on a free loopback port (use the ``emulator`` fixture instead)."""
    with EmulatorServer() as server:
        yield server


@pytest.fixture
def emulator(emulator_server: EmulatorServer) -> Iterator[EmulatorServer]:
    """A running emulator with no keys, no faults and no recorded calls."""
    emulator_server.state.accept_any_key = False
    emulator_server.state.reset(keys=True)
    yield emulator_server
    emulator_server.state.accept_any_key = False
    emulator_server.state.reset(keys=True)
