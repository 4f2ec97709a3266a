"""The routes of the key management API and of the settings page.

Every key route goes through :class:`~byok_plugin.keys.service.KeyService`, the same service as the
``byok keys`` command: it asks ``byok_authorize`` and reports to ``byok_audit``. The service is
synchronous (it talks to the database), so it runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import pluggy
from byok_hookspecs import Action, Actor, AuditEvent, ByokError, KeyCheck, NotAuthorized, Role
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from byok_plugin import __version__
from byok_plugin.core.errors import InvalidInput, KeyNotFound
from byok_plugin.core.key_format import check_key_id, check_workspace_id
from byok_plugin.server import models
from byok_plugin.server.bodies import read_json_body
from byok_plugin.server.errors import (
    ApiError,
    ErrorCode,
    error_from_library,
    error_response,
    log_unexpected,
)
from byok_plugin.server.identity import Identify, resolve_actor
from byok_plugin.server.models import KEY_ID_PATTERN
from byok_plugin.server.openapi import api_route, document_of, path_param, query_param
from byok_plugin.server.org_routes import organization_routes
from byok_plugin.server.workspace_views import WorkspaceViews

if TYPE_CHECKING:
    from byok_plugin.app import App
    from byok_plugin.keys.service import KeyService
    from byok_plugin.store.keys_repo import KeyInfo

__all__ = ["API_HEADERS", "PAGE_HEADERS", "Api", "api_routes", "build_routes", "documentation_api"]

#: on every API answer: never cached (the list of keys is private), never sniffed
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
#: on the page and its files: nothing from elsewhere, no framing, no referrer
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

_KEY_FIELDS = (
    "id",
    "provider",
    "label",
    "hint",
    "status",
    "created_at",
    "created_by",
    "updated_at",
    "updated_by",
    "last_used_at",
    "cooldown_until",
)


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def key_json(info: KeyInfo) -> dict[str, Any]:
    """What the API shows of a stored key: masked, no ciphertext, no fingerprint."""
    return {name: _iso(getattr(info, name)) for name in _KEY_FIELDS}


def check_json(check: KeyCheck, key_id: str | None) -> dict[str, Any]:
    """What the API shows of a key check: the provider's verdict and its message."""
    return {
        "key_id": key_id,
        "provider": check.provider,
        "status": check.status.value,
        "message": check.message,
    }


def ok(data: Any, status: int = 200) -> JSONResponse:
    """A JSON answer with :data:`API_HEADERS` (never cached, never sniffed)."""
    return JSONResponse(data, status_code=status, headers=API_HEADERS)


Handler = Callable[[Request], Awaitable[Response]]


def endpoint(handler: Handler) -> Handler:
    """Answer every failure as a JSON error: API errors as given, the key service's errors by
    kind, anything else as a 500 that is logged by type and stack, never by message."""

    @wraps(handler)
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc)
        except ByokError as exc:
            return error_response(error_from_library(exc))
        except Exception as exc:
            log_unexpected(exc, f"{request.method} {request.url.path} failed")
            return error_response(
                ApiError(ErrorCode.INTERNAL_ERROR, "the server failed; see its log")
            )

    return run


@dataclass
class Api:
    """The API's collaborators: the app, the plugin manager and the host's identity callable."""

    app: App
    pm: pluggy.PluginManager
    identify: Identify | None
    max_body_bytes: int

    def __post_init__(self) -> None:
        self._service: KeyService | None = None
        self._document: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def service(self) -> KeyService:
        """The key service, built once; the lock keeps two first requests from opening (and
        migrating) the store twice."""
        with self._lock:
            if self._service is None:
                service = self.app.key_service(self.pm)
                _ = self.app.key_store  # open and migrate the store now, under the lock
                self._service = service
            return self._service

    def allowed(self, actor: Actor, workspace_id: str, action: Action) -> bool:
        """Whether ``byok_authorize`` lets ``actor`` do ``action`` in the workspace."""
        answer = self.pm.hook.byok_authorize(actor=actor, workspace_id=workspace_id, action=action)
        return answer is True

    def authorize(self, actor: Actor, workspace_id: str, action: Action, what: str) -> None:
        """403 (audited as ``access.denied``, naming ``what``) when ``actor`` may not do
        ``action`` in the workspace."""
        if not self.allowed(actor, workspace_id, action):
            self.pm.hook.byok_audit(
                event=AuditEvent(
                    action="access.denied",
                    workspace_id=workspace_id,
                    actor_id=actor.id,
                    outcome="denied",
                    detail=f"{action.value} ({what})",
                    occurred_at=self.app.clock(),
                )
            )
            raise NotAuthorized(actor.id, workspace_id, action.value)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a key service call in a worker thread."""

        def work() -> Any:
            return fn(self.service(), *args, **kwargs)

        return await run_in_threadpool(work)

    async def actor(self, request: Request) -> Actor:
        """Who sent ``request``, as the host's ``identify`` says; 401 when nobody."""
        actor = await resolve_actor(self.identify, request)
        if actor is None:
            raise ApiError(
                ErrorCode.UNAUTHENTICATED,
                "sign in first: this request carries no identity the host accepts",
                headers=(("WWW-Authenticate", 'Bearer realm="byok"'),),
            )
        return actor

    async def body(
        self, request: Request, schema: str, *, optional: bool = False
    ) -> dict[str, Any]:
        """The request's JSON body, validated by the named request model."""
        return await read_json_body(request, schema, limit=self.max_body_bytes, optional=optional)

    # --- the routes ------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """``GET /api/byok/health``: up, and which version."""
        return ok({"status": "ok", "version": __version__})

    async def openapi(self, request: Request) -> Response:
        """``GET /api/byok/openapi.json``: the OpenAPI document of this app's operations,
        generated from its routes and models."""
        if self._document is None:
            self._document = document_of(request.app.routes)
        return JSONResponse(self._document, headers={"Cache-Control": "no-cache"})

    async def me(self, request: Request) -> Response:
        """``GET /api/byok/me``: the caller and its workspace roles."""
        actor = await self.actor(request)
        roles = {ws: Role(role).value for ws, role in actor.roles.items()}
        return ok({"id": actor.id, "operator": actor.operator, "workspaces": roles})

    async def providers(self, request: Request) -> Response:
        """``GET /api/byok/providers``: the catalog's providers and their models."""
        await self.actor(request)
        catalog = self.app.catalog
        providers = [
            {
                "id": info.id,
                "name": info.name,
                "models": [
                    {"id": m.id, "kind": m.kind, "hosted": m.hosted, "aliases": list(m.aliases)}
                    for m in catalog.models_of(info.id)
                ],
            }
            for info in catalog.providers.values()
        ]
        return ok({"catalog_version": catalog.version, "providers": providers})

    async def list_keys(self, request: Request) -> Response:
        """``GET .../byok-keys``: the workspace's keys, masked, and whether the caller may manage them."""
        actor = await self.actor(request)
        workspace_id = request.path_params["workspace_id"]

        def work(service: KeyService) -> dict[str, Any]:
            keys = service.list_keys(actor, workspace_id)
            return {
                "workspace_id": workspace_id,
                "can_manage": self.allowed(actor, workspace_id, Action.MANAGE_KEYS),
                "keys": [key_json(k) for k in keys],
            }

        return ok(await self.call(work))

    async def set_key(self, request: Request) -> Response:
        """``POST .../byok-keys``: store a key (201), or replace the one under its label (200)."""
        actor = await self.actor(request)
        workspace_id = request.path_params["workspace_id"]
        body = await self.body(request, "SetKeyRequest")

        def work(service: KeyService) -> Any:
            result = service.set_key(
                actor,
                workspace_id,
                body["provider"],
                body["api_key"],
                label=body.get("label"),
                test=body.get("test", True),
            )
            if result.replaced is None:
                return result, []
            # a budget narrowed to the replaced key applies to no call any more: say so
            scoped = self.app.budgets.scoped_to_keys([result.replaced.id])
            return result, [
                f"budget {name!r} of workspace {ws!r} is narrowed to the replaced key {old}: it "
                f"no longer applies to any call; set it again with key id {result.key.id} to "
                "keep it"
                for ws, name, old in scoped
            ]

        result, budget_warnings = await self.call(work)
        return ok(
            {
                "key": key_json(result.key),
                "created": result.replaced is None,
                "replaced_key_id": result.replaced.id if result.replaced is not None else None,
                "warnings": [*result.warnings, *budget_warnings],
                "check": check_json(result.check, None) if result.check is not None else None,
            },
            status=201 if result.replaced is None else 200,
        )

    async def delete_keys(self, request: Request) -> Response:
        """``DELETE .../byok-keys``: delete a provider's keys, or one of them by id."""
        actor = await self.actor(request)
        workspace_id = request.path_params["workspace_id"]
        body = await self.body(request, "DeleteKeysRequest")

        def work(service: KeyService) -> list[KeyInfo]:
            return service.delete_keys(
                actor, workspace_id, body["provider"], key_id=body.get("key_id")
            )

        deleted = await self.call(work)
        return ok({"deleted": [info.id for info in deleted]})

    def _provider_of(
        self, service: KeyService, actor: Actor, workspace_id: str, key_id: str, what: str
    ) -> str:
        """The provider of a key named by id alone (the service selects by provider and id).

        Authorization comes first, through the service (a denial is audited as for any other
        call), so that an outsider cannot tell an existing key id from a missing one.
        """
        try:
            workspace_id = check_workspace_id(workspace_id)
        except InvalidInput as exc:
            raise ApiError(ErrorCode.VALIDATION_ERROR, str(exc), "workspace_id") from None
        try:
            key_id = check_key_id(key_id)
        except InvalidInput as exc:
            raise ApiError(ErrorCode.VALIDATION_ERROR, str(exc), "key_id") from None
        service.authorize(actor, workspace_id, Action.MANAGE_KEYS, what=what, key_id=key_id)
        found = self.app.key_store.find(workspace_id, None, key_id=key_id)
        if not found:
            raise KeyNotFound(workspace_id, None, f"with id {key_id}")
        return found[0].provider

    async def update_key(self, request: Request) -> Response:
        """``PATCH .../byok-keys/{key_id}``: enable or disable a key."""
        actor = await self.actor(request)
        workspace_id = request.path_params["workspace_id"]
        key_id = request.path_params["key_id"]
        body = await self.body(request, "UpdateKeyRequest")
        status = body["status"]

        def work(service: KeyService) -> list[KeyInfo]:
            verb = "enable" if status == "enabled" else "disable"
            provider = self._provider_of(service, actor, workspace_id, key_id, f"{verb} keys")
            change = service.enable if status == "enabled" else service.disable
            return change(actor, workspace_id, provider, key_id=key_id)

        changed = await self.call(work)
        return ok({"key": key_json(changed[0])})

    async def test_key(self, request: Request) -> Response:
        """``POST .../byok-keys/{key_id}/test``: check a stored key with its provider."""
        actor = await self.actor(request)
        workspace_id = request.path_params["workspace_id"]
        key_id = request.path_params["key_id"]
        await self.body(request, "TestKeyRequest", optional=True)

        def work(service: KeyService) -> Any:
            provider = self._provider_of(service, actor, workspace_id, key_id, "test keys")
            return service.test_keys(actor, workspace_id, provider, key_id=key_id)

        results = await self.call(work)
        return ok(check_json(results[0].check, results[0].key.id))


class BudgetRoutes:
    """The budget routes: members read a workspace's budgets, admins set and delete them (the
    same rules as ``byok budget``); changes are audited through ``byok_audit``."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def _authorize(self, actor: Actor, workspace_id: str, action: Action) -> str:
        """The checked workspace id; 422 when malformed, 403 (audited) when not allowed."""
        try:
            workspace_id = check_workspace_id(workspace_id)
        except InvalidInput as exc:
            raise ApiError(ErrorCode.VALIDATION_ERROR, str(exc), "workspace_id") from None
        self.api.authorize(actor, workspace_id, action, "budgets")
        return workspace_id

    async def list_budgets(self, request: Request) -> Response:
        """``GET .../byok-budgets``: the workspace's budgets, spent, reserved and left."""
        actor = await self.api.actor(request)

        def work() -> dict[str, Any]:
            workspace_id = self._authorize(
                actor, request.path_params["workspace_id"], Action.READ_USAGE
            )
            found = self.api.app.budgets.list_budgets(workspace_id)
            return {
                "workspace_id": workspace_id,
                "can_manage": self.api.allowed(actor, workspace_id, Action.MANAGE_KEYS),
                "budgets": [b.as_dict() for b in found],
            }

        return ok(await run_in_threadpool(work))

    async def set_budget(self, request: Request) -> Response:
        """``PUT .../byok-budgets/{name}``: create or change a budget."""
        from byok_plugin.billing.budgets import BudgetError

        actor = await self.api.actor(request)
        body = await self.api.body(request, "SetBudgetRequest")

        def work() -> dict[str, Any]:
            workspace_id = self._authorize(
                actor, request.path_params["workspace_id"], Action.MANAGE_KEYS
            )
            try:
                budget = self.api.app.budgets.set_budget(
                    workspace_id,
                    request.path_params["name"],
                    limit=body["limit"],
                    metric=body.get("metric", "charge"),
                    period=body.get("period", "month"),
                    hard=body.get("hard", True),
                    thresholds=body.get("thresholds", (50, 80, 100)),
                    key_id=body.get("key_id"),
                    workflow_id=body.get("workflow_id"),
                    actor_id=actor.id,
                )
            except BudgetError as exc:
                raise ApiError(ErrorCode.VALIDATION_ERROR, str(exc)) from None
            self.api.pm.hook.byok_audit(
                event=AuditEvent(
                    action="budget.set",
                    workspace_id=workspace_id,
                    actor_id=actor.id,
                    key_id=budget.key_id,
                    detail=f"budget {budget.name!r}: limit {budget.limit:f} USD",
                    occurred_at=self.api.app.clock(),
                )
            )
            return {"budget": budget.as_dict()}

        return ok(await run_in_threadpool(work))

    async def delete_budget(self, request: Request) -> Response:
        """``DELETE .../byok-budgets/{name}``: delete a budget."""
        actor = await self.api.actor(request)
        name = request.path_params["name"]

        def work() -> dict[str, Any]:
            workspace_id = self._authorize(
                actor, request.path_params["workspace_id"], Action.MANAGE_KEYS
            )
            if not self.api.app.budgets.delete(workspace_id, name):
                raise ApiError(
                    ErrorCode.NOT_FOUND, f"workspace {workspace_id!r} has no budget {name!r}"
                )
            self.api.pm.hook.byok_audit(
                event=AuditEvent(
                    action="budget.deleted",
                    workspace_id=workspace_id,
                    actor_id=actor.id,
                    detail=f"budget {name!r}",
                    occurred_at=self.api.app.clock(),
                )
            )
            return {"deleted": name}

        return ok(await run_in_threadpool(work))


def _query_since(request: Request) -> datetime | None:
    """The ``since`` query parameter: an ISO 8601 date or time (naive means UTC); 422 if not."""
    from datetime import UTC

    text = request.query_params.get("since")
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        # in UTC now: a time at the very edge of the calendar fails here, not in the store
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ApiError(
            ErrorCode.VALIDATION_ERROR,
            "since must be an ISO 8601 date or time, such as 2026-11-01 or 2026-11-01T09:30:00Z",
            "since",
        ) from None
    return moment


def _query_limit(request: Request) -> int:
    """The ``limit`` query parameter: a whole number from 1 to the most one read returns."""
    from byok_plugin.audit_log import DEFAULT_LIMIT, MAX_LIMIT

    text = request.query_params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR,
            f"limit must be a whole number from 1 to {MAX_LIMIT}",
            "limit",
        )
    return int(text)


def _query_before(request: Request) -> int | None:
    """The ``before`` query parameter: the cursor of an older page, as ``older`` gave it."""
    from byok_plugin.audit_log import MAX_CURSOR

    text = request.query_params.get("before")
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_CURSOR:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR,
            "before must be the older cursor of a previous page (a whole number)",
            "before",
        )
    return int(text)


async def read_audit(api: Api, request: Request) -> Response:
    """``GET .../byok-audit``: the workspace's audit log, newest first, for its admins and
    operators (a refusal is audited); ``older`` is the cursor of the next page (``before=``)."""
    from byok_plugin.audit_log import AuditQuery, event_json, read_audit_page

    actor = await api.actor(request)
    workspace_id = request.path_params["workspace_id"]
    try:
        workspace_id = check_workspace_id(workspace_id)
    except InvalidInput as exc:
        raise ApiError(ErrorCode.VALIDATION_ERROR, str(exc), "workspace_id") from None
    query = AuditQuery(
        workspace_id=workspace_id,
        since=_query_since(request),
        limit=_query_limit(request),
        before=_query_before(request),
    )

    def work() -> dict[str, Any]:
        page = read_audit_page(api.pm, api.app.audit_store, actor, query, clock=api.app.clock)
        return {
            "workspace_id": workspace_id,
            "events": [event_json(e) for e in page.events],
            "older": page.older,
        }

    return ok(await run_in_threadpool(work))


def _static_file(name: str, media_type: str) -> Handler:
    """One file of the settings page, read from the package once."""
    content = resources.files("byok_plugin.server").joinpath("static", name).read_bytes()

    async def serve(request: Request) -> Response:
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return serve


#: the path parameters, as documented (their values are checked by the routes' own code)
WORKSPACE_ID = path_param(
    "workspace_id",
    "The workspace: up to 200 characters, no control characters, no leading or trailing "
    "whitespace (`validation_error` otherwise). Whether the caller may use it is decided from "
    "the caller's identity, never from this value.",
    {"minLength": 1, "maxLength": 200},
)
KEY_ID = path_param("key_id", "A stored key's id, as `key_...`.", {"pattern": KEY_ID_PATTERN})
BUDGET_NAME = path_param(
    "name",
    "The budget's name: 1-64 letters, digits, `.`, `_` or `-`, starting with a letter or digit.",
    {"minLength": 1, "maxLength": 64},
)

#: what a workspace route that reads the store can answer besides its own errors
READ_ERRORS = (ErrorCode.FORBIDDEN, ErrorCode.VALIDATION_ERROR, ErrorCode.STORE_UNAVAILABLE)
#: what a key service call that stores or checks a key can answer
KEY_ERRORS = (
    ErrorCode.FORBIDDEN,
    ErrorCode.VALIDATION_ERROR,
    ErrorCode.UNKNOWN_PROVIDER,
    ErrorCode.INVALID_KEY_FORMAT,
    ErrorCode.KEY_REJECTED,
    ErrorCode.KEYRING_UNAVAILABLE,
    ErrorCode.STORE_UNAVAILABLE,
)


def key_routes(
    keys: str,
    list_keys: Handler,
    set_key: Handler,
    delete_keys: Handler,
    *,
    what: str,
    params: tuple[inspect.Parameter, ...],
    errors: tuple[ErrorCode, ...] = (),
) -> list[APIRoute]:
    """``GET|POST|DELETE`` on a key pool (a workspace's, or an organization's)."""
    suffix = "" if what == "workspace" else "Organization"
    return [
        api_route(
            keys,
            "GET",
            endpoint(list_keys),
            name=f"list{suffix}Keys",
            summary=f"List the {what}'s keys (masked)",
            answers={
                200: (models.KeyList, "The keys, masked, and whether the caller may manage them.")
            },
            errors=(*READ_ERRORS, *errors),
            params=params,
        ),
        api_route(
            keys,
            "POST",
            endpoint(set_key),
            name=f"set{suffix}Key",
            summary=f"Store a key for the {what} (or replace the one under its label)",
            answers={
                201: (models.SetKeyResult, "Stored."),
                200: (models.SetKeyResult, "Replaced the key stored under this label."),
            },
            errors=(*KEY_ERRORS, ErrorCode.DUPLICATE_KEY, ErrorCode.KEY_LIMIT_REACHED, *errors),
            body="SetKeyRequest",
            params=params,
        ),
        api_route(
            keys,
            "DELETE",
            endpoint(delete_keys),
            name=f"delete{suffix}Keys",
            summary=f"Delete a provider's keys of the {what}, or one of them by id",
            answers={200: (models.DeleteKeysResult, "The ids of the deleted keys.")},
            errors=(*READ_ERRORS, ErrorCode.KEY_NOT_FOUND, *errors),
            body="DeleteKeysRequest",
            params=params,
        ),
    ]


def api_routes(api: Api) -> list[BaseRoute]:
    """The API's documented operations, relative to where the host mounts the app."""
    keys = "/api/workspaces/{workspace_id}/byok-keys"
    budgets = BudgetRoutes(api)
    budget = "/api/workspaces/{workspace_id}/byok-budgets"
    views = WorkspaceViews(api)
    ws = (WORKSPACE_ID,)
    return [
        api_route(
            "/api/byok/health",
            "GET",
            endpoint(api.health),
            name="health",
            summary="Up, and which version",
            answers={200: (models.Health, "Up.")},
            public=True,
        ),
        api_route(
            "/api/byok/openapi.json",
            "GET",
            endpoint(api.openapi),
            name="openapi",
            summary="This document",
            answers={200: (None, "The OpenAPI document, generated from the code.")},
            public=True,
        ),
        api_route(
            "/api/byok/me",
            "GET",
            endpoint(api.me),
            name="whoami",
            summary="The caller and its workspace roles",
            answers={200: (models.Me, "The caller.")},
        ),
        api_route(
            "/api/byok/providers",
            "GET",
            endpoint(api.providers),
            name="listProviders",
            summary="The catalog's providers and their models",
            answers={200: (models.Providers, "The catalog.")},
        ),
        *key_routes(keys, api.list_keys, api.set_key, api.delete_keys, what="workspace", params=ws),
        api_route(
            keys + "/{key_id}",
            "PATCH",
            endpoint(api.update_key),
            name="updateKey",
            summary="Enable or disable a key",
            answers={200: (models.KeyResult, "The key as it is now.")},
            errors=(*READ_ERRORS, ErrorCode.KEY_NOT_FOUND),
            body="UpdateKeyRequest",
            params=(WORKSPACE_ID, KEY_ID),
        ),
        api_route(
            keys + "/{key_id}/test",
            "POST",
            endpoint(api.test_key),
            name="testKey",
            summary="Check a stored key with its provider",
            answers={200: (models.KeyCheck, "The provider's verdict (`invalid` too is a 200).")},
            errors=(*KEY_ERRORS, ErrorCode.KEY_NOT_FOUND, ErrorCode.KEY_UNDECRYPTABLE),
            body="TestKeyRequest",
            params=(WORKSPACE_ID, KEY_ID),
        ),
        api_route(
            budget,
            "GET",
            endpoint(budgets.list_budgets),
            name="listBudgets",
            summary="The workspace's budgets: spent, reserved and left",
            answers={200: (models.BudgetList, "The budgets.")},
            errors=READ_ERRORS,
            params=ws,
        ),
        api_route(
            budget + "/{name}",
            "PUT",
            endpoint(budgets.set_budget),
            name="setBudget",
            summary="Create or change a budget (admins)",
            answers={200: (models.BudgetResult, "The budget as it is now.")},
            errors=READ_ERRORS,
            body="SetBudgetRequest",
            params=(WORKSPACE_ID, BUDGET_NAME),
        ),
        api_route(
            budget + "/{name}",
            "DELETE",
            endpoint(budgets.delete_budget),
            name="deleteBudget",
            summary="Delete a budget (admins)",
            answers={200: (models.DeleteBudgetResult, "Deleted.")},
            errors=(*READ_ERRORS, ErrorCode.NOT_FOUND),
            params=(WORKSPACE_ID, BUDGET_NAME),
        ),
        *organization_routes(api, endpoint, key_routes),
        api_route(
            "/api/workspaces/{workspace_id}/byok-usage",
            "GET",
            endpoint(views.usage),
            name="readUsage",
            summary="The workspace's usage and spend, by day, model and block",
            answers={200: (models.Usage, "The usage of the period asked for.")},
            errors=READ_ERRORS,
            params=(WORKSPACE_ID, *USAGE_PARAMS),
        ),
        api_route(
            "/api/workspaces/{workspace_id}/byok-fallback",
            "GET",
            endpoint(views.get_fallback),
            name="readFallbackPolicy",
            summary="The workspace's fallback policy",
            answers={200: (models.FallbackPolicy, "The policy.")},
            errors=READ_ERRORS,
            params=ws,
        ),
        api_route(
            "/api/workspaces/{workspace_id}/byok-fallback",
            "PUT",
            endpoint(views.set_fallback),
            name="setFallbackPolicy",
            summary="Change the workspace's fallback policy (admins)",
            answers={200: (models.FallbackPolicy, "The policy as it is now.")},
            errors=READ_ERRORS,
            body="SetFallbackRequest",
            params=ws,
        ),
        api_route(
            "/api/workspaces/{workspace_id}/byok-audit",
            "GET",
            endpoint(lambda request: read_audit(api, request)),
            name="readAuditLog",
            summary="The workspace's audit log, newest first (admins and operators)",
            answers={
                200: (models.AuditLog, "One page of events; `older` is the next page's cursor.")
            },
            errors=READ_ERRORS,
            params=(WORKSPACE_ID, *AUDIT_PARAMS),
        ),
    ]


#: the audit route's query parameters
AUDIT_PARAMS = (
    query_param(
        "since",
        "Only events at or after this ISO 8601 date or time (a time without an offset is UTC; "
        "`validation_error` otherwise).",
        {"type": "string", "maxLength": 64},
    ),
    query_param(
        "limit",
        "At most this many events (default 100; `validation_error` outside 1-1000).",
        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    ),
    query_param(
        "before",
        "The cursor of an older page: the `older` of the previous answer (`validation_error` if "
        "it is not a whole number from 1 to 2^63-1; a cursor of no event gives no events).",
        {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    ),
)
#: the usage route's query parameters
USAGE_PARAMS = (
    query_param(
        "days",
        "How many days, today included (default 30; `validation_error` outside 1-366).",
        {"type": "integer", "minimum": 1, "maximum": 366, "default": 30},
    ),
    query_param(
        "period",
        "`month`: this calendar month (UTC) so far, from its first day to today, instead of "
        "`days` (`validation_error` for another value, or with `days`).",
        {"type": "string", "enum": ["month"]},
    ),
)


def head_routes(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """``HEAD`` wherever ``GET`` is served (undocumented, as HTTP implies it)."""
    return [
        Route(route.path, route.endpoint, methods=["HEAD"])
        for route in routes
        if isinstance(route, APIRoute) and "GET" in (route.methods or ())
    ]


def documentation_api() -> Api:
    """An :class:`Api` whose routes are only documented, never called (for the document of
    every operation, with no app to serve them)."""
    return Api(
        app=cast("App", None), pm=cast(pluggy.PluginManager, None), identify=None, max_body_bytes=0
    )


def build_routes(api: Api) -> list[BaseRoute]:
    """The API's routes and the settings page's, relative to where the host mounts the app."""
    documented = api_routes(api)
    return [
        *documented,
        *head_routes(documented),
        Route(
            "/settings/", _static_file("index.html", "text/html; charset=utf-8"), methods=["GET"]
        ),
        Route(
            "/settings/settings.css",
            _static_file("settings.css", "text/css; charset=utf-8"),
            methods=["GET"],
        ),
        Route(
            "/settings/settings.js",
            _static_file("settings.js", "text/javascript; charset=utf-8"),
            methods=["GET"],
        ),
    ]
