"""The organization routes over HTTP (ASGI, SQLite and PostgreSQL): the organization's keys for its
admins and members only, and a workspace's inherited keys, masked, for the workspace's members."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import Actor
from keys_support import OPERATOR, leaks
from server_support import make_stack, master_key_value, random_key

from byok_plugin.server import BearerTokens, create_app, openapi_document

pytestmark = pytest.mark.anyio

ACTORS = {
    "org-admin": Actor("olga", roles={"org:acme": "admin"}),
    "org-member": Actor("otto", roles={"org:acme": "member"}),
    "other-org": Actor("eve", roles={"org:globex": "admin", "globex-ws": "admin"}),
    "ws-admin": Actor("wanda", roles={"team-a": "admin"}),
    "ws-member": Actor("walt", roles={"team-a": "member"}),
}
TOKENS = {f"token-{name}-" + "x" * 24: actor for name, actor in ACTORS.items()}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer token-{name}-" + "x" * 24}


ORG_KEYS = "/api/organizations/acme/byok-keys"
INHERITED = "/api/workspaces/team-a/byok-inherited-keys"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(tmp_path: Path, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    stack = make_stack(tmp_path, database_url, master_keys=master_key_value())
    orgs = stack.app.organizations(stack.pm)
    orgs.create(OPERATOR, "acme")
    orgs.attach(OPERATOR, "acme", "team-a")
    asgi = create_app(stack.app, identify=BearerTokens(TOKENS), pm=stack.pm)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi), base_url="http://testserver"
    ) as c:
        yield c
    stack.app.close()


async def test_organization_keys_and_inherited_keys_over_http(
    client: httpx.AsyncClient,
) -> None:
    secret = random_key("openai")
    body = {"provider": "openai", "api_key": secret}
    # only the organization's admins store keys
    for name in ("org-member", "other-org", "ws-admin", "ws-member"):
        denied = await client.post(ORG_KEYS, json=body, headers=auth(name))
        assert denied.status_code == 403, denied.text
    assert (await client.post(ORG_KEYS, json=body)).status_code == 401
    created = await client.post(ORG_KEYS, json=body, headers=auth("org-admin"))
    assert created.status_code == 201, created.text
    key_id = created.json()["key"]["id"]
    # its members list them; outsiders learn nothing (not even whether the organization exists)
    for name, can_manage in (("org-admin", True), ("org-member", False)):
        listed = await client.get(ORG_KEYS, headers=auth(name))
        assert listed.status_code == 200
        assert listed.json()["can_manage"] is can_manage
        assert [k["id"] for k in listed.json()["keys"]] == [key_id]
    for name in ("other-org", "ws-admin", "ws-member"):
        assert (await client.get(ORG_KEYS, headers=auth(name))).status_code == 403
        missing = await client.get("/api/organizations/nope/byok-keys", headers=auth(name))
        assert missing.status_code == 403
    missing = await client.get(
        "/api/organizations/nope/byok-keys",
        headers={"Authorization": "Bearer " + next(iter(TOKENS))},  # org-admin of acme only
    )
    assert missing.status_code == 403
    bad = await client.get("/api/organizations/bad%20id/byok-keys", headers=auth("org-admin"))
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "org_id"
    # the workspace's members see the inherited key, masked
    answers = []
    for name in ("ws-admin", "ws-member"):
        inherited = await client.get(INHERITED, headers=auth(name))
        assert inherited.status_code == 200, inherited.text
        shown = inherited.json()
        assert shown["organization_id"] == "acme"
        assert shown["opted_out"] is False
        assert [(k["id"], k["inherited"], k["active"]) for k in shown["keys"]] == [
            (key_id, True, True)
        ]
        answers.append(inherited.text)
    for name in ("org-member", "other-org"):
        assert (await client.get(INHERITED, headers=auth(name))).status_code == 403
    answers += [created.text, (await client.get(ORG_KEYS, headers=auth("org-admin"))).text]
    assert leaks("\n".join(answers), [secret]) == []
    # the organization's admins delete
    gone = await client.request(
        "DELETE",
        ORG_KEYS,
        json={"provider": "openai", "key_id": key_id},
        headers=auth("ws-admin"),
    )
    assert gone.status_code == 403
    gone = await client.request(
        "DELETE",
        ORG_KEYS,
        json={"provider": "openai", "key_id": key_id},
        headers=auth("org-admin"),
    )
    assert gone.status_code == 200
    assert gone.json()["deleted"] == [key_id]


async def test_an_unknown_organization_is_a_404_for_its_admins(
    tmp_path: Path, sqlite_url: str
) -> None:
    stack = make_stack(tmp_path, sqlite_url, master_keys=master_key_value())
    admin = Actor("nina", roles={"org:nope": "admin"})
    asgi = create_app(stack.app, identify=BearerTokens({"t" * 32: admin}), pm=stack.pm)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi), base_url="http://testserver"
    ) as c:
        response = await c.post(
            "/api/organizations/nope/byok-keys",
            json={"provider": "openai", "api_key": random_key("openai")},
            headers={"Authorization": "Bearer " + "t" * 32},
        )
    stack.app.close()
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "byok org create nope" in response.json()["error"]["message"]
    assert "/api/organizations/{org_id}/byok-keys" in openapi_document()["paths"]
