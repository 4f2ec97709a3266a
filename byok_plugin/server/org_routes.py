"""The organization routes: an organization's key pool, and the keys a workspace inherits.

- ``GET /api/workspaces/{workspace_id}/byok-inherited-keys``: what the workspace inherits from its
  organization, masked (the workspace's members);
- ``GET|POST|DELETE /api/organizations/{org_id}/byok-keys``: the organization's keys, through the
  workspace key routes on the owner id ``org:<org_id>`` (its members list them, its admins change
  them; ``byok_authorize`` decides on ``org:<org_id>``).

Authorization comes before the organization is looked up, so that an outsider cannot tell an
existing organization from a missing one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from byok_hookspecs import Action
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from byok_plugin.core.errors import InvalidInput
from byok_plugin.resolution.organizations import (
    OrganizationNotFound,
    Organizations,
    check_org_id,
    org_owner,
)
from byok_plugin.server.errors import ApiError, ErrorCode

if TYPE_CHECKING:
    from byok_plugin.keys.service import KeyService
    from byok_plugin.server.routes import Api, Handler

__all__ = ["organization_routes"]


def organization_routes(
    api: Api,
    endpoint: Callable[[Handler], Handler],
    key_routes: Callable[..., list[APIRoute]],
) -> list[BaseRoute]:
    """The organization routes, answered through ``api`` (``endpoint`` and ``key_routes`` are
    :mod:`byok_plugin.server.routes`' own, passed in to keep the imports one-way)."""
    from byok_plugin.server import models
    from byok_plugin.server.openapi import api_route, path_param
    from byok_plugin.server.routes import READ_ERRORS, WORKSPACE_ID, ok

    async def inherited(request: Request) -> Response:
        actor = await api.actor(request)
        workspace_id = request.path_params["workspace_id"]

        def work(service: KeyService) -> dict[str, Any]:
            orgs = Organizations(api.app.organization_store, service, api.app.key_store)
            membership, keys = orgs.inherited_keys(actor, workspace_id)
            return {
                "workspace_id": workspace_id,
                "organization_id": membership.organization_id if membership else None,
                "opted_out": membership.opted_out if membership else None,
                "keys": [_inherited_json(k.to_dict()) for k in keys],
            }

        return ok(await api.call(work))

    def as_owner(handler: Handler, action: Action) -> Handler:
        """Run a workspace key route on the organization's owner id."""

        async def run(request: Request) -> Response:
            actor = await api.actor(request)
            try:
                org_id = check_org_id(request.path_params["org_id"])
            except InvalidInput as exc:
                raise ApiError(ErrorCode.VALIDATION_ERROR, str(exc), "org_id") from None
            owner = org_owner(org_id)

            def check(service: KeyService) -> bool:
                service.authorize(actor, owner, action, what="organization keys")
                return api.app.organization_store.exists(org_id)

            if not await api.call(check):
                raise OrganizationNotFound(org_id)
            request.scope["path_params"] = {**request.path_params, "workspace_id": owner}
            return await handler(request)

        return run

    org_id = path_param(
        "org_id",
        "The organization: 1 to 63 letters, digits, '.', '_' or '-' (`validation_error` "
        "otherwise). Its keys are managed by its admins (`keys.manage` on `org:<org_id>` in "
        "`byok_authorize`) and listed, masked, by its members.",
        {"minLength": 1, "maxLength": 63},
    )
    return [
        api_route(
            "/api/workspaces/{workspace_id}/byok-inherited-keys",
            "GET",
            endpoint(inherited),
            name="listInheritedKeys",
            summary="The keys the workspace inherits from its organization (masked)",
            answers={200: (models.InheritedKeyList, "The inherited keys.")},
            errors=READ_ERRORS,
            params=(WORKSPACE_ID,),
        ),
        *key_routes(
            "/api/organizations/{org_id}/byok-keys",
            as_owner(api.list_keys, Action.READ_KEYS),
            as_owner(api.set_key, Action.MANAGE_KEYS),
            as_owner(api.delete_keys, Action.MANAGE_KEYS),
            what="organization",
            params=(org_id,),
            errors=(ErrorCode.NOT_FOUND,),
        ),
    ]


_INHERITED_FIELDS = (
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
    "organization_id",
    "inherited",
    "active",
)


def _inherited_json(values: dict[str, Any]) -> dict[str, Any]:
    """What the API shows of an inherited key: the masked fields only (no fingerprint)."""
    return {name: values[name] for name in _INHERITED_FIELDS}
