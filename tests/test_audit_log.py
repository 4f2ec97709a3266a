"""Reading the audit log: the store's read (both databases), who may read it, ``byok audit``
and the HTTP route, on a real store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import Actor, AuditEvent, NotAuthorized, Role
from click.testing import CliRunner
from server_support import (
    ADMIN,
    ADMIN_TOKEN,
    MEMBER,
    MEMBER_TOKEN,
    OTHER_ADMIN,
    OTHER_ADMIN_TOKEN,
    Stack,
    make_stack,
    master_key_value,
)

from byok_plugin.app import App
from byok_plugin.audit_log import AuditQuery, read_audit_log
from byok_plugin.cli import main
from byok_plugin.cli.context import CliContext
from byok_plugin.core.errors import InvalidInput
from byok_plugin.server import BearerTokens, create_app
from byok_plugin.settings import Settings

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
AUDIT = "/api/workspaces/acme/byok-audit"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AS_MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
AS_OTHER = {"Authorization": f"Bearer {OTHER_ADMIN_TOKEN}"}
OPERATOR = Actor("ops", operator=True)


def _event(n: int, workspace: str = "acme", **fields: object) -> AuditEvent:
    values: dict[str, object] = {
        "action": "key.created",
        "workspace_id": workspace,
        "actor_id": "alice",
        "provider": "openai",
        "key_id": f"key_{n:012d}",
        "detail": f"event {n}",
        "occurred_at": T0 + timedelta(days=n),
    }
    values.update(fields)
    return AuditEvent(**values)  # type: ignore[arg-type]


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[Stack]:
    built = make_stack(tmp_path, database_url, master_keys=master_key_value())
    yield built
    built.app.close()


def test_the_store_reads_newest_first_by_workspace_since_and_limit(stack: Stack) -> None:
    store = stack.app.audit_store
    # written out of time order: the read orders by time, not by insertion
    for n in (2, 0, 3, 1):
        store.record(_event(n))
    store.record(_event(5, workspace="globex"))
    details = [e.detail for e in store.events("acme")]
    assert details == ["event 3", "event 2", "event 1", "event 0"]
    since = [e.detail for e in store.events("acme", since=T0 + timedelta(days=1))]
    assert since == ["event 3", "event 2", "event 1"]
    assert [e.detail for e in store.events("acme", limit=2)] == ["event 3", "event 2"]
    assert [e.workspace_id for e in store.events(None, limit=1)] == ["globex"]
    first = store.events("acme", since=T0, limit=10)[-1]
    assert first.occurred_at == T0
    assert first.occurred_at.tzinfo is not None
    with pytest.raises(ValueError, match="timezone"):
        store.events("acme", since=datetime(2026, 11, 1))


def test_an_event_with_values_too_long_or_unstorable_still_lands(stack: Stack) -> None:
    # a host's actor id (a SPIFFE id), a provider name, a key id longer than their columns, a
    # NUL in a label: on PostgreSQL the event was refused (and only logged); evidence must land
    store = stack.app.audit_store
    spiffe = "spiffe://platform.example/ns/tenants/sa/" + "workflow-runner-" * 12
    store.record(
        _event(
            1,
            actor_id=spiffe,
            provider="p" * 60,
            key_id="k" * 100,
            detail="label 'team\x00\ud800' refused",
        )
    )
    store.record(_event(2, actor_id=spiffe + "-other"))
    second, first = store.events("acme")
    assert len(first.actor_id or "") == 200
    assert (first.actor_id or "").startswith(spiffe[:150])
    assert first.actor_id != second.actor_id  # two long ids stay apart
    assert (len(first.provider or ""), len(first.key_id or "")) == (40, 80)
    assert first.detail == "label 'team\\x00\\ud800' refused"


def test_admins_and_operators_read_members_and_outsiders_are_refused_and_audited(
    stack: Stack,
) -> None:
    stack.app.audit_store.record(_event(0))
    stack.app.audit_store.record(_event(1, workspace="globex"))
    read = [
        e.detail for e in read_audit_log(stack.pm, stack.app.audit_store, ADMIN, AuditQuery("acme"))
    ]
    assert read == ["event 0"]
    everything = read_audit_log(stack.pm, stack.app.audit_store, OPERATOR, AuditQuery())
    assert {e.workspace_id for e in everything} == {"acme", "globex"}
    for actor, query in (
        (MEMBER, AuditQuery("acme")),
        (OTHER_ADMIN, AuditQuery("acme")),
        (ADMIN, AuditQuery()),
    ):
        with pytest.raises(NotAuthorized, match="may not read the audit log"):
            read_audit_log(stack.pm, stack.app.audit_store, actor, query)
    denied = [e for e in stack.audit.events if e.action == "access.denied"]
    assert [(e.actor_id, e.workspace_id) for e in denied] == [
        ("bob", "acme"),
        ("mallory", "acme"),
        ("alice", "*"),
    ]
    assert all(e.outcome == "denied" for e in denied)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"limit": 0}, "between 1 and 1000"),
        ({"limit": 1001}, "between 1 and 1000"),
        ({"since": datetime(2026, 1, 1)}, "timezone"),
        ({"workspace_id": " acme"}, "whitespace"),
    ],
)
def test_a_bad_query_is_refused_with_what_is_wrong(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        AuditQuery(**fields)  # type: ignore[arg-type]


# --- byok audit --------------------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": f"sqlite:///{tmp_path / 'byok.db'}",
        "COLUMNS": "200",
    }


def _record(env: dict[str, str], *events: AuditEvent) -> None:
    app = App(Settings.from_environ(env))
    try:
        for event in events:
            app.audit_store.record(event)
    finally:
        app.close()


def test_byok_audit_prints_a_table_and_versioned_json(cli_env: dict[str, str]) -> None:
    _record(
        cli_env,
        _event(0),
        _event(1, action="access.denied", outcome="denied", actor_id="bob", provider=None),
        _event(2, workspace="globex", detail="[red]not markup[/]"),
    )
    runner = CliRunner()
    table = runner.invoke(main, ["audit", "-w", "acme"], env=cli_env)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    denied_line = next(i for i, line in enumerate(lines) if "access.denied" in line)
    created_line = next(i for i, line in enumerate(lines) if "key.created" in line)
    assert denied_line < created_line  # newest first
    assert lines[denied_line] == (
        "2026-11-02 09:00:00Z  access.denied (denied)  by bob  key_000000000001"
    )
    assert lines[denied_line + 1] == "    event 1"
    assert "globex" not in table.output

    every = runner.invoke(main, ["audit"], env=cli_env)
    assert every.exit_code == 0, every.output
    assert "[red]not markup[/]" in every.output  # tenant text is shown as it is, never as markup

    raw = runner.invoke(
        main, ["audit", "-w", "acme", "--since", "2026-11-02", "--json"], env=cli_env
    )
    assert raw.exit_code == 0, raw.output
    document = json.loads(raw.output)
    assert document["version"] == 1
    assert document["since"] == "2026-11-02T00:00:00+00:00"
    assert [e["action"] for e in document["events"]] == ["access.denied"]
    assert document["events"][0] == {
        "occurred_at": "2026-11-02T09:00:00+00:00",
        "action": "access.denied",
        "workspace_id": "acme",
        "actor_id": "bob",
        "outcome": "denied",
        "provider": None,
        "key_id": "key_000000000001",
        "detail": "event 1",
    }

    empty = runner.invoke(main, ["audit", "-w", "initech"], env=cli_env)
    assert empty.exit_code == 0
    assert "No audit events in workspace initech." in empty.output


@pytest.mark.parametrize("columns", ["80", "40"])
def test_byok_audit_cuts_nothing_on_a_narrow_terminal(
    cli_env: dict[str, str], columns: str
) -> None:
    long_id = "key_" + "x" * 60
    _record(cli_env, _event(0, key_id=long_id, workspace="a-rather-long-workspace-name"))
    result = CliRunner().invoke(main, ["audit"], env={**cli_env, "COLUMNS": columns})
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "key.created" in line)
    # one line, whole: time, workspace, action, actor, provider and the full key id
    assert line == (
        f"2026-11-01 09:00:00Z  a-rather-long-workspace-name  key.created  by alice  openai {long_id}"
    )
    assert "…" not in result.output


def test_byok_audit_since_a_relative_date_counts_from_the_apps_clock(
    cli_env: dict[str, str],
) -> None:
    _record(cli_env, _event(0), _event(1), _event(2))  # 1, 2 and 3 November, 09:00
    # "yesterday" is the app's: on 3 November (not whatever day the test runs on)
    cli = CliContext(Settings.from_environ(cli_env), clock=lambda: T0 + timedelta(days=2, hours=3))
    result = CliRunner().invoke(
        main, ["audit", "-w", "acme", "--since", "yesterday", "--json"], env=cli_env, obj=cli
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["since"] == "2026-11-02T00:00:00+00:00"
    assert [e["detail"] for e in document["events"]] == ["event 2", "event 1"]


def test_byok_audit_rejects_bad_options_with_exit_2(cli_env: dict[str, str]) -> None:
    runner = CliRunner()
    bad_since = runner.invoke(main, ["audit", "--since", "yesterday-ish"], env=cli_env)
    assert bad_since.exit_code == 2
    assert "--since" in bad_since.output
    bad_limit = runner.invoke(main, ["audit", "--limit", "0"], env=cli_env)
    assert bad_limit.exit_code == 2
    assert "--limit" in bad_limit.output
    bad_ws = runner.invoke(main, ["audit", "-w", " acme"], env=cli_env)
    assert bad_ws.exit_code == 2
    assert "whitespace" in bad_ws.output


# --- the HTTP route ----------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    identify = BearerTokens(
        {ADMIN_TOKEN: ADMIN, MEMBER_TOKEN: MEMBER, OTHER_ADMIN_TOKEN: OTHER_ADMIN}
    )
    asgi = create_app(stack.app, identify=identify, pm=stack.pm)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi), base_url="http://testserver"
    ) as c:
        yield c


@pytest.mark.anyio
async def test_the_route_gives_admins_the_log_newest_first(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    created = await client.post(
        "/api/workspaces/acme/byok-keys",
        json={"provider": "openai", "api_key": "sk-proj-" + "a1" * 24, "test": False},
        headers=AS_ADMIN,
    )
    assert created.status_code == 201, created.text
    key_id = created.json()["key"]["id"]
    disabled = await client.patch(
        f"/api/workspaces/acme/byok-keys/{key_id}", json={"status": "disabled"}, headers=AS_ADMIN
    )
    assert disabled.status_code == 200
    stack.app.audit_store.record(_event(0, detail="long ago"))

    answer = await client.get(AUDIT, headers=AS_ADMIN)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["workspace_id"] == "acme"
    assert [e["action"] for e in body["events"]] == ["key.disabled", "key.created", "key.created"]
    assert body["events"][0]["key_id"] == key_id
    assert body["events"][0]["actor_id"] == "alice"
    assert body["events"][-1]["detail"] == "long ago"
    assert "sk-proj-" not in answer.text

    recent = await client.get(AUDIT, params={"since": "2026-11-02", "limit": "1"}, headers=AS_ADMIN)
    assert [e["action"] for e in recent.json()["events"]] == ["key.disabled"]
    old = await client.get(AUDIT, params={"since": "2026-11-01T09:00:00Z"}, headers=AS_ADMIN)
    assert len(old.json()["events"]) == 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "last tuesday"}, "since"),
        ({"since": "9999-12-31T23:30:00-01:00"}, "since"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "since"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
async def test_the_route_names_the_bad_parameter(
    client: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    answer = await client.get(AUDIT, params=params, headers=AS_ADMIN)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "validation_error"
    assert error["field"] == field
    assert field in error["message"]


@pytest.mark.anyio
async def test_the_route_refuses_members_outsiders_and_anonymous_callers(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    stack.app.audit_store.record(_event(0))
    for headers in (AS_MEMBER, AS_OTHER):
        answer = await client.get(AUDIT, headers=headers)
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "forbidden"
        assert "event 0" not in answer.text
    anonymous = await client.get(AUDIT)
    assert anonymous.status_code == 401
    assert [e.actor_id for e in stack.audit.events if e.action == "access.denied"] == [
        "bob",
        "mallory",
    ]
    # an admin of acme is no admin of globex
    other = await client.get("/api/workspaces/globex/byok-audit", headers=AS_ADMIN)
    assert other.status_code == 403


def test_a_role_given_as_member_is_not_enough(stack: Stack) -> None:
    viewer = Actor("carol", {"acme": Role.MEMBER, "globex": Role.ADMIN})
    with pytest.raises(NotAuthorized):
        read_audit_log(stack.pm, stack.app.audit_store, viewer, AuditQuery("acme"))
    assert read_audit_log(stack.pm, stack.app.audit_store, viewer, AuditQuery("globex")) == []


@pytest.mark.anyio
async def test_a_refused_read_is_audited_at_the_apps_time(
    tmp_path: Path, database_url: str
) -> None:
    now = T0 + timedelta(days=30)  # the app's clock, not the wall clock
    pinned = make_stack(tmp_path, database_url, master_keys=master_key_value(), clock=lambda: now)
    identify = BearerTokens({MEMBER_TOKEN: MEMBER})
    asgi = create_app(pinned.app, identify=identify, pm=pinned.pm)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="http://testserver"
        ) as c:
            assert (await c.get(AUDIT, headers=AS_MEMBER)).status_code == 403
        denied = [e for e in pinned.audit.events if e.action == "access.denied"]
        assert [(e.actor_id, e.occurred_at) for e in denied] == [(MEMBER.id, now)]
        stored = pinned.app.audit_store.events("acme")
        assert [(e.action, e.occurred_at) for e in stored] == [("access.denied", now)]
    finally:
        pinned.app.close()
