"""The key management API through httpx against the ASGI app: every route, every status code.

Every key sent in these tests is random and remembered; after each test, no response (body or
header) and no log line may contain any of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import Actor
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
    random_key,
)

from byok_plugin.server import BearerTokens, create_app, openapi_document
from byok_plugin.server.errors import STATUS, ErrorCode

pytestmark = pytest.mark.anyio

KEYS = "/api/workspaces/acme/byok-keys"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AS_MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
AS_OTHER = {"Authorization": f"Bearer {OTHER_ADMIN_TOKEN}"}
IDENTIFY = BearerTokens({ADMIN_TOKEN: ADMIN, MEMBER_TOKEN: MEMBER, OTHER_ADMIN_TOKEN: OTHER_ADMIN})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Secrets:
    """The keys a test sent, and every response it got back."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.responses: list[httpx.Response] = []

    def new(self, provider: str = "openai") -> str:
        key = random_key(provider)
        self.keys.append(key)
        return key

    def assert_never_shown(self, log_text: str) -> None:
        assert self.responses, "the test made no request"
        for response in self.responses:
            shown = (
                response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
            )
            for key in self.keys:
                assert key not in shown, (
                    f"a plaintext key in {response.request.method} {response.request.url}"
                )
        for key in self.keys:
            assert key not in log_text


@pytest.fixture
def secrets_seen(caplog: pytest.LogCaptureFixture) -> Iterator[Secrets]:
    caplog.set_level(logging.DEBUG)
    seen = Secrets()
    yield seen
    seen.assert_never_shown(caplog.text)


@pytest.fixture
def stack(tmp_path: Path, sqlite_url: str) -> Iterator[Stack]:
    built = make_stack(tmp_path, sqlite_url, master_keys=master_key_value())
    yield built
    built.app.close()


def _client(asgi, seen: Secrets) -> httpx.AsyncClient:
    async def remember(response: httpx.Response) -> None:
        await response.aread()
        seen.responses.append(response)

    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi),
        base_url="http://testserver",
        event_hooks={"response": [remember]},
    )


@pytest.fixture
async def client(stack: Stack, secrets_seen: Secrets) -> AsyncIterator[httpx.AsyncClient]:
    asgi = create_app(stack.app, identify=IDENTIFY, pm=stack.pm)
    async with _client(asgi, secrets_seen) as c:
        yield c


def assert_error(
    response: httpx.Response, status: int, code: str, field: str | None = None
) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert STATUS[ErrorCode(code)] == status
    assert error["message"]
    if field is not None:
        assert error["field"] == field


async def add_key(
    client: httpx.AsyncClient,
    key: str,
    *,
    label: str | None = None,
    provider: str = "openai",
    **extra,
) -> dict:
    body = {"provider": provider, "api_key": key, **extra}
    if label is not None:
        body["label"] = label
    response = await client.post(KEYS, json=body, headers=AS_ADMIN)
    assert response.status_code in (200, 201), response.text
    return response.json()


# --- health, document, identity -----------------------------------------------------------


async def test_health_needs_no_identity(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/byok/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.headers["cache-control"] == "no-store"


async def test_the_served_openapi_document_is_the_generated_one(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/byok/openapi.json")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-cache"
    # the document of every operation, less the sign-in routes that only byok serve has
    generated = openapi_document()
    del generated["paths"]["/api/byok/session"]
    for name in ("Session", "SessionRequest", "SignOutRequest"):
        generated["components"]["schemas"].pop(name)
    assert response.json() == generated


def test_the_document_lists_every_route_and_every_error_code(stack: Stack) -> None:
    asgi = create_app(stack.app, identify=IDENTIFY, pm=stack.pm)
    document = openapi_document()
    served = {
        (route.path, method.lower())
        for route in asgi.routes
        if route.path.startswith("/api/")
        for method in route.methods - {"HEAD"}
    }
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    # /api/byok/session exists only under byok serve (tested in test_server_local.py)
    assert served == documented - {("/api/byok/session", "post"), ("/api/byok/session", "delete")}
    codes = document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert set(codes["enum"]) == {code.value for code in ErrorCode}


def test_the_documented_providers_are_the_key_stores(stack: Stack) -> None:
    from byok_plugin.core.key_format import KNOWN_PROVIDERS

    provider = openapi_document()["components"]["schemas"]["Provider"]
    assert provider["enum"] == list(KNOWN_PROVIDERS)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer forged-" + "x" * 20},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": "Bearer "},
        {"Cookie": "byok_session=forged"},
    ],
    ids=["missing", "forged-token", "wrong-scheme", "empty-token", "forged-cookie"],
)
async def test_no_or_forged_identity_is_401_on_every_authenticated_route(
    client: httpx.AsyncClient, stack: Stack, headers: dict[str, str]
) -> None:
    key_id = "key_" + "a" * 16
    calls = [
        ("GET", "/api/byok/me", None),
        ("GET", "/api/byok/providers", None),
        ("GET", KEYS, None),
        ("POST", KEYS, {"provider": "openai", "api_key": random_key()}),
        ("DELETE", KEYS, {"provider": "openai"}),
        ("PATCH", f"{KEYS}/{key_id}", {"status": "disabled"}),
        ("POST", f"{KEYS}/{key_id}/test", {}),
    ]
    for method, url, body in calls:
        response = await client.request(method, url, json=body, headers=headers)
        assert_error(response, 401, "unauthenticated")
        assert response.headers["www-authenticate"].startswith("Bearer")
    # nothing reached the key service: no audit event, nothing stored
    assert stack.audit.events == []


async def test_me_shows_the_actor_and_its_roles(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/byok/me", headers=AS_MEMBER)
    assert response.status_code == 200
    assert response.json() == {"id": "bob", "operator": False, "workspaces": {"acme": "member"}}


async def test_an_app_without_identify_authenticates_nobody(
    stack: Stack, secrets_seen: Secrets
) -> None:
    async with _client(create_app(stack.app, pm=stack.pm), secrets_seen) as anonymous:
        assert_error(await anonymous.get(KEYS, headers=AS_ADMIN), 401, "unauthenticated")


async def test_identify_may_be_async_and_read_cookies(stack: Stack, secrets_seen: Secrets) -> None:
    async def identify(request) -> Actor | None:
        return ADMIN if request.cookies.get("host_session") == "s3cret" else None

    async with _client(create_app(stack.app, identify=identify, pm=stack.pm), secrets_seen) as c:
        assert_error(await c.get(KEYS), 401, "unauthenticated")
        response = await c.get(KEYS, headers={"Cookie": "host_session=s3cret"})
        assert response.status_code == 200


async def test_a_broken_identify_is_a_500_without_details(
    stack: Stack, secrets_seen: Secrets, caplog
) -> None:
    def identify(request) -> str:
        return "alice"  # not an Actor

    async with _client(create_app(stack.app, identify=identify, pm=stack.pm), secrets_seen) as c:
        response = await c.get(KEYS)
    assert_error(response, 500, "internal_error")
    assert "identify" not in response.text
    assert "TypeError" in caplog.text


# --- providers ----------------------------------------------------------------------------


async def test_providers_lists_the_catalog_with_hosted_models(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    response = await client.get("/api/byok/providers", headers=AS_MEMBER)
    assert response.status_code == 200
    data = response.json()
    assert data["catalog_version"] == stack.app.catalog.version
    by_id = {p["id"]: p for p in data["providers"]}
    assert set(by_id) == set(stack.app.catalog.providers)
    assert by_id["openai"]["name"] == "OpenAI"
    hosted = {m["id"] for p in data["providers"] for m in p["models"] if m["hosted"]}
    assert hosted == {m.id for m in stack.app.catalog.hosted_models()}


# --- listing ------------------------------------------------------------------------------


async def test_members_list_masked_keys_and_only_admins_may_manage(
    client: httpx.AsyncClient, secrets_seen: Secrets
) -> None:
    key = secrets_seen.new()
    await add_key(client, key, label="prod")
    as_member = await client.get(KEYS, headers=AS_MEMBER)
    assert as_member.status_code == 200
    listed = as_member.json()
    assert listed["workspace_id"] == "acme"
    assert listed["can_manage"] is False
    [shown] = listed["keys"]
    assert shown["hint"] == f"{key[:6]}...{key[-4:]}"
    assert shown["label"] == "prod"
    assert shown["status"] == "enabled"
    assert shown["created_by"] == "alice"
    assert shown["last_used_at"] is None
    assert "ciphertext" not in shown
    assert "fingerprint" not in shown
    as_admin = await client.get(KEYS, headers=AS_ADMIN)
    assert as_admin.json()["can_manage"] is True


async def test_a_member_of_workspace_a_gets_403_on_workspace_b(
    client: httpx.AsyncClient, stack: Stack, secrets_seen: Secrets
) -> None:
    # globex has a key (its admin stored it); acme's admin and member may not touch it
    response = await client.post(
        "/api/workspaces/globex/byok-keys",
        json={"provider": "openai", "api_key": secrets_seen.new()},
        headers=AS_OTHER,
    )
    assert response.status_code == 201
    globex_key = response.json()["key"]["id"]
    globex = "/api/workspaces/globex/byok-keys"
    for headers in (AS_ADMIN, AS_MEMBER):
        assert_error(await client.get(globex, headers=headers), 403, "forbidden")
        assert_error(
            await client.post(
                globex, json={"provider": "openai", "api_key": secrets_seen.new()}, headers=headers
            ),
            403,
            "forbidden",
        )
        assert_error(
            await client.request("DELETE", globex, json={"provider": "openai"}, headers=headers),
            403,
            "forbidden",
        )
        assert_error(
            await client.patch(
                f"{globex}/{globex_key}", json={"status": "disabled"}, headers=headers
            ),
            403,
            "forbidden",
        )
        assert_error(
            await client.post(f"{globex}/{globex_key}/test", json={}, headers=headers),
            403,
            "forbidden",
        )
    # the same answer for a key id that does not exist: no way to probe ids
    assert_error(
        await client.patch(
            f"{globex}/key_doesnotexist00", json={"status": "disabled"}, headers=AS_ADMIN
        ),
        403,
        "forbidden",
    )
    # the key is untouched, and every refusal was audited as a denial by the key service
    listed = await client.get(globex, headers=AS_OTHER)
    assert [k["status"] for k in listed.json()["keys"]] == ["enabled"]
    denials = [e for e in stack.audit.events if e.action == "access.denied"]
    assert len(denials) == 11
    assert {e.workspace_id for e in denials} == {"globex"}
    assert {e.actor_id for e in denials} == {"alice", "bob"}


# --- setting and replacing ----------------------------------------------------------------


async def test_set_creates_201_then_replaces_200_under_the_same_label(
    client: httpx.AsyncClient, stack: Stack, secrets_seen: Secrets
) -> None:
    first = secrets_seen.new()
    created = await client.post(
        KEYS, json={"provider": "openai", "api_key": first}, headers=AS_ADMIN
    )
    assert created.status_code == 201
    body = created.json()
    assert body["created"] is True
    assert body["replaced_key_id"] is None
    assert body["key"]["label"] == "default"
    assert body["check"]["status"] == "valid"  # checked live first, by default
    second = secrets_seen.new()
    replaced = await client.post(
        KEYS,
        json={"provider": "openai", "api_key": second, "label": "default", "test": False},
        headers=AS_ADMIN,
    )
    assert replaced.status_code == 200
    again = replaced.json()
    assert again["created"] is False
    assert again["replaced_key_id"] == body["key"]["id"]
    assert again["key"]["id"] != body["key"]["id"]
    assert again["check"] is None
    assert again["key"]["hint"] == f"{second[:6]}...{second[-4:]}"
    listed = (await client.get(KEYS, headers=AS_ADMIN)).json()["keys"]
    assert [k["id"] for k in listed] == [again["key"]["id"]]
    assert [e.action for e in stack.audit.events] == ["key.created", "key.replaced"]
    assert {e.actor_id for e in stack.audit.events} == {"alice"}
    assert stack.checker.seen == 1


async def test_a_member_may_not_set_a_key(
    client: httpx.AsyncClient, stack: Stack, secrets_seen: Secrets
) -> None:
    response = await client.post(
        KEYS, json={"provider": "openai", "api_key": secrets_seen.new()}, headers=AS_MEMBER
    )
    assert_error(response, 403, "forbidden")
    assert (await client.get(KEYS, headers=AS_MEMBER)).json()["keys"] == []
    [denied] = stack.audit.events
    assert (denied.action, denied.actor_id, denied.outcome) == ("access.denied", "bob", "denied")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"api_key": "x" * 30}, "provider"),
        ({"provider": "openai"}, "api_key"),
        ({"provider": "openai", "api_key": 12345}, "api_key"),
        ({"provider": "openai", "api_key": ""}, "api_key"),
        ({"provider": "openai", "api_key": "k" * 513}, "api_key"),
        ({"provider": "nope", "api_key": "x" * 30}, "provider"),
        ({"provider": "openai", "api_key": "x" * 30, "label": ""}, "label"),
        ({"provider": "openai", "api_key": "x" * 30, "label": "l" * 65}, "label"),
        ({"provider": "openai", "api_key": "x" * 30, "test": "yes"}, "test"),
        ({"provider": "openai", "api_key": "x" * 30, "apikey": "x"}, "apikey"),
    ],
    ids=[
        "no-provider",
        "no-key",
        "key-not-string",
        "empty-key",
        "key-too-long",
        "unknown-provider",
        "empty-label",
        "label-too-long",
        "test-not-bool",
        "unknown-field",
    ],
)
async def test_set_is_schema_checked_422_naming_the_field(
    client: httpx.AsyncClient, stack: Stack, body: dict, field: str
) -> None:
    response = await client.post(KEYS, json=body, headers=AS_ADMIN)
    assert_error(response, 422, "validation_error", field)
    message = response.json()["error"]["message"]
    assert field in message
    # the value sent is never quoted back
    if isinstance(body.get("api_key"), str) and body["api_key"]:
        assert body["api_key"] not in response.text
    assert stack.audit.events == []


async def test_the_body_must_be_a_json_object(client: httpx.AsyncClient) -> None:
    response = await client.post(KEYS, json=["openai", "sk-..."], headers=AS_ADMIN)
    assert_error(response, 422, "validation_error")
    assert response.json()["error"]["message"] == "the body must be an object"


async def test_the_key_services_own_checks_are_422_too(
    client: httpx.AsyncClient, secrets_seen: Secrets
) -> None:
    anthropic_key = secrets_seen.new("anthropic")
    response = await client.post(
        KEYS, json={"provider": "openai", "api_key": anthropic_key}, headers=AS_ADMIN
    )
    assert_error(response, 422, "invalid_key_format", "api_key")
    assert "Anthropic" in response.json()["error"]["message"]
    short = "sk-" + "a" * 10
    secrets_seen.keys.append(short)
    response = await client.post(
        KEYS, json={"provider": "openai", "api_key": short}, headers=AS_ADMIN
    )
    assert_error(response, 422, "invalid_key_format", "api_key")
    response = await client.post(
        KEYS,
        json={"provider": "openai", "api_key": random_key(), "label": " padded"},
        headers=AS_ADMIN,
    )
    assert_error(response, 422, "validation_error", "label")


async def test_a_key_the_provider_refuses_is_422_and_not_stored(
    client: httpx.AsyncClient, stack: Stack, secrets_seen: Secrets
) -> None:
    refused = secrets_seen.new()
    stack.checker.refused.add(refused)
    response = await client.post(
        KEYS, json={"provider": "openai", "api_key": refused}, headers=AS_ADMIN
    )
    assert_error(response, 422, "key_rejected", "api_key")
    assert "invalid" in response.json()["error"]["message"]
    unreachable = secrets_seen.new()
    stack.checker.unreachable.add(unreachable)
    response = await client.post(
        KEYS, json={"provider": "openai", "api_key": unreachable}, headers=AS_ADMIN
    )
    assert_error(response, 422, "key_rejected", "api_key")
    assert (await client.get(KEYS, headers=AS_ADMIN)).json()["keys"] == []
    # without the live check the same key is stored
    stored = await client.post(
        KEYS, json={"provider": "openai", "api_key": refused, "test": False}, headers=AS_ADMIN
    )
    assert stored.status_code == 201


async def test_the_same_key_under_another_label_is_409(
    client: httpx.AsyncClient, secrets_seen: Secrets
) -> None:
    key = secrets_seen.new()
    await add_key(client, key, label="one")
    response = await client.post(
        KEYS, json={"provider": "openai", "api_key": key, "label": "two"}, headers=AS_ADMIN
    )
    assert_error(response, 409, "duplicate_key", "api_key")


async def test_more_keys_than_the_limit_is_409(
    client: httpx.AsyncClient, secrets_seen: Secrets
) -> None:
    from byok_plugin.store.keys_repo import MAX_KEYS_PER_PROVIDER

    for n in range(MAX_KEYS_PER_PROVIDER):
        await add_key(client, secrets_seen.new(), label=f"k{n}", test=False)
    response = await client.post(
        KEYS,
        json={
            "provider": "openai",
            "api_key": secrets_seen.new(),
            "label": "one-more",
            "test": False,
        },
        headers=AS_ADMIN,
    )
    assert_error(response, 409, "key_limit_reached")


async def test_no_master_key_is_503_and_nothing_is_stored(
    tmp_path: Path, sqlite_url: str, secrets_seen: Secrets
) -> None:
    keyless = make_stack(tmp_path, sqlite_url)  # no BYOK_ENCRYPTION_KEYS, no key file
    try:
        async with _client(
            create_app(keyless.app, identify=IDENTIFY, pm=keyless.pm), secrets_seen
        ) as c:
            response = await c.post(
                KEYS, json={"provider": "openai", "api_key": secrets_seen.new()}, headers=AS_ADMIN
            )
            assert_error(response, 503, "keyring_unavailable")
            assert "byok init" in response.json()["error"]["message"]
            assert (await c.get(KEYS, headers=AS_ADMIN)).json()["keys"] == []
    finally:
        keyless.app.close()


# --- content type, size, JSON -------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ],
)
async def test_mutating_requests_need_a_json_content_type(
    client: httpx.AsyncClient, stack: Stack, secrets_seen: Secrets, content_type: str | None
) -> None:
    stored = await add_key(client, secrets_seen.new())
    key_id = stored["key"]["id"]
    payloads = [
        ("POST", KEYS, {"provider": "openai", "api_key": secrets_seen.new()}),
        ("DELETE", KEYS, {"provider": "openai"}),
        ("PATCH", f"{KEYS}/{key_id}", {"status": "disabled"}),
        ("POST", f"{KEYS}/{key_id}/test", {}),
    ]
    events_before = len(stack.audit.events)
    for method, url, body in payloads:
        headers = dict(AS_ADMIN)
        if content_type is not None:
            headers["Content-Type"] = content_type
        response = await client.request(
            method, url, content=json.dumps(body).encode(), headers=headers
        )
        assert_error(response, 415, "unsupported_media_type")
    # nothing happened
    assert len(stack.audit.events) == events_before
    [key] = (await client.get(KEYS, headers=AS_ADMIN)).json()["keys"]
    assert key["status"] == "enabled"


async def test_json_with_a_charset_is_accepted(
    client: httpx.AsyncClient, secrets_seen: Secrets
) -> None:
    body = json.dumps({"provider": "openai", "api_key": secrets_seen.new()}).encode()
    response = await client.post(
        KEYS, content=body, headers={**AS_ADMIN, "Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 201


async def test_an_oversized_body_is_413(
    client: httpx.AsyncClient, stack: Stack, secrets_seen: Secrets
) -> None:
    big = {"provider": "openai", "api_key": secrets_seen.new(), "label": "x", "pad": "p" * 20_000}
    response = await client.post(KEYS, json=big, headers=AS_ADMIN)
    assert_error(response, 413, "payload_too_large")

    async def chunks():  # no Content-Length: counted while streaming
        yield b'{"provider": "openai", "api_key": "'
        for _ in range(40):
            yield b"a" * 1024
        yield b'"}'

    response = await client.post(
        KEYS, content=chunks(), headers={**AS_ADMIN, "Content-Type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large")
    assert stack.audit.events == []


async def test_the_body_limit_is_configurable(stack: Stack, secrets_seen: Secrets) -> None:
    asgi = create_app(stack.app, identify=IDENTIFY, pm=stack.pm, max_body_bytes=1024)
    async with _client(asgi, secrets_seen) as c:
        response = await c.post(
            KEYS,
            json={
                "provider": "openai",
                "api_key": secrets_seen.new(),
                "label": "l" * 60,
                "x": "y" * 1000,
            },
            headers=AS_ADMIN,
        )
        assert_error(response, 413, "payload_too_large")
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(stack.app, identify=IDENTIFY, pm=stack.pm, max_body_bytes=10)


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"   ", b'{"provider": NaN}', b"\xff\xfe", b'{"a": 1} trailing'],
    ids=["truncated", "empty", "blank", "nan", "not-utf8", "trailing"],
)
async def test_malformed_json_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post(
        KEYS, content=raw, headers={**AS_ADMIN, "Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


# --- deleting -----------------------------------------------------------------------------


async def test_delete_one_key_by_id_then_all_of_a_provider_then_404(
    client: httpx.AsyncClient, stack: Stack, secrets_seen: Secrets
) -> None:
    one = (await add_key(client, secrets_seen.new(), label="one"))["key"]["id"]
    two = (await add_key(client, secrets_seen.new(), label="two"))["key"]["id"]
    three = (await add_key(client, secrets_seen.new(), label="three"))["key"]["id"]
    response = await client.request(
        "DELETE", KEYS, json={"provider": "openai", "key_id": one}, headers=AS_ADMIN
    )
    assert response.status_code == 200
    assert response.json() == {"deleted": [one]}
    response = await client.request("DELETE", KEYS, json={"provider": "openai"}, headers=AS_ADMIN)
    assert response.status_code == 200
    assert sorted(response.json()["deleted"]) == sorted([two, three])
    response = await client.request("DELETE", KEYS, json={"provider": "openai"}, headers=AS_ADMIN)
    assert_error(response, 404, "key_not_found")
    response = await client.request(
        "DELETE", KEYS, json={"provider": "openai", "key_id": one}, headers=AS_ADMIN
    )
    assert_error(response, 404, "key_not_found")
    assert one in response.json()["error"]["message"]
    deleted = [e.key_id for e in stack.audit.events if e.action == "key.deleted"]
    assert sorted(deleted) == sorted([one, two, three])


async def test_delete_with_the_wrong_provider_matches_nothing(
    client: httpx.AsyncClient, secrets_seen: Secrets
) -> None:
    key_id = (await add_key(client, secrets_seen.new()))["key"]["id"]
    response = await client.request(
        "DELETE", KEYS, json={"provider": "anthropic", "key_id": key_id}, headers=AS_ADMIN
    )
    assert_error(response, 404, "key_not_found")
    assert len((await client.get(KEYS, headers=AS_ADMIN)).json()["keys"]) == 1


async def test_delete_is_for_admins_and_schema_checked(
    client: httpx.AsyncClient, secrets_seen: Secrets
) -> None:
    await add_key(client, secrets_seen.new())
    assert_error(
        await client.request("DELETE", KEYS, json={"provider": "openai"}, headers=AS_MEMBER),
        403,
        "forbidden",
    )
    assert_error(
        await client.request("DELETE", KEYS, json={}, headers=AS_ADMIN),
        422,
        "validation_error",
        "provider",
    )
    assert_error(
        await client.request(
            "DELETE", KEYS, json={"provider": "openai", "key_id": "not-a-key-id"}, headers=AS_ADMIN
        ),
        422,
        "validation_error",
        "key_id",
    )
    assert len((await client.get(KEYS, headers=AS_ADMIN)).json()["keys"]) == 1


# --- enabling and disabling ---------------------------------------------------------------


async def test_disable_then_enable_a_key(
    client: httpx.AsyncClient, stack: Stack, secrets_seen: Secrets
) -> None:
    key_id = (await add_key(client, secrets_seen.new()))["key"]["id"]
    response = await client.patch(f"{KEYS}/{key_id}", json={"status": "disabled"}, headers=AS_ADMIN)
    assert response.status_code == 200
    assert response.json()["key"]["status"] == "disabled"
    assert response.json()["key"]["updated_by"] == "alice"
    [listed] = (await client.get(KEYS, headers=AS_MEMBER)).json()["keys"]
    assert listed["status"] == "disabled"
    response = await client.patch(f"{KEYS}/{key_id}", json={"status": "enabled"}, headers=AS_ADMIN)
    assert response.json()["key"]["status"] == "enabled"
    actions = [e.action for e in stack.audit.events]
    assert actions == ["key.created", "key.disabled", "key.enabled"]


async def test_update_errors(client: httpx.AsyncClient, secrets_seen: Secrets) -> None:
    key_id = (await add_key(client, secrets_seen.new()))["key"]["id"]
    assert_error(
        await client.patch(f"{KEYS}/{key_id}", json={"status": "disabled"}, headers=AS_MEMBER),
        403,
        "forbidden",
    )
    assert_error(
        await client.patch(
            f"{KEYS}/key_missing12345", json={"status": "disabled"}, headers=AS_ADMIN
        ),
        404,
        "key_not_found",
    )
    assert_error(
        await client.patch(f"{KEYS}/{key_id}", json={"status": "off"}, headers=AS_ADMIN),
        422,
        "validation_error",
        "status",
    )
    assert_error(
        await client.patch(f"{KEYS}/{key_id}", json={}, headers=AS_ADMIN),
        422,
        "validation_error",
        "status",
    )
    assert_error(
        await client.patch(f"{KEYS}/bad id", json={"status": "disabled"}, headers=AS_ADMIN),
        422,
        "validation_error",
        "key_id",
    )
    [listed] = (await client.get(KEYS, headers=AS_ADMIN)).json()["keys"]
    assert listed["status"] == "enabled"


# --- testing ------------------------------------------------------------------------------


async def test_testing_a_stored_key(
    client: httpx.AsyncClient, stack: Stack, secrets_seen: Secrets
) -> None:
    key = secrets_seen.new()
    key_id = (await add_key(client, key, test=False))["key"]["id"]
    response = await client.post(f"{KEYS}/{key_id}/test", json={}, headers=AS_ADMIN)
    assert response.status_code == 200
    assert response.json() == {
        "key_id": key_id,
        "provider": "openai",
        "status": "valid",
        "message": "the provider accepted the key",
    }
    stack.checker.refused.add(key)
    # an empty body is fine, as long as it says JSON
    response = await client.post(
        f"{KEYS}/{key_id}/test", headers={**AS_ADMIN, "Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert response.json()["status"] == "invalid"
    tested = [e for e in stack.audit.events if e.action == "key.tested"]
    assert [e.outcome for e in tested] == ["ok", "error"]


async def test_test_errors(client: httpx.AsyncClient, secrets_seen: Secrets) -> None:
    key_id = (await add_key(client, secrets_seen.new()))["key"]["id"]
    assert_error(
        await client.post(f"{KEYS}/{key_id}/test", json={}, headers=AS_MEMBER), 403, "forbidden"
    )
    assert_error(
        await client.post(f"{KEYS}/key_missing12345/test", json={}, headers=AS_ADMIN),
        404,
        "key_not_found",
    )
    assert_error(
        await client.post(f"{KEYS}/{key_id}/test", json={"x": 1}, headers=AS_ADMIN),
        422,
        "validation_error",
        "x",
    )


async def test_a_key_that_does_not_decrypt_is_an_error_not_a_silent_pass(
    tmp_path: Path, sqlite_url: str, secrets_seen: Secrets
) -> None:
    first = make_stack(tmp_path, sqlite_url, master_keys=master_key_value("mk-one"))
    async with _client(create_app(first.app, identify=IDENTIFY, pm=first.pm), secrets_seen) as c:
        key_id = (await add_key(c, secrets_seen.new()))["key"]["id"]
    first.app.close()
    # the same database, opened with another master key
    other = make_stack(tmp_path, sqlite_url, master_keys=master_key_value("mk-two"))
    try:
        async with _client(
            create_app(other.app, identify=IDENTIFY, pm=other.pm), secrets_seen
        ) as c:
            response = await c.post(f"{KEYS}/{key_id}/test", json={}, headers=AS_ADMIN)
            assert_error(response, 500, "key_undecryptable")
            assert "mk-one" in response.json()["error"]["message"]
            # listing never decrypts, so it still works
            assert (await c.get(KEYS, headers=AS_ADMIN)).status_code == 200
    finally:
        other.app.close()


# --- routing errors -----------------------------------------------------------------------


async def test_unknown_routes_and_methods_are_json_errors(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/nothing", headers=AS_ADMIN), 404, "not_found")
    response = await client.put(KEYS, json={}, headers=AS_ADMIN)
    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) >= {"GET", "POST", "DELETE"}
    assert_error(
        await client.get(f"{KEYS}/key_abcdefgh1234", headers=AS_ADMIN), 405, "method_not_allowed"
    )


# --- the page -----------------------------------------------------------------------------


async def test_the_settings_page_and_its_files_are_served_with_a_strict_policy(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/settings/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert '<script src="settings.js"' in page.text
    assert (
        (await client.get("/settings/settings.css")).headers["content-type"].startswith("text/css")
    )
    assert (
        (await client.get("/settings/settings.js"))
        .headers["content-type"]
        .startswith("text/javascript")
    )
    redirect = await client.get("/settings")
    assert redirect.status_code in (307, 308)


# --- on PostgreSQL too --------------------------------------------------------------------


async def test_the_whole_cycle_on_each_database(
    tmp_path: Path, database_url: str, secrets_seen: Secrets
) -> None:
    built = make_stack(tmp_path, database_url, master_keys=master_key_value())
    try:
        async with _client(
            create_app(built.app, identify=IDENTIFY, pm=built.pm), secrets_seen
        ) as c:
            key_id = (await add_key(c, secrets_seen.new()))["key"]["id"]
            replaced = await add_key(c, secrets_seen.new())
            assert replaced["replaced_key_id"] == key_id
            new_id = replaced["key"]["id"]
            assert (
                await c.patch(f"{KEYS}/{new_id}", json={"status": "disabled"}, headers=AS_ADMIN)
            ).status_code == 200
            assert (await c.post(f"{KEYS}/{new_id}/test", json={}, headers=AS_ADMIN)).json()[
                "status"
            ] == "valid"
            assert (
                await c.request("DELETE", KEYS, json={"provider": "openai"}, headers=AS_ADMIN)
            ).status_code == 200
            assert (await c.get(KEYS, headers=AS_MEMBER)).json()["keys"] == []
    finally:
        built.app.close()
