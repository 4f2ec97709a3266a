"""``openapi.json`` documents every status the app answers, route by route.

Each route is driven into every answer it can give here: success, the request's own faults, the
caller's identity, a store at a closed port, a key that does not decrypt, a broken ``identify``,
and under ``byok serve`` a foreign ``Host`` or ``Origin``. Every answer's status must be listed
for its operation, and an error's ``code`` must be named in that response's description.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from byok_hookspecs import Actor
from server_support import (
    ADMIN,
    ADMIN_TOKEN,
    MEMBER,
    MEMBER_TOKEN,
    free_port,
    make_stack,
    master_key_value,
    random_key,
)

from byok_plugin.server import BearerTokens, LocalLogin, create_app, openapi_document
from byok_plugin.server.local import create_local_app

KEYS = "/api/workspaces/acme/byok-keys"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AS_MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
IDENTIFY = BearerTokens({ADMIN_TOKEN: ADMIN, MEMBER_TOKEN: MEMBER})
MISSING_KEY = "key_missing12345"

pytestmark = pytest.mark.anyio


@dataclass
class Answers:
    """Every answer of a test, by documented operation: (method, path template) -> answers."""

    document: dict[str, Any] = field(default_factory=openapi_document)
    seen: dict[tuple[str, str], list[httpx.Response]] = field(default_factory=dict)

    def operation(self, method: str, path: str) -> tuple[str, str]:
        for template, item in self.document["paths"].items():
            pattern = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
            if re.fullmatch(pattern, path) and method.lower() in item:
                return method.lower(), template
        raise AssertionError(f"{method} {path} is no documented operation")

    async def record(self, response: httpx.Response) -> None:
        await response.aread()
        op = self.operation(response.request.method, response.request.url.path)
        self.seen.setdefault(op, []).append(response)

    def client(self, asgi: Any, host: str = "testserver") -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi),
            base_url=f"http://{host}",
            event_hooks={"response": [self.record]},
        )

    def statuses(self, method: str, template: str) -> set[int]:
        return {r.status_code for r in self.seen.get((method, template), [])}

    def response_doc(self, method: str, template: str, status: int) -> dict[str, Any] | None:
        doc = self.document["paths"][template][method]["responses"].get(str(status))
        if doc is not None and "$ref" in doc:
            doc = self.document["components"]["responses"][doc["$ref"].rsplit("/", 1)[1]]
        return doc


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def answers() -> Iterator[Answers]:
    recorded = Answers()
    yield recorded
    undocumented = []
    for (method, template), responses in sorted(recorded.seen.items()):
        for response in responses:
            doc = recorded.response_doc(method, template, response.status_code)
            if doc is None:
                undocumented.append(f"{method.upper()} {template}: {response.status_code}")
                continue
            if response.status_code >= 400:
                code = response.json()["error"]["code"]
                if f"`{code}`" not in doc["description"]:
                    undocumented.append(
                        f"{method.upper()} {template}: {response.status_code} {code} is not "
                        f"named in {doc['description']!r}"
                    )
    assert sorted(set(undocumented)) == []


def _calls(key_id: str) -> list[tuple[str, str, Any]]:
    """One well-formed request per key route, as the admin would send it."""
    return [
        ("GET", KEYS, None),
        ("POST", KEYS, {"provider": "anthropic", "api_key": random_key("anthropic")}),
        ("PATCH", f"{KEYS}/{key_id}", {"status": "disabled"}),
        ("POST", f"{KEYS}/{key_id}/test", {}),
        ("DELETE", KEYS, {"provider": "openai", "key_id": key_id}),
        ("GET", "/api/workspaces/acme/byok-audit?limit=5", None),
        ("GET", "/api/workspaces/acme/byok-usage?days=7", None),
        ("GET", "/api/workspaces/acme/byok-fallback", None),
        ("PUT", "/api/workspaces/acme/byok-fallback", {"policy": "on_rate_limit"}),
    ]


ALL_GETS = ["/api/byok/health", "/api/byok/openapi.json", "/api/byok/me", "/api/byok/providers"]


async def test_a_hosted_app_answers_only_documented_statuses(
    answers: Answers, tmp_path: Path, sqlite_url: str
) -> None:
    stack = make_stack(tmp_path, sqlite_url, master_keys=master_key_value())
    try:
        async with answers.client(create_app(stack.app, identify=IDENTIFY, pm=stack.pm)) as c:
            for path in ALL_GETS:
                await c.get(path, headers=AS_ADMIN)
                await c.get(path)
            created = await c.post(
                KEYS, json={"provider": "openai", "api_key": random_key()}, headers=AS_ADMIN
            )
            key_id = created.json()["key"]["id"]
            refused = random_key()
            stack.checker.refused.add(refused)
            await c.post(KEYS, json={"provider": "openai", "api_key": refused}, headers=AS_ADMIN)
            await c.post(
                KEYS, json={"provider": "openai", "api_key": random_key()}, headers=AS_ADMIN
            )
            dup = random_key()
            await c.post(
                KEYS, json={"provider": "openai", "api_key": dup, "label": "a"}, headers=AS_ADMIN
            )
            await c.post(
                KEYS, json={"provider": "openai", "api_key": dup, "label": "b"}, headers=AS_ADMIN
            )
            await c.post(KEYS, json={"provider": "nope", "api_key": random_key()}, headers=AS_ADMIN)
            key_id = (await c.get(KEYS, headers=AS_ADMIN)).json()["keys"][0]["id"]
            for method, path, body in [*_calls(key_id), *_calls(MISSING_KEY)]:
                await c.request(method, path, json=body, headers=AS_ADMIN)
                await c.request(method, path, json=body, headers=AS_MEMBER)
                await c.request(method, path, json=body)
                await c.request(
                    method, path.replace("/acme/", "/bad%20id/"), json=body, headers=AS_ADMIN
                )
                if method != "GET":
                    headers = {**AS_ADMIN, "Content-Type": "application/json"}
                    await c.request(method, path, content=b"{", headers=headers)
                    await c.request(method, path, content=b'{"x": 1}', headers=headers)
                    await c.request(method, path, content=b"x" * 20_000, headers=headers)
                    await c.request(
                        method,
                        path,
                        content=b"{}",
                        headers={**AS_ADMIN, "Content-Type": "text/plain"},
                    )
            # the login route exists only under byok serve
            await c.post("/api/byok/session", json={"token": "x"})
            await c.request("DELETE", "/api/byok/session", json={})
    finally:
        stack.app.close()
    keys = "/api/workspaces/{workspace_id}/byok-keys"
    assert answers.statuses("post", keys) >= {200, 201, 400, 401, 403, 409, 413, 415, 422}
    assert answers.statuses("delete", keys) >= {200, 400, 401, 403, 404, 413, 415, 422}


async def test_a_store_at_a_closed_port_is_a_documented_503_without_driver_detail(
    answers: Answers, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="byok")
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://byok:pw@127.0.0.1:{port}/byok"
    stack = make_stack(tmp_path, url, master_keys=master_key_value())
    try:
        async with answers.client(create_app(stack.app, identify=IDENTIFY, pm=stack.pm)) as c:
            for method, path, body in _calls("key_abcdefgh1234"):
                response = await c.request(method, path, json=body, headers=AS_ADMIN)
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert error["code"] == "store_unavailable"
                assert error["message"] == "the key store is not available; see the server's log"
                assert "127.0.0.1" not in response.text
                assert str(port) not in response.text
    finally:
        stack.app.close()
    # the operator still learns why, from the server's log
    assert f"port {port} failed" in caplog.text
    keys = "/api/workspaces/{workspace_id}/byok-keys"
    for op in (("get", keys), ("delete", keys), ("patch", keys + "/{key_id}")):
        assert answers.statuses(*op) == {503}


async def test_server_failures_are_documented_500s(
    answers: Answers, tmp_path: Path, sqlite_url: str
) -> None:
    first = make_stack(tmp_path, sqlite_url, master_keys=master_key_value("mk-one"))
    key_id = (
        first.app.key_service(first.pm)
        .set_key(ADMIN, "acme", "openai", random_key(), test=False)
        .key.id
    )
    first.app.close()
    other = make_stack(tmp_path, sqlite_url, master_keys=master_key_value("mk-two"))

    def broken(request: Any) -> Any:
        return "alice"  # not an Actor: the host's bug, a 500

    try:
        async with answers.client(create_app(other.app, identify=IDENTIFY, pm=other.pm)) as c:
            response = await c.post(f"{KEYS}/{key_id}/test", json={}, headers=AS_ADMIN)
            assert response.status_code == 500
        async with answers.client(create_app(other.app, identify=broken, pm=other.pm)) as c:
            for path in ALL_GETS:
                await c.get(path)
            for method, path, body in _calls(key_id):
                response = await c.request(method, path, json=body)
                assert response.status_code == 500, response.text
    finally:
        other.app.close()


async def test_no_master_key_is_a_documented_503(
    answers: Answers, tmp_path: Path, sqlite_url: str
) -> None:
    keyless = make_stack(tmp_path, sqlite_url)
    try:
        async with answers.client(create_app(keyless.app, identify=IDENTIFY, pm=keyless.pm)) as c:
            for method, path, body in _calls(MISSING_KEY):
                await c.request(method, path, json=body, headers=AS_ADMIN)
    finally:
        keyless.app.close()
    assert 503 in answers.statuses("post", "/api/workspaces/{workspace_id}/byok-keys")


async def test_byok_serve_answers_only_documented_statuses(
    answers: Answers, tmp_path: Path, sqlite_url: str
) -> None:
    stack = make_stack(tmp_path, sqlite_url, master_keys=master_key_value())
    login = LocalLogin(Actor("local-operator", operator=True))
    token = login.issue_token()
    asgi = create_local_app(stack.app, login, pm=stack.pm)
    foreign = {"Origin": "http://127.0.0.1:1"}
    try:
        async with (
            answers.client(asgi, host="127.0.0.1:8765") as c,
            answers.client(asgi, host="attacker.example") as rebound,
        ):
            await c.post("/api/byok/session", json={"token": "wrong"})
            await c.post("/api/byok/session", json={"token": token}, headers=foreign)
            await c.post(
                "/api/byok/session", content=b"{", headers={"Content-Type": "application/json"}
            )
            signed_in = await c.post("/api/byok/session", json={"token": token})
            bearer = {"Authorization": f"Bearer {signed_in.json()['session']}"}
            await c.request("DELETE", "/api/byok/session", json={}, headers={**bearer, **foreign})
            await c.request("DELETE", "/api/byok/session", content=b"{}", headers=bearer)
            await c.request("DELETE", "/api/byok/session", json={"x": 1}, headers=bearer)
            await c.request("DELETE", "/api/byok/session", json={}, headers=bearer)
            await rebound.request("DELETE", "/api/byok/session", json={})
            for path in ALL_GETS:
                await rebound.get(path)
            await rebound.post("/api/byok/session", json={"token": token})
            for method, path, body in _calls(MISSING_KEY):
                await rebound.request(method, path, json=body)
                if method != "GET":
                    response = await c.request(method, path, json=body, headers=foreign)
                    assert response.status_code == 403
    finally:
        stack.app.close()
    for (_method, _template), responses in answers.seen.items():
        if any(r.request.url.host == "attacker.example" for r in responses):
            assert 400 in {r.status_code for r in responses}
    assert answers.statuses("post", "/api/byok/session") >= {200, 400, 401, 403}
    assert answers.statuses("delete", "/api/byok/session") >= {204, 400, 403, 415, 422}
