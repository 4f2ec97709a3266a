"""What the HTTP tests share: a real store, a key checker plugin, identities, a live server.

Imported by tests/test_server*.py and tests/test_settings_page.py (pytest puts tests/ on the path).
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pluggy
import pytest
import uvicorn
from byok_hookspecs import Actor, AuditEvent, KeyCheck, KeyCheckStatus, Role, hookimpl

from byok_plugin.app import App, utc_now
from byok_plugin.manager import plugin_manager_for
from byok_plugin.server import create_app
from byok_plugin.server.identity import Identify
from byok_plugin.settings import Settings

ADMIN_TOKEN = "admin-" + secrets.token_urlsafe(16)
MEMBER_TOKEN = "member-" + secrets.token_urlsafe(16)
OTHER_ADMIN_TOKEN = "other-" + secrets.token_urlsafe(16)

ADMIN = Actor("alice", {"acme": Role.ADMIN})
MEMBER = Actor("bob", {"acme": Role.MEMBER})
#: an admin of another workspace, and only of it
OTHER_ADMIN = Actor("mallory", {"globex": Role.ADMIN})


def master_key_value(key_id: str = "mk-test") -> str:
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(32)).decode('ascii')}"


def random_key(provider: str = "openai") -> str:
    """A random key of the provider's usual shape (never a real one)."""
    body = secrets.token_hex(24)
    return {
        "openai": f"sk-proj-{body}",
        "anthropic": f"sk-ant-api03-{body}",
        "google": f"AIza{secrets.token_hex(18)[:35]}",
        "mistral": secrets.token_hex(16),
        "exa": "0e7f4c2a-1b3d-4e5f-8a9b-" + secrets.token_hex(6),
    }[provider]


@dataclass
class KeyChecker:
    """A ``byok_validate_key`` plugin: valid unless the test listed the key as refused or
    unreachable. Tests never reach a real provider."""

    refused: set[str] = field(default_factory=set)
    unreachable: set[str] = field(default_factory=set)
    seen: int = 0

    @hookimpl(tryfirst=True)
    def byok_validate_key(self, provider: str, api_key: str) -> KeyCheck:
        self.seen += 1
        if api_key in self.refused:
            return KeyCheck(provider, KeyCheckStatus.INVALID, "incorrect API key provided")
        if api_key in self.unreachable:
            return KeyCheck(provider, KeyCheckStatus.UNREACHABLE, "connection refused")
        return KeyCheck(provider, KeyCheckStatus.VALID, "the provider accepted the key")


@dataclass
class AuditRecorder:
    """A ``byok_audit`` plugin that keeps every event."""

    events: list[AuditEvent] = field(default_factory=list)

    @hookimpl
    def byok_audit(self, event: AuditEvent) -> None:
        self.events.append(event)


@dataclass
class Stack:
    """One configured byok-plugin: settings, app, plugin manager and the recording plugins."""

    app: App
    pm: pluggy.PluginManager
    checker: KeyChecker
    audit: AuditRecorder


def make_stack(
    home: Path,
    database_url: str,
    *,
    master_keys: str | None = None,
    clock: Callable[[], datetime] = utc_now,
    **env: str,
) -> Stack:
    environ = {
        "BYOK_HOME": str(home),
        "BYOK_DATABASE_URL": database_url,
        # belt and braces: the checker plugin answers first, and the default never goes online
        "BYOK_VALIDATE_KEYS": "0",
        **env,
    }
    if master_keys is not None:
        environ["BYOK_ENCRYPTION_KEYS"] = master_keys
    app = App(Settings.from_environ(environ), clock=clock)
    pm = plugin_manager_for(app, load_entrypoints=False)
    checker = KeyChecker()
    audit = AuditRecorder()
    pm.register(checker, name="test-key-checker")
    pm.register(audit, name="test-audit")
    return Stack(app=app, pm=pm, checker=checker, audit=audit)


@contextlib.asynccontextmanager
async def asgi_client(stack: Stack, identify: Identify) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the stack's HTTP app, in process (no socket)."""
    asgi = create_app(stack.app, identify=identify, pm=stack.pm)
    transport = httpx.ASGITransport(app=asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(asgi: Any) -> Iterator[str]:
    """Run ``asgi`` under a real uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    # IPPROTO_TCP so that asyncio sets TCP_NODELAY (else ~40 ms per keep-alive answer)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(asgi, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve_environment(tmp_path: Path) -> dict[str, str]:
    """The environment of a ``byok serve`` subprocess: its own home, a master key, no live check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYOK_")}
    env.update(
        BYOK_HOME=str(tmp_path / "home"),
        BYOK_ENCRYPTION_KEYS=master_key_value(),
        BYOK_VALIDATE_KEYS="0",
        BYOK_LOAD_PLUGINS="byok_plugin",
        PYTHONUNBUFFERED="1",
    )
    return env


class Serve:
    """``byok serve`` in a subprocess, its output collected in the background."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "byok_plugin", "serve", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._url = threading.Event()
        threading.Thread(
            target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True
        ).start()
        threading.Thread(
            target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True
        ).start()

    def _pump(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            if "byok serve: open " in line:
                self._url.set()

    def url(self) -> str:
        if not self._url.wait(30):
            self.stop()
            pytest.fail("byok serve printed no URL:\n" + "".join(self.stdout + self.stderr))
        # the link goes to stderr, apart from uvicorn's access log on stdout
        line = next(line for line in self.stderr if "byok serve: open " in line)
        return line.split("byok serve: open ", 1)[1].strip()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return "".join(self.stdout + self.stderr)
