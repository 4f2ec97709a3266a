"""The API's operations as FastAPI routes, and the OpenAPI document FastAPI generates from them.

Each operation is declared once, by :func:`api_route`: its path and method, the handler, the
request model (validated by :func:`~byok_plugin.server.bodies.read_json_body` before anything
else reads the body, so that 415 and 413 come first), the answer's model, its parameters and the
error codes it can answer. The document served at ``/api/byok/openapi.json`` is generated from
those routes and the pydantic models of :mod:`byok_plugin.server.models`; nothing is kept by hand
beside the code.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import cache
from typing import Annotated, Any

from fastapi import Path, Query
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from byok_plugin import __version__
from byok_plugin.server.errors import STATUS, ErrorCode
from byok_plugin.server.models import REQUEST_MODELS, Error

__all__ = ["api_route", "document_of", "openapi_document", "path_param", "query_param"]

Handler = Callable[[Request], Awaitable[Response]]

TITLE = "byok-plugin key management"
SUMMARY = "Manage a workspace's bring-your-own-key (BYOK) provider keys."
DESCRIPTION = (
    "The HTTP API of byok-plugin's key management service. It goes through the same library "
    "service as the `byok keys` command, so authorization (`byok_authorize`) and audit "
    "(`byok_audit`) are identical.\n\n"
    "Identity comes from the host that mounts the app: its `identify` callable turns a request "
    "(headers, cookies) into an actor with workspace roles. A request without an identity gets "
    "401, a request on a workspace the actor may not use gets 403. The workspace id in a path is "
    "never trusted alone.\n\n"
    "Responses never contain a plaintext key: a stored key shows only as its masked hint "
    "(`sk-pro...abcd`). Mutating requests must be `application/json` (a CSRF defence for "
    "cookie-authenticated hosts) and are limited in size. Every error is JSON with a stable "
    "`code`.\n\n"
    "Any route may answer 500 `internal_error`: the server failed, and the details go to its "
    "log, never into the answer. Under `byok serve`, any route answers 400 `invalid_host` to a "
    "request whose `Host` is not the loopback address it listens on, and 403 `forbidden` to a "
    "mutating request from a page of another origin."
)
SECURITY_SCHEMES = {
    "hostBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "Whatever the host authenticates: its `identify` callable reads the "
        "request. `BearerTokens` is the ready-made bearer form.",
    },
    "localSession": {
        "type": "http",
        "scheme": "bearer",
        "description": "`byok serve`: the session token the settings page gets for the one-time "
        "sign-in token printed with the URL (`POST /api/byok/session`), sent as "
        "`Authorization: Bearer`; never a cookie.",
    },
}

#: what each error code means, for the descriptions of the documented error responses
MEANING: dict[ErrorCode, str] = {
    ErrorCode.INVALID_JSON: "the body is not valid JSON (or its `Content-Length` is not a number)",
    ErrorCode.INVALID_HOST: "(`byok serve` only) the `Host` header is not the loopback address",
    ErrorCode.UNAUTHENTICATED: "the request carries no identity the host accepts",
    ErrorCode.FORBIDDEN: "the caller may not do this here (or, under `byok serve`, a mutating "
    "request from another origin)",
    ErrorCode.NOT_FOUND: "no such thing (or route)",
    ErrorCode.KEY_NOT_FOUND: "no stored key matched",
    ErrorCode.METHOD_NOT_ALLOWED: "the path does not take this method (`Allow` lists those it does)",
    ErrorCode.DUPLICATE_KEY: "the same key is stored under another label",
    ErrorCode.KEY_LIMIT_REACHED: "the provider has as many keys as a workspace may store",
    ErrorCode.PAYLOAD_TOO_LARGE: "the body is over the limit (16 KiB by default)",
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: "a request with a body must be "
    "`Content-Type: application/json`",
    ErrorCode.VALIDATION_ERROR: "a field or parameter is not valid; `field` names it",
    ErrorCode.UNKNOWN_PROVIDER: "the catalog has no such provider",
    ErrorCode.INVALID_KEY_FORMAT: "the key does not have the provider's form",
    ErrorCode.KEY_REJECTED: "the provider refused the key, or could not be reached to check it",
    ErrorCode.KEY_UNDECRYPTABLE: "the stored key cannot be decrypted (wrong or missing master "
    "key, or tampered data)",
    ErrorCode.INTERNAL_ERROR: "the server failed; the details go to its log, never into the answer",
    ErrorCode.KEYRING_UNAVAILABLE: "no master key is configured",
    ErrorCode.STORE_UNAVAILABLE: "the database does not answer (the server's log says why)",
}

#: every operation can answer these
ALWAYS = (ErrorCode.INVALID_HOST, ErrorCode.INTERNAL_ERROR)
#: an operation with a request body can answer these
BODY_ERRORS = (
    ErrorCode.INVALID_JSON,
    ErrorCode.PAYLOAD_TOO_LARGE,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    ErrorCode.VALIDATION_ERROR,
)


def error_responses(codes: Iterable[ErrorCode]) -> dict[int | str, dict[str, Any]]:
    """The documented error responses for ``codes``: one per status, naming each code."""
    by_status: dict[int, list[ErrorCode]] = {}
    for code in dict.fromkeys([*codes, *ALWAYS]):
        by_status.setdefault(STATUS[code], []).append(code)
    return {
        status: {
            "model": Error,
            "description": "; ".join(f"`{code.value}`: {MEANING[code]}" for code in found) + ".",
        }
        for status, found in sorted(by_status.items())
    }


def path_param(name: str, description: str, schema: dict[str, Any]) -> inspect.Parameter:
    """A path parameter, documented; its value is checked by the route's own code."""
    annotation = Annotated[str, Path(description=description, json_schema_extra=schema)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)


def query_param(name: str, description: str, schema: dict[str, Any]) -> inspect.Parameter:
    """An optional query parameter, documented with ``schema``; the route's own code reads and
    checks it (so that its error names it, as documented)."""

    def replace(found: dict[str, Any]) -> None:
        found.clear()
        found.update(schema)

    annotation = Annotated[str | None, Query(description=description, json_schema_extra=replace)]
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None
    )


def api_route(
    path: str,
    method: str,
    handler: Handler,
    *,
    name: str,
    summary: str,
    answers: dict[int, tuple[type[BaseModel] | None, str]],
    errors: Sequence[ErrorCode] = (),
    body: str | None = None,
    params: Sequence[inspect.Parameter] = (),
    public: bool = False,
) -> APIRoute:
    """One documented operation. ``handler`` answers it (FastAPI reads nothing of the request:
    the parameters are declared for the document); ``answers`` maps each success status to its
    model and description; ``body`` names the request model of
    :data:`~byok_plugin.server.models.REQUEST_MODELS`."""

    async def run(request: Request, **_: Any) -> Response:
        return await handler(request)

    run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request
            ),
            *params,
        ],
        return_annotation=Response,
    )
    run.__name__ = name
    run.__doc__ = handler.__doc__
    codes = [*errors, *(BODY_ERRORS if body is not None else ())]
    if not public:
        codes.append(ErrorCode.UNAUTHENTICATED)
    responses: dict[int | str, dict[str, Any]] = {
        status: ({"model": model} if model is not None else {}) | {"description": text}
        for status, (model, text) in answers.items()
    }
    responses |= error_responses(codes)
    extra: dict[str, Any] = {}
    if public:
        extra["security"] = []
    if body is not None:
        REQUEST_MODELS[body]  # a KeyError here names a model that does not exist
        extra["requestBody"] = {
            # required even where an empty body is read as {}: the JSON content type is
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    first = min(answers)
    return APIRoute(
        path,
        run,
        methods=[method],
        name=name,
        operation_id=name,
        summary=summary,
        description=inspect.cleandoc(handler.__doc__ or ""),
        status_code=first,
        response_description=answers[first][1],
        response_model=None,
        responses=responses,
        openapi_extra=extra or None,
    )


def document_of(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (their :class:`APIRoute` operations), with the schemas
    of their request models and the security schemes."""
    document = get_openapi(
        title=TITLE,
        version=__version__,
        openapi_version="3.1.0",
        summary=SUMMARY,
        description=DESCRIPTION,
        routes=list(routes),
        servers=[{"url": "/", "description": "relative to where the host mounts the app"}],
        license_info={"name": "Apache-2.0", "identifier": "Apache-2.0"},
        separate_input_output_schemas=False,
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    bodies = [
        route.openapi_extra["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for route in routes
        if isinstance(route, APIRoute)
        and route.openapi_extra is not None
        and "requestBody" in route.openapi_extra
    ]
    used = {REQUEST_MODELS[ref.rsplit("/", 1)[1]] for ref in bodies}
    _, defs = models_json_schema(
        [(model, "validation") for model in sorted(used, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    schemas.update(defs.get("$defs", {}))
    components["securitySchemes"] = SECURITY_SCHEMES
    document["security"] = [{"hostBearer": []}, {"localSession": []}]
    return document


@cache
def _full_document() -> dict[str, Any]:
    from byok_plugin.server.local import session_routes
    from byok_plugin.server.routes import api_routes, documentation_api

    return document_of([*api_routes(documentation_api()), *session_routes(None)])


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of every operation: :func:`~byok_plugin.server.create_app`'s, and
    the sign-in routes that exist only under ``byok serve``."""
    import copy

    return copy.deepcopy(_full_document())
