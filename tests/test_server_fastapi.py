"""The README's example, run: a FastAPI host mounts the key API under its own authentication."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import Actor, Role
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from server_support import Stack, live_server, make_stack, master_key_value, random_key

from byok_plugin.server import create_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- a host with its own users and sessions (what the README shows) -------------------------


@dataclass
class User:
    id: str
    memberships: dict[str, str]  # workspace id -> "admin" | "member"


USERS = {"ann": User("ann", {"acme": "admin"}), "ben": User("ben", {"acme": "member"})}


def build_host(stack: Stack) -> FastAPI:
    sessions: dict[str, User] = {}  # the host's session store
    host = FastAPI()

    def user_from(request: Request) -> User | None:
        return sessions.get(request.cookies.get("session", ""))

    def current_user(request: Request) -> User:
        user = user_from(request)
        if user is None:
            raise HTTPException(status_code=401)
        return user

    @host.post("/login/{name}")
    def login(name: str, response: Response) -> dict[str, str]:
        token = secrets.token_urlsafe(16)
        sessions[token] = USERS[name]
        response.set_cookie("session", token, httponly=True, samesite="lax")
        return {"user": name}

    @host.get("/whoami")
    def whoami(user: User = Depends(current_user)) -> dict[str, str]:  # noqa: B008
        return {"user": user.id}

    # the BYOK API and page, under the host's own authentication
    def identify(request: Request) -> Actor | None:
        user = user_from(request)
        if user is None:
            return None
        return Actor(id=user.id, roles={ws: Role(role) for ws, role in user.memberships.items()})

    host.mount("/byok", create_app(stack.app, identify=identify, pm=stack.pm))
    return host


@pytest.fixture
def stack(tmp_path: Path, sqlite_url: str) -> Iterator[Stack]:
    built = make_stack(tmp_path, sqlite_url, master_keys=master_key_value())
    yield built
    built.app.close()


KEYS = "/byok/api/workspaces/acme/byok-keys"


async def test_a_fastapi_host_mounts_the_api_with_its_own_authentication(stack: Stack) -> None:
    host = build_host(stack)
    transport = httpx.ASGITransport(app=host)
    api_key = random_key("anthropic")
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://host.test") as ann,
        httpx.AsyncClient(transport=transport, base_url="http://host.test") as ben,
        httpx.AsyncClient(transport=transport, base_url="http://host.test") as anonymous,
    ):
        assert (await ann.post("/login/ann")).status_code == 200
        assert (await ben.post("/login/ben")).status_code == 200
        assert (await ann.get("/whoami")).json() == {"user": "ann"}

        assert (await anonymous.get(KEYS)).status_code == 401
        created = await ann.post(KEYS, json={"provider": "anthropic", "api_key": api_key})
        assert created.status_code == 201
        assert created.json()["key"]["created_by"] == "ann"
        as_ben = await ben.get(KEYS)
        assert as_ben.status_code == 200
        assert as_ben.json()["can_manage"] is False
        assert [k["provider"] for k in as_ben.json()["keys"]] == ["anthropic"]
        assert (
            await ben.request("DELETE", KEYS, json={"provider": "anthropic"})
        ).status_code == 403
        # the page lives beside the API under the mount point
        page = await ben.get("/byok/settings/")
        assert page.status_code == 200
        assert (await ann.get("/byok/api/byok/health")).json()["status"] == "ok"
        for response in (created, as_ben):
            assert api_key not in response.text


def test_the_fastapi_host_over_real_http(stack: Stack) -> None:
    with live_server(build_host(stack)) as base, httpx.Client(base_url=base) as ann:
        ann.post("/login/ann")
        created = ann.post(KEYS, json={"provider": "openai", "api_key": random_key()})
        assert created.status_code == 201
        key_id = created.json()["key"]["id"]
        disabled = ann.patch(f"{KEYS}/{key_id}", json={"status": "disabled"})
        assert disabled.json()["key"]["status"] == "disabled"
        assert ann.get(f"{base}/byok/settings/").status_code == 200
