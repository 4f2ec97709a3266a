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
