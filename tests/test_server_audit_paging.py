"""The audit route pages beyond one read: ``older`` is the cursor of the next page, ``before=``
takes it back; on a real store (SQLite and PostgreSQL), with events that share a timestamp."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import AuditEvent
from server_support import (
    ADMIN,
    ADMIN_TOKEN,
    MEMBER,
    MEMBER_TOKEN,
    Stack,
    asgi_client,
    make_stack,
    master_key_value,
)

from byok_plugin.server import BearerTokens

pytestmark = pytest.mark.anyio
AUDIT = "/api/workspaces/acme/byok-audit"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AS_MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[Stack]:
    built = make_stack(tmp_path, database_url, master_keys=master_key_value())
    yield built
    built.app.close()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(stack, BearerTokens({ADMIN_TOKEN: ADMIN, MEMBER_TOKEN: MEMBER})) as c:
        yield c


def _record(stack: Stack, n: int, at: datetime, workspace: str = "acme") -> None:
    stack.app.audit_store.record(
        AuditEvent(
            action="key.created",
            workspace_id=workspace,
            actor_id="alice",
            detail=f"event {n}",
            occurred_at=at,
        )
    )


async def _read_all(client: httpx.AsyncClient, limit: int, **params: str) -> list[list[str]]:
    """Every page, following ``older`` until it is null: the details of each page's events."""
    pages: list[list[str]] = []
    query: dict[str, str] = {"limit": str(limit), **params}
    while True:
        answer = await client.get(AUDIT, params=query, headers=AS_ADMIN)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        pages.append([e["detail"] for e in body["events"]])
        if body["older"] is None:
            return pages
        assert isinstance(body["older"], int)
        query["before"] = str(body["older"])
        assert len(pages) < 20, "the cursor does not move"


async def test_pages_cover_every_event_once_newest_first_even_at_one_timestamp(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    # 7 events: three share one time, two another; another workspace's event is never shown
    times = [T0, T0 + timedelta(minutes=1), T0 + timedelta(minutes=1), T0 + timedelta(minutes=1)]
    times += [T0 + timedelta(minutes=2), T0 + timedelta(minutes=2), T0 + timedelta(minutes=3)]
    for n, at in enumerate(times):
        _record(stack, n, at)
    _record(stack, 99, T0 + timedelta(minutes=1), workspace="globex")

    pages = await _read_all(client, limit=2)
    newest_first = [f"event {n}" for n in (6, 5, 4, 3, 2, 1, 0)]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:6], newest_first[6:]]

    # exactly one page's worth: no older cursor, no empty extra page
    assert await _read_all(client, limit=7) == [newest_first]
    # since= and before= together: the pages stop at the since time
    since = (T0 + timedelta(minutes=1)).isoformat()
    pages = await _read_all(client, limit=2, since=since)
    assert [detail for page in pages for detail in page] == newest_first[:6]


async def test_a_new_event_does_not_shift_the_older_pages(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    for n in range(5):
        _record(stack, n, T0 + timedelta(minutes=n))
    first = (await client.get(AUDIT, params={"limit": "2"}, headers=AS_ADMIN)).json()
    assert [e["detail"] for e in first["events"]] == ["event 4", "event 3"]
    _record(stack, 5, T0 + timedelta(minutes=10))  # written while the reader looks at page 1
    second = await client.get(
        AUDIT, params={"limit": "2", "before": str(first["older"])}, headers=AS_ADMIN
    )
    assert [e["detail"] for e in second.json()["events"]] == ["event 2", "event 1"]


async def test_the_default_page_is_100_events_and_says_there_are_older(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    for n in range(101):
        _record(stack, n, T0 + timedelta(seconds=n))
    body = (await client.get(AUDIT, headers=AS_ADMIN)).json()
    assert len(body["events"]) == 100
    older = await client.get(AUDIT, params={"before": str(body["older"])}, headers=AS_ADMIN)
    assert [e["detail"] for e in older.json()["events"]] == ["event 0"]
    assert older.json()["older"] is None


@pytest.mark.parametrize("before", ["0", "-3", "abc", "1.5", str(2**63), "١٢"])
async def test_a_bad_cursor_is_a_422_naming_before(
    client: httpx.AsyncClient, stack: Stack, before: str
) -> None:
    _record(stack, 0, T0)
    answer = await client.get(AUDIT, params={"before": before}, headers=AS_ADMIN)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == {
        "code": "validation_error",
        "message": "before must be the older cursor of a previous page (a whole number)",
        "field": "before",
    }


async def test_a_cursor_of_no_event_gives_no_events(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    _record(stack, 0, T0)
    answer = await client.get(AUDIT, params={"before": str(2**63 - 1)}, headers=AS_ADMIN)
    assert answer.status_code == 200
    assert answer.json() == {"workspace_id": "acme", "events": [], "older": None}


async def test_a_member_may_not_page_either(client: httpx.AsyncClient, stack: Stack) -> None:
    _record(stack, 0, T0)
    answer = await client.get(AUDIT, params={"before": "1"}, headers=AS_MEMBER)
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "forbidden"
