"""``byok serve``: the app for the local operator's browser, on loopback.

How the browser authenticates: ``byok serve`` prints a URL whose fragment carries a random
one-time token (``.../settings/?workspace=default#login=...``). A fragment is never sent in a
request line, so the token is in no access log (and ``byok serve`` prints it to stderr, apart
from the access log on stdout). It works once, within minutes (``--link-minutes``, 10 by
default): the page removes it from the address bar and history, posts it to
``api/byok/session``, and gets a random session token back in the JSON body.

The page keeps that token in ``sessionStorage`` and sends it as ``Authorization: Bearer`` on
every API call. Not a cookie, on purpose: cookies are not port-scoped, so a cookie set by
``127.0.0.1:8765`` would also go to every other server on ``127.0.0.1`` (another user's, on a
shared machine), which could replay it. ``sessionStorage`` belongs to one origin (scheme, host
and port) and one tab, and a header the page adds is sent nowhere else; nor does a browser add it
to a cross-site request on its own, so there is no CSRF to defend against. A session ends after
12 hours unused, when the page signs out (``DELETE api/byok/session``), or when
``byok serve`` stops.

Also, because other local programs and web pages can reach a loopback port:

- only the loopback ``Host`` names are served (a DNS-rebinding page's requests carry its own
  host name and are refused);
- a mutating request whose ``Origin`` is not this server's own is refused, besides the JSON
  content type every mutating request needs (defence in depth: a session is never sent by the
  browser on its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

import pluggy
from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from byok_plugin.server import models
from byok_plugin.server.app import create_app
from byok_plugin.server.bodies import MUTATING_METHODS, read_json_body
from byok_plugin.server.errors import ApiError, ErrorCode, error_response
from byok_plugin.server.identity import LocalLogin, bearer_token
from byok_plugin.server.openapi import api_route
from byok_plugin.server.routes import API_HEADERS, endpoint

if TYPE_CHECKING:
    from byok_plugin.app import App

__all__ = [
    "LOOPBACK_HOSTS",
    "LocalGuardMiddleware",
    "create_local_app",
    "login_url",
    "session_routes",
]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _host_name(host_header: str) -> str:
    """``127.0.0.1:8765`` -> ``127.0.0.1``; ``[::1]:8765`` -> ``[::1]``."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if ":" in host_header else host_header


class LocalGuardMiddleware:
    """Serve only the allowed ``Host`` names (400 ``invalid_host``), and refuse a mutating
    request sent by a page of another origin (403 ``forbidden``)."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        error: ApiError | None = None
        if _host_name(host).lower() not in self.allowed_hosts:
            error = ApiError(
                ErrorCode.INVALID_HOST,
                "this server answers only to its loopback address; open the URL byok serve printed",
            )
        elif scope["method"] in MUTATING_METHODS and "origin" in headers:
            expected = f"{scope.get('scheme', 'http')}://{host}".lower()
            if headers["origin"].lower().rstrip("/") != expected:
                error = ApiError(ErrorCode.FORBIDDEN, "cross-origin requests are refused")
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def session_routes(login: LocalLogin | None) -> list[BaseRoute]:
    """The sign-in and sign-out routes of ``byok serve`` (``login`` is ``None`` only for the
    document, whose routes are never called)."""

    async def sign_in(request: Request) -> Response:
        """Trade the one-time sign-in token for a session token."""
        body = await read_json_body(request, "SessionRequest", limit=1024)
        assert login is not None
        session = login.exchange(body["token"])
        if session is None:
            raise ApiError(
                ErrorCode.UNAUTHENTICATED,
                "this sign-in link has expired, was already used, or is wrong; "
                "restart byok serve for a new one",
            )
        idle = int(login.session_idle.total_seconds())
        return JSONResponse({"session": session, "idle_timeout_seconds": idle}, headers=API_HEADERS)

    async def sign_out(request: Request) -> Response:
        """End the session the request carries (if any)."""
        await read_json_body(request, "SignOutRequest", limit=1024)
        session = bearer_token(request)
        if session is not None and login is not None:
            login.sign_out(session)
        return Response(status_code=204, headers=API_HEADERS)

    # only under byok serve: a hosted app answers 404 on this path
    only_local = (ErrorCode.NOT_FOUND, ErrorCode.FORBIDDEN)
    return [
        api_route(
            "/api/byok/session",
            "POST",
            endpoint(sign_in),
            name="login",
            summary="Sign in with the one-time token (`byok serve` only)",
            answers={200: (models.Session, "The session token, for `Authorization: Bearer`.")},
            errors=(*only_local, ErrorCode.UNAUTHENTICATED),
            body="SessionRequest",
            public=True,
        ),
        api_route(
            "/api/byok/session",
            "DELETE",
            endpoint(sign_out),
            name="logout",
            summary="Sign out (`byok serve` only)",
            answers={204: (None, "Signed out.")},
            errors=only_local,
            body="SignOutRequest",
            public=True,
        ),
    ]


def create_local_app(
    app: App,
    login: LocalLogin,
    *,
    pm: pluggy.PluginManager | None = None,
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
) -> FastAPI:
    """The app ``byok serve`` runs: :func:`create_app` with the one-time login, and the session
    routes (sign in, sign out)."""
    return create_app(
        app,
        identify=login,
        pm=pm,
        extra_routes=session_routes(login),
        middleware=[Middleware(LocalGuardMiddleware, allowed_hosts=allowed_hosts)],
    )


def login_url(host: str, port: int, token: str, workspace: str | None) -> str:
    """The URL to print: the settings page, the workspace, and the one-time token in the
    fragment."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    query = f"?workspace={quote(workspace, safe='')}" if workspace else ""
    return f"http://{shown}:{port}/settings/{query}#login={token}"
