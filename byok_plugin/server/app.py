"""The ASGI application a host mounts: :func:`create_app`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

from byok_plugin.server.bodies import DEFAULT_MAX_BODY_BYTES, validation_error
from byok_plugin.server.errors import ApiError, ErrorCode, error_response
from byok_plugin.server.identity import Identify
from byok_plugin.server.routes import Api, build_routes

if TYPE_CHECKING:
    from byok_plugin.app import App

__all__ = ["create_app"]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (no route, wrong method), as JSON errors with a code."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = ", ".join(_allowed_methods(request))
        return error_response(
            ApiError(
                ErrorCode.METHOD_NOT_ALLOWED,
                f"{request.method} is not allowed here" + (f"; use {allow}" if allow else ""),
                headers=(("Allow", allow),) if allow else (),
            )
        )
    if exc.status_code == 404:
        return error_response(ApiError(ErrorCode.NOT_FOUND, "no such route"))
    return error_response(ApiError(ErrorCode.INTERNAL_ERROR, "the request could not be served"))


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on the request's path (each method is its own route, so
    the route that raised the 405 knows only its own)."""
    methods: dict[str, None] = {}
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(dict.fromkeys(sorted(getattr(route, "methods", None) or ())))
    return list(methods)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """A request FastAPI itself refused (the routes declare their parameters for the document
    only, so this is a safety net): the project's 422, built from each error's ``type`` and
    ``loc``, never from the input it quotes."""
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc.errors()))


def create_app(
    app: App,
    *,
    identify: Identify | None = None,
    pm: pluggy.PluginManager | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    extra_routes: Sequence[BaseRoute] = (),
    middleware: Sequence[Middleware] = (),
) -> FastAPI:
    """The key management API and the settings page, as one ASGI application.

    :param app: the configured services (store, keyring, catalog) of byok-plugin.
    :param identify: the host's authentication: a function (plain or ``async``) from the
        Starlette request to the :class:`~byok_hookspecs.Actor` who sent it, with its workspace
        roles, or ``None`` when the request carries no valid identity (answered 401). Without it,
        every authenticated route answers 401.
    :param pm: the plugin manager whose ``byok_authorize`` / ``byok_audit`` /
        ``byok_validate_key`` hooks the key service uses; by default byok-plugin's own manager
        for ``app``, with every installed plugin.
    :param max_body_bytes: the largest request body accepted (413 above it).

    The routes are relative to where the host mounts the app; the settings page is at
    ``settings/?workspace=<id>`` and finds the API beside it.
    """
    if pm is None:
        from byok_plugin.manager import plugin_manager_for

        pm = plugin_manager_for(app)
    if max_body_bytes < 1024:
        raise ValueError("max_body_bytes must be at least 1024")
    api = Api(app=app, pm=pm, identify=identify, max_body_bytes=max_body_bytes)
    asgi = FastAPI(
        routes=[*build_routes(api), *extra_routes],
        middleware=list(middleware),
        exception_handlers={HTTPException: _http_error, RequestValidationError: _validation_error},
        # the document is served by the API's own route (generated from these routes)
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    asgi.state.byok_api = api
    return asgi
