"""The page's workspace views over HTTP, on a real store (SQLite and PostgreSQL): usage by day,
model and block, and the fallback policy (members read, admins change, audited)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import Charge, CredentialSource, Usage, UsageRecord
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
USAGE = "/api/workspaces/acme/byok-usage"
FALLBACK = "/api/workspaces/acme/byok-fallback"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AS_MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
AS_OTHER = {"Authorization": f"Bearer {OTHER_ADMIN_TOKEN}"}
#: the app's clock: "today" and "this month" must not race midnight or a month's end
NOW = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[Stack]:
    built = make_stack(tmp_path, database_url, master_keys=master_key_value(), clock=lambda: NOW)
    yield built
    built.app.close()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    identify = BearerTokens(
        {ADMIN_TOKEN: ADMIN, MEMBER_TOKEN: MEMBER, OTHER_ADMIN_TOKEN: OTHER_ADMIN}
    )
    async with asgi_client(stack, identify) as c:
        yield c


def call(
    n: int,
    *,
    days_ago: int,
    source: CredentialSource,
    list_cost: str,
    charged: str = "0",
    workspace: str = "acme",
    model: str = "gpt-4o",
    provider: str = "openai",
    block: str = "summarize",
    key_id: str | None = None,
) -> UsageRecord:
    cost = Decimal(list_cost)
    return UsageRecord(
        idempotency_key=f"run-{n}:{block}:attempt-1",
        workspace_id=workspace,
        usage=Usage(provider, model, input_tokens=100, output_tokens=20),
        charge=Charge(
            amount=Decimal(charged),
            reason="byok" if source is CredentialSource.WORKSPACE else "platform",
            list_cost=cost,
            breakdown=(("input", cost),),
            price_version="test-1",
        ),
        source=source,
        key_id=key_id,
        workflow_id="triage",
        run_id=f"run-{n}",
        block_id=block,
        attempt=1,
        occurred_at=NOW - timedelta(days=days_ago),
    )


OWN = CredentialSource.WORKSPACE
PLATFORM = CredentialSource.PLATFORM


async def test_usage_sums_each_day_byok_against_platform_and_by_model_and_block(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    ledger = stack.app.ledger
    ledger.record(call(1, days_ago=0, source=OWN, list_cost="0.10", key_id="key_own"))
    ledger.record(call(2, days_ago=0, source=PLATFORM, list_cost="0.20", charged="0.25"))
    ledger.record(call(3, days_ago=2, source=OWN, list_cost="1.5", key_id="key_own", block="draft"))
    ledger.record(
        call(
            4,
            days_ago=2,
            source=PLATFORM,
            list_cost="0.03",
            charged="0.04",
            provider="anthropic",
            model="claude-sonnet-4-5",
        )
    )
    ledger.record(call(5, days_ago=40, source=PLATFORM, list_cost="9", charged="9"))  # too old
    ledger.record(
        call(6, days_ago=0, source=PLATFORM, list_cost="7", charged="7", workspace="globex")
    )

    answer = await client.get(USAGE, params={"days": "7"}, headers=AS_MEMBER)
    assert answer.status_code == 200, answer.text
    usage = answer.json()
    assert usage["workspace_id"] == "acme"
    assert usage["days"] == 7
    assert len(usage["by_day"]) == 7
    today = NOW.date()
    assert usage["since"] == (today - timedelta(days=6)).isoformat()
    days = {d["day"]: d for d in usage["by_day"]}
    latest = days[today.isoformat()]
    assert (Decimal(latest["byok_cost"]), Decimal(latest["platform_charged"])) == (
        Decimal("0.10"),
        Decimal("0.25"),
    )
    two_ago = days[(today - timedelta(days=2)).isoformat()]
    assert Decimal(two_ago["byok_cost"]) == Decimal("1.5")
    assert Decimal(two_ago["platform_charged"]) == Decimal("0.04")
    assert days[(today - timedelta(days=1)).isoformat()]["calls"] == 0
    totals = usage["totals"]
    assert totals["calls"] == 4
    assert (totals["byok_calls"], totals["platform_calls"]) == (2, 2)
    assert Decimal(totals["byok_saved"]) == Decimal("1.60")
    assert Decimal(totals["platform_charged"]) == Decimal("0.29")
    # largest spend first
    assert [(m["provider"], m["model"]) for m in usage["by_model"]] == [
        ("openai", "gpt-4o"),
        ("anthropic", "claude-sonnet-4-5"),
    ]
    blocks = [(b["workflow_id"], b["block_id"], b["key_id"]) for b in usage["by_block"]]
    assert blocks[0] == ("triage", "draft", "key_own")
    assert set(blocks) == {
        ("triage", "draft", "key_own"),
        ("triage", "summarize", None),
        ("triage", "summarize", "key_own"),
    }
    assert isinstance(totals["byok_cost"], str)  # money as decimal strings, never floats

    default = (await client.get(USAGE, headers=AS_ADMIN)).json()
    assert default["days"] == 30
    assert default["totals"]["calls"] == 4


@pytest.mark.parametrize("days", ["0", "367", "a week", "-1"])
async def test_usage_names_a_bad_days_parameter(client: httpx.AsyncClient, days: str) -> None:
    answer = await client.get(USAGE, params={"days": days}, headers=AS_ADMIN)
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "days"


async def test_usage_of_another_workspace_is_refused_and_audited(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    answer = await client.get(USAGE, headers=AS_OTHER)
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "forbidden"
    denied = [e for e in stack.audit.events if e.action == "access.denied"]
    assert [(e.actor_id, e.workspace_id) for e in denied] == [("mallory", "acme")]
    assert [e.occurred_at for e in denied] == [NOW]  # the app's time, not the wall clock's
    assert (await client.get(USAGE)).status_code == 401


async def test_members_read_the_fallback_policy_and_admins_change_it(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    shown = await client.get(FALLBACK, headers=AS_MEMBER)
    assert shown.status_code == 200
    assert shown.json() == {
        "workspace_id": "acme",
        "policy": "never",
        "updated_by": None,
        "updated_at": None,
        "can_manage": False,
    }
    refused = await client.put(FALLBACK, json={"policy": "on_error"}, headers=AS_MEMBER)
    assert refused.status_code == 403
    assert stack.app.workspace_settings.fallback_policy("acme").value == "never"

    changed = await client.put(FALLBACK, json={"policy": "on_rate_limit"}, headers=AS_ADMIN)
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["policy"], body["updated_by"], body["can_manage"]) == (
        "on_rate_limit",
        "alice",
        True,
    )
    assert stack.app.workspace_settings.fallback_policy("acme").value == "on_rate_limit"
    audited = [e for e in stack.audit.events if e.action == "settings.fallback_policy"]
    assert [(e.actor_id, e.detail) for e in audited] == [("alice", "never -> on_rate_limit")]
    assert [e.occurred_at for e in audited] == [NOW]
    assert (await client.get(FALLBACK, headers=AS_MEMBER)).json()["policy"] == "on_rate_limit"
    assert (await client.get(FALLBACK, headers=AS_OTHER)).status_code == 403


@pytest.mark.parametrize(
    "body", [{"policy": "sometimes"}, {}, {"policy": "never", "extra": 1}, {"policy": 3}]
)
async def test_a_bad_fallback_body_is_refused_and_nothing_changes(
    client: httpx.AsyncClient, stack: Stack, body: dict[str, object]
) -> None:
    answer = await client.put(FALLBACK, json=body, headers=AS_ADMIN)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "validation_error"
    assert stack.app.workspace_settings.get("acme").updated_at is None


async def test_usage_of_this_month_starts_on_its_first_day(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    from dataclasses import replace

    now = NOW
    month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
    ledger = stack.app.ledger
    first = call(1, days_ago=0, source=OWN, list_cost="0.10", key_id="key_own")
    ledger.record(replace(first, occurred_at=month_start + timedelta(seconds=1)))
    before = call(2, days_ago=0, source=PLATFORM, list_cost="5", charged="5")
    ledger.record(replace(before, occurred_at=month_start - timedelta(seconds=1)))

    answer = await client.get(USAGE, params={"period": "month"}, headers=AS_MEMBER)
    assert answer.status_code == 200, answer.text
    usage = answer.json()
    assert usage["since"] == month_start.date().isoformat()
    assert usage["days"] == now.day == len(usage["by_day"])
    assert usage["by_day"][0]["day"] == month_start.date().isoformat()
    assert usage["by_day"][-1]["day"] == now.date().isoformat()
    assert usage["totals"]["calls"] == 1
    assert Decimal(usage["totals"]["byok_cost"]) == Decimal("0.10")
    # the same days asked for as a number give the same answer
    same = (await client.get(USAGE, params={"days": str(now.day)}, headers=AS_MEMBER)).json()
    assert same == usage


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"period": "week"}, "period must be month (or ask for days=N)"),
        ({"period": ""}, "period must be month (or ask for days=N)"),
        ({"period": "month", "days": "7"}, "ask for days=N or period=month, not both"),
    ],
)
async def test_usage_names_a_bad_period(
    client: httpx.AsyncClient, params: dict[str, str], message: str
) -> None:
    answer = await client.get(USAGE, params=params, headers=AS_ADMIN)
    assert answer.status_code == 422
    assert answer.json()["error"] == {
        "code": "validation_error",
        "message": message,
        "field": "period",
    }


async def test_an_uncertain_calls_estimate_is_not_counted_as_byok_spend(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    # an uncertain row carries its estimated input's list cost: the provider may not have run it,
    # so the page counts the call but not the estimate, as `byok usage` does
    ledger = stack.app.ledger
    ledger.record(call(1, days_ago=0, source=OWN, list_cost="0.10", key_id="key_own"))
    ledger.record(
        replace(
            call(2, days_ago=0, source=OWN, list_cost="0.75", key_id="key_own"),
            status="uncertain",
        )
    )
    totals = (await client.get(USAGE, params={"days": "7"}, headers=AS_MEMBER)).json()["totals"]
    assert totals["byok_calls"] == 2
    assert Decimal(totals["byok_cost"]) == Decimal("0.10")
