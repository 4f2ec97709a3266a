"""The budget routes of the HTTP API, on a real store: admins set and delete, members read,
outsiders get nothing; every answer is the documented JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import BudgetReservation, CredentialSource
from server_support import (
    ADMIN,
    ADMIN_TOKEN,
    MEMBER,
    MEMBER_TOKEN,
    OTHER_ADMIN,
    OTHER_ADMIN_TOKEN,
    Stack,
    asgi_client,
    make_stack,
    master_key_value,
)

from byok_plugin.server import BearerTokens

pytestmark = pytest.mark.anyio
BUDGETS = "/api/workspaces/acme/byok-budgets"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AS_MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
AS_OTHER = {"Authorization": f"Bearer {OTHER_ADMIN_TOKEN}"}
#: the app's clock: the audit events' times are the app's, as the budgets' periods are
NOW = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)
IDENTIFY = BearerTokens({ADMIN_TOKEN: ADMIN, MEMBER_TOKEN: MEMBER, OTHER_ADMIN_TOKEN: OTHER_ADMIN})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def stack(tmp_path: Path, sqlite_url: str) -> Iterator[Stack]:
    built = make_stack(tmp_path, sqlite_url, master_keys=master_key_value(), clock=lambda: NOW)
    yield built
    built.app.close()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(stack, IDENTIFY) as c:
        yield c


def error_of(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


async def test_admins_set_members_read_with_spent_reserved_left(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = {"limit": "10", "period": "day", "thresholds": [80]}
    made = await client.put(f"{BUDGETS}/daily", json=body, headers=AS_ADMIN)
    assert made.status_code == 200, made.text
    assert made.headers["cache-control"] == "no-store"
    assert made.json()["budget"]["limit"] == "10"
    # a call in flight holds its worst case
    reservation = BudgetReservation(
        "run:b:1", "acme", "openai", "gpt-4o-mini", CredentialSource.PLATFORM, Decimal("2.5")
    )
    assert stack.pm.hook.byok_reserve_budget(reservation=reservation) is not None
    listed = await client.get(BUDGETS, headers=AS_MEMBER)
    assert listed.status_code == 200, listed.text
    data = listed.json()
    assert data["can_manage"] is False
    (budget,) = data["budgets"]
    assert (budget["name"], budget["hard"], budget["period"]) == ("daily", True, "day")
    assert (budget["spent"], budget["reserved"], budget["left"]) == ("0", "2.5", "7.5")
    assert budget["thresholds"] == [80]
    assert (await client.get(BUDGETS, headers=AS_ADMIN)).json()["can_manage"] is True
    actions = [e.action for e in stack.audit.events]
    assert "budget.set" in actions
    assert {e.occurred_at for e in stack.audit.events} == {NOW}


async def test_members_may_not_change_and_outsiders_may_not_read(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    denied = await client.put(f"{BUDGETS}/b", json={"limit": "1"}, headers=AS_MEMBER)
    assert error_of(denied, 403)["code"] == "forbidden"
    assert error_of(await client.get(BUDGETS, headers=AS_OTHER), 403)["code"] == "forbidden"
    gone = await client.delete(f"{BUDGETS}/b", headers=AS_MEMBER)
    assert error_of(gone, 403)["code"] == "forbidden"
    assert stack.app.budgets.list_budgets("acme") == []
    assert [e.outcome for e in stack.audit.events if e.action == "access.denied"] == ["denied"] * 3
    assert {e.occurred_at for e in stack.audit.events} == {NOW}


async def test_bad_budgets_are_clear_422s_and_a_missing_one_a_404(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    for name, body, message in [
        ("b", {"limit": "0"}, "more than 0"),
        ("b", {"limit": "abc"}, "limit"),
        ("bad name", {"limit": "1"}, "budget name"),
        ("b", {"limit": "1", "workflow_id": "a\x00b"}, "control characters"),
    ]:
        response = await client.put(f"{BUDGETS}/{name}", json=body, headers=AS_ADMIN)
        error = error_of(response, 422)
        assert message in error["message"] or message == error.get("field"), error
    missing = await client.delete(f"{BUDGETS}/nope", headers=AS_ADMIN)
    error = error_of(missing, 404)
    assert error["code"] == "not_found"
    assert "workspace 'acme' has no budget 'nope'" in error["message"]
    await client.put(f"{BUDGETS}/b", json={"limit": "1"}, headers=AS_ADMIN)
    deleted = await client.delete(f"{BUDGETS}/b", headers=AS_ADMIN)
    assert deleted.json() == {"deleted": "b"}
    assert (await client.get(BUDGETS, headers=AS_ADMIN)).json()["budgets"] == []
    audited = [(e.action, e.occurred_at) for e in stack.audit.events]
    assert audited == [("budget.set", NOW), ("budget.deleted", NOW)]
