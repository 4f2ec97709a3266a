"""Run the emulator: in a background thread on a free loopback port (tests, demo, benchmarks), or
in the foreground (``byok emulator``)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Self

import uvicorn
from starlette.types import ASGIApp

from byok_plugin.host.emulator.app import BASE_PATHS, LOOPBACK_HOSTS, build_app
from byok_plugin.host.emulator.faults import Fault
from byok_plugin.host.emulator.state import EmulatorState, RecordedCall

#: the environment variable each provider client reads its base URL from
BASE_URL_VARS = {p: f"BYOK_{p.upper()}_BASE_URL" for p in BASE_PATHS}


class BackgroundServer:
    """Any ASGI app served by uvicorn in a daemon thread on a (free) loopback port.

    :param app: the ASGI application.
    :param host: the address to listen on; loopback by default.
    :param port: 0 picks a free port.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = port

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says it is TCP; with proto 0, Nagle + delayed ACK add ~40 ms per call
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        sock.listen(128)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level=self._log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="byok-emulator", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> Self:
        return self.start() if self._thread is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class EmulatorServer(BackgroundServer):
    """A running emulator. Use as a context manager, or call :meth:`start` and :meth:`stop`.

    :param state: keys, faults and call log (a fresh one by default).
    :param host: the address to listen on; loopback by default.
    :param port: 0 picks a free port.
    """

    def __init__(
        self,
        state: EmulatorState | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.state = state if state is not None else EmulatorState()
        bound = f"[{host}]" if ":" in host else host
        app = build_app(self.state, allowed_hosts=(*LOOPBACK_HOSTS, bound))
        super().__init__(app, host=host, port=port, log_level=log_level)

    # addresses ----------------------------------------------------------------------------------
    def base_url(self, provider: str) -> str:
        """The base URL to give ``provider``'s client (or official SDK)."""
        return self.url + BASE_PATHS[provider]

    @property
    def base_urls(self) -> dict[str, str]:
        return {provider: self.base_url(provider) for provider in BASE_PATHS}

    def environ(self) -> dict[str, str]:
        """``BYOK_<PROVIDER>_BASE_URL`` for every provider, pointing at this emulator."""
        return {BASE_URL_VARS[p]: url for p, url in self.base_urls.items()}

    # shortcuts to the state ---------------------------------------------------------------------
    def add_key(self, provider: str, api_key: str, label: str | None = None) -> str:
        return self.state.add_key(provider, api_key, label)

    def new_key(self, provider: str, label: str | None = None) -> str:
        return self.state.new_key(provider, label)

    def add_fault(self, fault: Fault) -> Fault:
        return self.state.add_fault(fault)

    def calls(
        self, provider: str | None = None, *, api_key: str | None = None
    ) -> list[RecordedCall]:
        return self.state.calls(provider, api_key=api_key)


def describe(server_url: str) -> Mapping[str, str]:
    """``BYOK_<PROVIDER>_BASE_URL`` values for an emulator at ``server_url``."""
    return {BASE_URL_VARS[p]: server_url.rstrip("/") + path for p, path in BASE_PATHS.items()}
