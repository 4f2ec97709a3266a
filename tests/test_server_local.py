"""``byok serve``'s sign-in, in process: the one-time link, its lifetime, and the session.

The clock is the test's: a link or a session expires when the test moves time on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import Actor
from server_support import Stack, make_stack, master_key_value

from byok_plugin.server import LocalLogin
from byok_plugin.server.local import create_local_app

pytestmark = pytest.mark.anyio

OPERATOR = Actor("local-operator", operator=True)
ME = "/api/byok/me"
SESSION = "/api/byok/session"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Clock:
    """Monotonic seconds the test moves on by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta.total_seconds()


@pytest.fixture
def stack(tmp_path: Path, sqlite_url: str) -> Iterator[Stack]:
    built = make_stack(tmp_path, sqlite_url, master_keys=master_key_value())
    yield built
    built.app.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _client(stack: Stack, login: LocalLogin) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_local_app(stack.app, login, pm=stack.pm)),
        base_url="http://127.0.0.1:8765",
    )


@pytest.fixture
async def browser(
    stack: Stack, clock: Clock
) -> AsyncIterator[tuple[httpx.AsyncClient, LocalLogin]]:
    login = LocalLogin(OPERATOR, link_lifetime=timedelta(minutes=10), clock=clock)
    async with _client(stack, login) as client:
        yield client, login


async def test_the_sign_in_link_expires_after_its_lifetime(browser, clock: Clock) -> None:
    client, login = browser
    token = login.issue_token()
    clock.advance(timedelta(minutes=10, seconds=1))
    refused = await client.post(SESSION, json={"token": token})
    assert refused.status_code == 401
    assert "expired" in refused.json()["error"]["message"]


async def test_the_sign_in_link_works_within_its_lifetime(browser, clock: Clock) -> None:
    client, login = browser
    token = login.issue_token()
    clock.advance(timedelta(minutes=9, seconds=59))
    assert (await client.post(SESSION, json={"token": token})).status_code in (200, 204)


def test_the_link_lifetime_must_be_positive() -> None:
    with pytest.raises(ValueError, match="link_lifetime"):
        LocalLogin(OPERATOR, link_lifetime=timedelta(0))


async def _sign_in(client: httpx.AsyncClient, login: LocalLogin) -> str:
    response = await client.post(SESSION, json={"token": login.issue_token()})
    assert response.status_code == 200, response.text
    assert "set-cookie" not in response.headers
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["idle_timeout_seconds"] == 12 * 3600
    return body["session"]


def _bearer(session: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {session}"}


async def test_the_session_is_a_bearer_token_not_a_cookie(browser) -> None:
    """A cookie for 127.0.0.1 goes to every port on it (another user's server included); a token
    the page keeps in sessionStorage goes only where the page sends it."""
    client, login = browser
    session = await _sign_in(client, login)
    assert client.cookies == {}
    me = await client.get(ME, headers=_bearer(session))
    assert me.status_code == 200
    assert me.json()["id"] == "local-operator"
    assert (await client.get(ME)).status_code == 401
    # the session id is no cookie either: sent as one, it is ignored
    as_cookie = await client.get(ME, headers={"Cookie": f"byok_session={session}"})
    assert as_cookie.status_code == 401
    assert (await client.get(ME, headers=_bearer(session + "x"))).status_code == 401


async def test_a_session_ends_after_12_hours_idle(browser, clock: Clock) -> None:
    client, login = browser
    session = await _sign_in(client, login)
    for _ in range(3):  # each use keeps it alive for another 12 hours
        clock.advance(timedelta(hours=11, minutes=59))
        assert (await client.get(ME, headers=_bearer(session))).status_code == 200
    clock.advance(timedelta(hours=12, seconds=1))
    ended = await client.get(ME, headers=_bearer(session))
    assert ended.status_code == 401
    clock.advance(timedelta(seconds=-2))  # and it stays ended
    assert (await client.get(ME, headers=_bearer(session))).status_code == 401


async def test_signing_out_ends_the_session(browser) -> None:
    client, login = browser
    session = await _sign_in(client, login)
    # a mutating request keeps the JSON and same-origin rules, sign-out included
    not_json = await client.request("DELETE", SESSION, headers=_bearer(session))
    assert not_json.status_code == 415
    foreign = await client.request(
        "DELETE",
        SESSION,
        json={},
        headers={**_bearer(session), "Origin": "http://127.0.0.1:1"},
    )
    assert foreign.status_code == 403
    assert (await client.get(ME, headers=_bearer(session))).status_code == 200

    signed_out = await client.request("DELETE", SESSION, json={}, headers=_bearer(session))
    assert signed_out.status_code == 204
    assert (await client.get(ME, headers=_bearer(session))).status_code == 401
    # signing out again (or without a session) is harmless
    again = await client.request("DELETE", SESSION, json={}, headers=_bearer(session))
    assert again.status_code == 204
    assert (await client.request("DELETE", SESSION, json={})).status_code == 204


async def test_signing_out_one_session_keeps_another(browser) -> None:
    client, login = browser
    first = await _sign_in(client, login)
    second = await _sign_in(client, login)
    await client.request("DELETE", SESSION, json={}, headers=_bearer(first))
    assert (await client.get(ME, headers=_bearer(second))).status_code == 200
