"""The default live key check, over real HTTP on loopback: the provider emulator, and a tiny
scripted server for the answers the emulator does not give (echoed keys, 429, slow, 500)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from byok_hookspecs import KeyCheckStatus
from keys_support import make_app, master_key, random_key, service_for, windows

from byok_plugin.core.key_format import KNOWN_PROVIDERS
from byok_plugin.keys.validation import KeyValidator

# --- a scripted loopback server -------------------------------------------------------------


class Scripted:
    """A loopback HTTP server answering with ``respond(handler) -> (status, body, delay)`` and
    recording each request's method, path and headers."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler], tuple[int, Any, float]]):
        self.requests: list[dict[str, Any]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                scripted.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                status, payload, delay = respond(self)
                if delay:
                    time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(respond: Callable[[BaseHTTPRequestHandler], tuple[int, Any, float]]) -> Scripted:
        servers.append(Scripted(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _validator(base_url: str, **kwargs: Any) -> KeyValidator:
    return KeyValidator(base_urls=dict.fromkeys(KNOWN_PROVIDERS, base_url), **kwargs)


# --- against the provider emulator ---------------------------------------------------------


@pytest.mark.parametrize("provider", KNOWN_PROVIDERS)
def test_hook_byok_validate_key_against_the_emulator(
    provider: str, emulator, tmp_path: Path
) -> None:
    good = random_key(provider)
    emulator.add_key(provider, good)
    bad = random_key(provider)
    app = make_app(
        f"sqlite:///{tmp_path / 'byok.db'}",
        tmp_path,
        keys=[master_key()],
        validate=True,
        extra=emulator.environ(),
    )
    _, pm = service_for(app)
    accepted = pm.hook.byok_validate_key(provider=provider, api_key=good)
    refused = pm.hook.byok_validate_key(provider=provider, api_key=bad)
    assert accepted.status is KeyCheckStatus.VALID, accepted.message
    assert refused.status is KeyCheckStatus.INVALID, refused.message
    assert "refused the key (HTTP 40" in refused.message
    assert not any(w in refused.message + repr(refused) for w in windows(bad))
    calls = emulator.calls(provider)
    assert len(calls) == 2
    assert calls[0].used_key(good)
    assert calls[1].used_key(bad)


def test_hook_byok_validate_key_is_skipped_offline(tmp_path: Path, scripted) -> None:
    server = scripted(lambda h: (200, {}, 0))
    app = make_app(
        f"sqlite:///{tmp_path / 'byok.db'}",
        tmp_path,
        keys=[master_key()],
        validate=False,
        extra={"BYOK_OPENAI_BASE_URL": server.url},
    )
    _, pm = service_for(app)
    check = pm.hook.byok_validate_key(provider="openai", api_key=random_key("openai"))
    assert check.status is KeyCheckStatus.SKIPPED
    assert "BYOK_VALIDATE_KEYS=0" in check.message
    assert server.requests == []


def test_hook_byok_validate_key_answers_nothing_for_an_unknown_provider(tmp_path: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'byok.db'}", tmp_path, validate=True)
    _, pm = service_for(app)
    assert pm.hook.byok_validate_key(provider="acme-llm", api_key="x" * 30) is None


# --- the wire details ------------------------------------------------------------------------


EXPECTED = {
    "openai": ("GET", "/v1/models", "authorization", "Bearer {key}"),
    "anthropic": ("GET", "/v1/models", "x-api-key", "{key}"),
    "google": ("GET", "/v1beta/models?pageSize=1", "x-goog-api-key", "{key}"),
    "mistral": ("GET", "/v1/models", "authorization", "Bearer {key}"),
    "exa": ("POST", "/search", "x-api-key", "{key}"),
}


@pytest.mark.parametrize("provider", KNOWN_PROVIDERS)
@pytest.mark.parametrize("suffix", ["", "/v1", "/v1beta"])
def test_each_provider_gets_its_own_request(provider: str, suffix: str, scripted) -> None:
    server = scripted(lambda h: (200, {"data": []}, 0))
    key = random_key(provider)
    check = _validator(server.url + suffix).check(provider, key)
    assert check.status is KeyCheckStatus.VALID
    (request,) = server.requests
    method, path, header, value = EXPECTED[provider]
    version = path.split("/")[1]
    expected_path = path if suffix in ("", "/" + version) else suffix + path
    assert (request["method"], request["path"]) == (method, expected_path)
    assert request["headers"][header] == value.format(key=key)
    assert key not in request["path"]  # never in a URL (URLs end up in logs)
    if provider == "anthropic":
        assert request["headers"]["anthropic-version"] == "2023-06-01"
    if provider == "exa":
        assert json.loads(request["body"])["numResults"] == 1


def test_the_providers_message_is_kept_without_the_key(scripted) -> None:
    key = random_key("openai")
    masked = f"{key[:3]}*****{key[-6:]}"  # OpenAI echoes a partly masked key
    server = scripted(
        lambda h: (
            401,
            {"error": {"message": f"Incorrect API key provided: {masked}. See the docs."}},
            0,
        )
    )
    check = _validator(server.url).check("openai", key)
    assert check.status is KeyCheckStatus.INVALID
    assert "Incorrect API key provided: [redacted]" in check.message
    assert key[-6:] not in check.message


def test_gemini_reports_a_bad_key_as_400(scripted) -> None:
    body = {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [{"reason": "API_KEY_INVALID"}],
        }
    }
    server = scripted(lambda h: (400, body, 0))
    check = _validator(server.url).check("google", random_key("google"))
    assert check.status is KeyCheckStatus.INVALID
    assert "API key not valid" in check.message


@pytest.mark.parametrize(
    ("status", "expected", "words"),
    [
        (429, KeyCheckStatus.VALID, "rate-limiting"),
        (403, KeyCheckStatus.INVALID, "refused"),
        (500, KeyCheckStatus.UNREACHABLE, "HTTP 500"),
        (404, KeyCheckStatus.UNREACHABLE, "HTTP 404"),
    ],
)
def test_status_codes(status: int, expected: KeyCheckStatus, words: str, scripted) -> None:
    server = scripted(lambda h: (status, b"not json", 0))
    check = _validator(server.url).check("mistral", random_key("mistral"))
    assert check.status is expected
    assert words in check.message


def test_a_slow_provider_is_unreachable_after_the_timeout(scripted) -> None:
    server = scripted(lambda h: (200, {}, 2.0))
    started = time.monotonic()
    check = _validator(server.url, timeout=0.3).check("anthropic", random_key("anthropic"))
    assert time.monotonic() - started < 1.5
    assert check.status is KeyCheckStatus.UNREACHABLE
    assert "did not answer within 0.3s" in check.message


def test_a_closed_port_is_unreachable() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    check = _validator(f"http://127.0.0.1:{port}").check("exa", random_key("exa"))
    assert check.status is KeyCheckStatus.UNREACHABLE
    assert "ConnectError" in check.message
