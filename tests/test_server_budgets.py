"""The budget routes of the HTTP API, on a real store: admins set and delete, members read,
outsiders get nothing; every answer is the documented JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import Actor, BudgetReservation, CredentialSource, Role
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
    random_key,
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


# --- review findings 9, 6, 4 on both stores -----------------------------------------------------

ORG_ADMIN_TOKEN = "org-admin-token-" + "x" * 16
ORG_ADMIN = Actor("carol", {"org:acme-org": Role.ADMIN})
KEYS = "/api/workspaces/acme/byok-keys"


@pytest.fixture
def db_stack(tmp_path: Path, database_url: str) -> Iterator[Stack]:
    built = make_stack(tmp_path, database_url, master_keys=master_key_value(), clock=lambda: NOW)
    yield built
    built.app.close()


@pytest.fixture
async def db_client(db_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    identify = BearerTokens({ADMIN_TOKEN: ADMIN, MEMBER_TOKEN: MEMBER, ORG_ADMIN_TOKEN: ORG_ADMIN})
    async with asgi_client(db_stack, identify) as c:
        yield c


async def _store_key(client: httpx.AsyncClient) -> httpx.Response:
    body = {"provider": "openai", "api_key": random_key("openai"), "test": False}
    response = await client.post(KEYS, json=body, headers=AS_ADMIN)
    assert response.status_code in (200, 201), response.text
    return response


async def test_limits_finer_than_a_nano_dollar_are_refused_not_rounded(
    db_client: httpx.AsyncClient, db_stack: Stack
) -> None:
    for limit in ("0.0000000001", "0." + "0" * 37 + "1"):
        response = await db_client.put(f"{BUDGETS}/b", json={"limit": limit}, headers=AS_ADMIN)
        assert "whole number of nano-dollars" in error_of(response, 422)["message"]
    assert db_stack.app.budgets.list_budgets("acme") == []


async def test_a_budget_on_an_organization_is_a_clear_422(
    db_client: httpx.AsyncClient, db_stack: Stack
) -> None:
    response = await db_client.put(
        "/api/workspaces/org:acme-org/byok-budgets/pool-cap",
        json={"limit": "0.01", "metric": "list_cost"},
        headers={"Authorization": f"Bearer {ORG_ADMIN_TOKEN}"},
    )
    error = error_of(response, 422)
    assert "'org:acme-org' is an organization's key pool" in error["message"]
    assert db_stack.app.budgets.list_budgets("org:acme-org") == []


async def test_a_key_scope_names_a_stored_key_and_its_audit_event_is_kept(
    db_client: httpx.AsyncClient, db_stack: Stack
) -> None:
    await db_client.put(f"{BUDGETS}/monthly", json={"limit": "100"}, headers=AS_ADMIN)
    # a key id longer than the audit table's column: used to be saved, its audit row lost
    for key_id in ("key_" + "k" * 96, "key_doesnotexist"):
        response = await db_client.put(
            f"{BUDGETS}/monthly", json={"limit": "100", "key_id": key_id}, headers=AS_ADMIN
        )
        assert "workspace 'acme'" in error_of(response, 422)["message"]
    (monthly,) = db_stack.app.budgets.list_budgets("acme")
    assert monthly.key_id is None  # unchanged: still workspace-wide
    key_id = (await _store_key(db_client)).json()["key"]["id"]
    scoped = await db_client.put(
        f"{BUDGETS}/monthly", json={"limit": "100", "key_id": key_id}, headers=AS_ADMIN
    )
    assert scoped.status_code == 200, scoped.text
    assert (scoped.json()["budget"]["key_id"], scoped.json()["budget"]["key_gone"]) == (
        key_id,
        False,
    )
    stored = [(e.action, e.key_id) for e in db_stack.app.audit_store.events("acme")]
    assert stored.count(("budget.set", None)) == 1
    assert ("budget.set", key_id) in stored


async def test_replacing_a_budgets_key_warns_and_the_budget_shows_it_gone(
    db_client: httpx.AsyncClient, db_stack: Stack
) -> None:
    first = (await _store_key(db_client)).json()["key"]["id"]
    await db_client.put(
        f"{BUDGETS}/guard",
        json={"limit": "1", "metric": "list_cost", "key_id": first},
        headers=AS_ADMIN,
    )
    replaced = (await _store_key(db_client)).json()
    assert replaced["replaced_key_id"] == first
    second = replaced["key"]["id"]
    assert any(
        f"budget 'guard' of workspace 'acme' is narrowed to the replaced key {first}" in w
        and second in w
        for w in replaced["warnings"]
    ), replaced["warnings"]
    (budget,) = (await db_client.get(BUDGETS, headers=AS_MEMBER)).json()["budgets"]
    assert (budget["key_id"], budget["key_gone"]) == (first, True)
