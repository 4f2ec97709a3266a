"""A fuzz run of the key API from its own OpenAPI document (schemathesis), on a real uvicorn server
on loopback (some of schemathesis's checks send probes of their own, so it needs a URL).

Every operation gets schema-valid and schema-invalid requests; schemathesis checks each answer
against the document (status codes, content types, response schemas, 405 for undeclared methods,
401 without credentials), and this test adds: no 5xx at all, and no plaintext key (neither a key
seeded in the store nor one a request sent) in any response. Bounded: 25 examples per operation
and phase, so the whole run takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import schemathesis
from byok_hookspecs import Actor
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from server_support import (
    ADMIN,
    ADMIN_TOKEN,
    live_server,
    make_stack,
    master_key_value,
    random_key,
)

from byok_plugin.server import BearerTokens, LocalLogin, create_app, openapi_document
from byok_plugin.server.local import create_local_app

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROVIDERS = ("openai", "anthropic", "google", "mistral", "exa")
FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)

# A schema-valid request may still be refused by the key service's own rules (a provider's key
# prefix, a control character in a workspace id, a duplicate key, the live check): 409 and 422,
# never 400, 413 or 415, which say the request itself was malformed. A schema-violating request
# may also be refused for its size (413).
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]
            },
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "403", "404", "405", "413", "415", "422"]
            },
        }
    }
)
# the document generated from the code, the one the app serves (test_server.py checks it)
schema = schemathesis.openapi.from_dict(openapi_document(), config=CONFIG)
#: every operation of an app made with create_app (the login route exists only under byok serve)
hosted = schema.exclude(path="/api/byok/session")
local = schema.include(path="/api/byok/session")


@dataclass(frozen=True)
class Target:
    base_url: str
    secrets: tuple[str, ...]  # what must never come back
    key_ids: tuple[str, ...] = ()  # stored keys


@pytest.fixture
def hosted_target(tmp_path: Path, sqlite_url: str) -> Iterator[Target]:
    """create_app on uvicorn, with random keys already stored in the admin's workspace."""
    stack = make_stack(tmp_path, sqlite_url, master_keys=master_key_value())
    service = stack.app.key_service(stack.pm)
    seeded, key_ids = [], []
    for provider in ("openai", "anthropic", "exa", "exa"):
        seeded.append(random_key(provider))
        label = f"seeded-{len(seeded)}"
        result = service.set_key(ADMIN, "acme", provider, seeded[-1], label=label, test=False)
        key_ids.append(result.key.id)
    asgi = create_app(stack.app, identify=BearerTokens({ADMIN_TOKEN: ADMIN}), pm=stack.pm)
    try:
        with live_server(asgi) as url:
            yield Target(url, tuple(seeded), tuple(key_ids))
    finally:
        stack.app.close()


@pytest.fixture
def local_target(tmp_path: Path, sqlite_url: str) -> Iterator[Target]:
    """byok serve's app, whose login token the fuzzer does not know."""
    stack = make_stack(tmp_path, sqlite_url, master_keys=master_key_value())
    login = LocalLogin(Actor("local-operator", operator=True))
    token = login.issue_token()
    try:
        with live_server(create_local_app(stack.app, login, pm=stack.pm)) as url:
            yield Target(url, (token,))
    finally:
        stack.app.close()


def _sent_keys(case) -> list[str]:
    """The api_key a request carried, when it is long enough to mean something and the request
    did not also put it in its path or query (an error may name the workspace id it was given)."""
    body = case.body if isinstance(case.body, dict) else {}
    value = body.get("api_key")
    if not isinstance(value, str) or len(value) < 12:
        return []
    elsewhere = [case.formatted_path, *map(str, (case.query or {}).values())]
    return [] if any(value in part for part in elsewhere) else [value]


def _check(case, target: Target, headers: dict[str, str]) -> None:
    response = case.call(base_url=target.base_url, headers=headers)
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text}"
    shown = response.text + repr(dict(response.headers))
    for secret in (*target.secrets, *_sent_keys(case)):
        assert secret not in shown, f"a secret in the answer to {where}"
    case.validate_response(
        response,
        headers=headers,
        transport_kwargs={"base_url": target.base_url, "headers": headers},
    )


def _steer(case, target: Target) -> None:
    """Send half of the cases where the key service does real work: the admin's own workspace,
    a stored key's id, a key of the provider's shape. The choice depends on the generated data
    only, so that hypothesis can replay and shrink a failure. Schema-violating cases are left as
    generated."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    params = case.path_parameters or {}
    if len(params.get("workspace_id", "x")) % 2 == 0:
        params["workspace_id"] = "acme"
    if "key_id" in params and len(params["key_id"]) % 2 == 0:
        params["key_id"] = target.key_ids[len(params["key_id"]) % len(target.key_ids)]
    body = case.body if isinstance(case.body, dict) else {}
    provider, api_key = body.get("provider"), body.get("api_key")
    if isinstance(api_key, str) and len(api_key) % 2 == 0 and provider in PROVIDERS:
        body["api_key"] = random_key(provider)


@hosted.parametrize()
@FUZZ_SETTINGS
def test_fuzz_the_api_from_its_openapi_document(case, hosted_target: Target) -> None:
    _steer(case, hosted_target)
    _check(case, hosted_target, AUTH)


@local.parametrize()
@FUZZ_SETTINGS
def test_fuzz_the_byok_serve_login(case, local_target: Target) -> None:
    _check(case, local_target, {})
