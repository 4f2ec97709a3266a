"""The key API on a real uvicorn server on loopback, and ``byok serve`` as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from server_support import (
    ADMIN,
    ADMIN_TOKEN,
    MEMBER,
    MEMBER_TOKEN,
    OTHER_ADMIN,
    OTHER_ADMIN_TOKEN,
    Serve,
    Stack,
    free_port,
    live_server,
    make_stack,
    master_key_value,
    random_key,
    serve_environment,
)

from byok_plugin.server import BearerTokens, create_app

KEYS = "/api/workspaces/acme/byok-keys"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AS_MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
AS_OTHER = {"Authorization": f"Bearer {OTHER_ADMIN_TOKEN}"}


@pytest.fixture
def stack(tmp_path: Path, sqlite_url: str) -> Iterator[Stack]:
    built = make_stack(tmp_path, sqlite_url, master_keys=master_key_value())
    yield built
    built.app.close()


def code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def test_every_route_and_status_over_real_http(stack: Stack) -> None:
    identify = BearerTokens(
        {ADMIN_TOKEN: ADMIN, MEMBER_TOKEN: MEMBER, OTHER_ADMIN_TOKEN: OTHER_ADMIN}
    )
    asgi = create_app(stack.app, identify=identify, pm=stack.pm)
    sent: list[str] = []
    seen: list[httpx.Response] = []

    def key() -> str:
        sent.append(random_key())
        return sent[-1]

    with (
        live_server(asgi) as base,
        httpx.Client(base_url=base, event_hooks={"response": [lambda r: seen.append(r)]}) as http,
    ):
        assert http.get("/api/byok/health").status_code == 200
        assert http.get("/api/byok/openapi.json").json()["openapi"].startswith("3.1")
        assert http.get("/api/byok/providers", headers=AS_MEMBER).status_code == 200
        assert http.get("/api/byok/me", headers=AS_ADMIN).json()["id"] == "alice"

        # 401: missing and forged identities
        assert code(http.get(KEYS)) == "unauthenticated"
        assert http.get(KEYS, headers={"Authorization": "Bearer forged"}).status_code == 401

        # 201, 200 (replace), 403 (member), 403 (admin of another workspace)
        created = http.post(KEYS, json={"provider": "openai", "api_key": key()}, headers=AS_ADMIN)
        assert created.status_code == 201
        replaced = http.post(KEYS, json={"provider": "openai", "api_key": key()}, headers=AS_ADMIN)
        assert replaced.status_code == 200
        key_id = replaced.json()["key"]["id"]
        assert (
            http.post(
                KEYS, json={"provider": "openai", "api_key": key()}, headers=AS_MEMBER
            ).status_code
            == 403
        )
        assert http.get(KEYS, headers=AS_OTHER).status_code == 403
        assert (
            http.patch(
                f"{KEYS}/{key_id}", json={"status": "disabled"}, headers=AS_OTHER
            ).status_code
            == 403
        )

        # the member reads the masked list
        listed = http.get(KEYS, headers=AS_MEMBER).json()
        assert [k["id"] for k in listed["keys"]] == [key_id]
        assert listed["can_manage"] is False

        # PATCH and test
        assert (
            http.patch(
                f"{KEYS}/{key_id}", json={"status": "disabled"}, headers=AS_ADMIN
            ).status_code
            == 200
        )
        assert (
            http.post(f"{KEYS}/{key_id}/test", json={}, headers=AS_ADMIN).json()["status"]
            == "valid"
        )
        assert (
            http.post(f"{KEYS}/key_nothere12345/test", json={}, headers=AS_ADMIN).status_code == 404
        )

        # 415, 413 (declared and streamed), 400, 422, 405
        wrong_type = http.post(
            KEYS,
            content=b'{"provider": "openai", "api_key": "x"}',
            headers={**AS_ADMIN, "Content-Type": "text/plain"},
        )
        assert (wrong_type.status_code, code(wrong_type)) == (415, "unsupported_media_type")
        big = http.post(
            KEYS, json={"provider": "openai", "api_key": "k" * 40_000}, headers=AS_ADMIN
        )
        assert (big.status_code, code(big)) == (413, "payload_too_large")

        def chunks() -> Iterator[bytes]:
            yield b'{"provider": "openai", "api_key": "'
            for _ in range(64):
                yield b"k" * 1024
            yield b'"}'

        streamed = http.post(
            KEYS, content=chunks(), headers={**AS_ADMIN, "Content-Type": "application/json"}
        )
        assert (streamed.status_code, code(streamed)) == (413, "payload_too_large")
        bad_json = http.post(
            KEYS, content=b"{", headers={**AS_ADMIN, "Content-Type": "application/json"}
        )
        assert (bad_json.status_code, code(bad_json)) == (400, "invalid_json")
        invalid = http.post(KEYS, json={"provider": "openai"}, headers=AS_ADMIN)
        assert (invalid.status_code, invalid.json()["error"]["field"]) == (422, "api_key")
        assert http.put(KEYS, json={}, headers=AS_ADMIN).status_code == 405

        # DELETE, then 404 when nothing matches
        deleted = http.request(
            "DELETE", KEYS, json={"provider": "openai", "key_id": key_id}, headers=AS_ADMIN
        )
        assert deleted.json() == {"deleted": [key_id]}
        again = http.request("DELETE", KEYS, json={"provider": "openai"}, headers=AS_ADMIN)
        assert (again.status_code, code(again)) == (404, "key_not_found")

    statuses = {r.status_code for r in seen}
    assert statuses >= {200, 201, 400, 401, 403, 404, 405, 413, 415, 422}
    for response in seen:
        shown = response.text + repr(dict(response.headers))
        assert not any(k in shown for k in sent)


# --- byok serve ---------------------------------------------------------------------------


@pytest.fixture
def serve_env(tmp_path: Path) -> dict[str, str]:
    return serve_environment(tmp_path)


def test_byok_serve_signs_in_the_browser_once_and_manages_the_default_store(
    serve_env: dict[str, str],
) -> None:
    serve = Serve(serve_env, "--port", "0", "--workspace", "acme")
    api_key = random_key()
    try:
        url = serve.url()
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1"
        assert parts.path == "/settings/"
        assert parts.query == "workspace=acme"
        assert parts.fragment.startswith("login=")
        token = parts.fragment.removeprefix("login=")
        base = f"{parts.scheme}://{parts.netloc}"
        keys = f"{base}/api/workspaces/acme/byok-keys"
        with httpx.Client() as browser:
            page = browser.get(f"{base}/settings/?workspace=acme")
            assert page.status_code == 200
            assert "Provider keys" in page.text
            # not signed in yet: the workspace id in the path is not enough
            assert code(browser.get(keys)) == "unauthenticated"
            assert (
                browser.post(f"{base}/api/byok/session", json={"token": "guess"}).status_code == 401
            )
            signed_in = browser.post(f"{base}/api/byok/session", json={"token": token})
            assert signed_in.status_code == 200
            # no cookie: it would reach every other server on 127.0.0.1, whatever its port
            assert "set-cookie" not in signed_in.headers
            session = signed_in.json()["session"]
            assert browser.get(f"{base}/api/byok/me").status_code == 401
            browser.headers["Authorization"] = f"Bearer {session}"
            assert browser.get(f"{base}/api/byok/me").json() == {
                "id": "local-operator",
                "operator": True,
                "workspaces": {},
            }
            # the token worked once
            with httpx.Client() as second_browser:
                reused = second_browser.post(f"{base}/api/byok/session", json={"token": token})
                assert code(reused) == "unauthenticated"
                assert second_browser.get(keys).status_code == 401

            created = browser.post(keys, json={"provider": "openai", "api_key": api_key})
            assert created.status_code == 201, created.text
            listed = browser.get(keys).json()
            assert listed["can_manage"] is True
            assert listed["keys"][0]["hint"] == f"{api_key[:6]}...{api_key[-4:]}"
            assert listed["keys"][0]["created_by"] == "local-operator"

            # a DNS-rebinding page's requests carry its own host name
            rebound = browser.get(keys, headers={"Host": "attacker.example"})
            assert (rebound.status_code, code(rebound)) == (400, "invalid_host")
            # a page of another local origin may not change anything, even with the session
            cross = browser.request(
                "DELETE",
                keys,
                json={"provider": "openai"},
                headers={"Origin": "http://127.0.0.1:1"},
            )
            assert (cross.status_code, code(cross)) == (403, "forbidden")
            same = browser.request(
                "DELETE", keys, json={"provider": "openai"}, headers={"Origin": base}
            )
            assert same.status_code == 200
    finally:
        output = serve.stop()
    assert api_key not in output
    # the token travels in the URL fragment only: printed once, never in an access log line;
    # the session only in a header and a response body, never in a log line either
    assert "POST /api/byok/session HTTP/1.1" in output
    assert [line for line in output.splitlines() if token in line] == [f"byok serve: open {url}"]
    assert session not in output
    assert "byok serve: stopped" in output


def test_byok_serve_prints_the_link_to_stderr_with_its_lifetime(
    serve_env: dict[str, str],
) -> None:
    """The sign-in link is a credential: not on stdout, where uvicorn writes its access log (and
    which a user may redirect to a file); it says how long it works."""
    serve = Serve(serve_env, "--port", "0", "--link-minutes", "3")
    try:
        url = serve.url()
        token = urlsplit(url).fragment.removeprefix("login=")
        with httpx.Client() as browser:  # a request, so that the access log has a line
            parts = urlsplit(url)
            assert browser.get(f"{parts.scheme}://{parts.netloc}/settings/").status_code == 200
    finally:
        serve.stop()
    stdout, stderr = "".join(serve.stdout), "".join(serve.stderr)
    assert "GET /settings/ HTTP/1.1" in stdout
    assert token not in stdout
    assert f"byok serve: open {url}\n" in stderr
    assert "3 minutes" in stderr


def test_byok_serve_refuses_a_link_lifetime_of_zero(serve_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "byok_plugin", "serve", "--port", "0", "--link-minutes", "0"],
        env=serve_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--link-minutes" in result.stderr
    assert "not in the range" in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.2", "::1", "localhost"])
def test_byok_serve_answers_on_any_loopback_address_it_accepts(
    serve_env: dict[str, str], host: str
) -> None:
    """--host takes any loopback address; the Host check must then accept that address too."""
    serve = Serve(serve_env, "--host", host, "--port", "0")
    try:
        parts = urlsplit(serve.url())
        response = httpx.get(f"{parts.scheme}://{parts.netloc}/api/byok/health")
    finally:
        serve.stop()
    assert response.status_code == 200, response.text


def test_byok_serve_listens_on_loopback_only(serve_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "byok_plugin", "serve", "--host", "0.0.0.0", "--port", "0"],
        env=serve_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr
    assert "Traceback" not in result.stderr


def test_byok_serve_says_when_the_port_is_taken(serve_env: dict[str, str]) -> None:
    port = free_port()
    first = Serve(serve_env, "--port", str(port))
    try:
        first.url()
        result = subprocess.run(
            [sys.executable, "-m", "byok_plugin", "serve", "--port", str(port)],
            env=serve_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        first.stop()
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_byok_serve_warns_without_a_master_key(serve_env: dict[str, str]) -> None:
    del serve_env["BYOK_ENCRYPTION_KEYS"]
    serve = Serve(serve_env, "--port", "0")
    try:
        serve.url()
    finally:
        output = serve.stop()
    assert "byok init" in output
    assert "keys can be listed but not added" in output


def test_byok_serve_listens_on_a_tcp_socket_that_gets_no_delay() -> None:
    """asyncio sets TCP_NODELAY only on sockets created as IPPROTO_TCP; without it every
    keep-alive answer of uvicorn (headers and body written apart) waits ~40 ms for an ACK."""
    import socket

    from byok_plugin.cli.listen import listen_on

    sock = listen_on("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
