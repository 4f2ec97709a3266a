"""``byok serve``: the app for the local operator's browser, on loopback.

How the browser authenticates: ``byok serve`` prints a URL whose fragment carries a random
one-time token (``.../settings/?workspace=default#login=...``). A fragment is never sent in a
request line, so the token is in no access log (and ``byok serve`` prints it to stderr, apart
from the access log on stdout). It works once, within minutes (``--link-minutes``, 10 by
default); the page posts it to
``api/byok/session`` and gets a random session cookie (``HttpOnly``, ``SameSite=Strict``), then
removes the fragment from the address bar and history. The token is then spent.

Also, because other local programs and web pages can reach a loopback port:

- only the loopback ``Host`` names are served (a DNS-rebinding page's requests carry its own
  host name and are refused);
- a mutating request whose ``Origin`` is not this server's own is refused, besides the JSON
  content type every mutating request needs (cookies ignore ports, so a page served by another
  local port is "same-site").
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

import pluggy
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from byok_plugin.server.app import create_app
from byok_plugin.server.bodies import MUTATING_METHODS, read_json_body
from byok_plugin.server.errors import ApiError, ErrorCode, error_response
from byok_plugin.server.identity import SESSION_COOKIE, LocalLogin
from byok_plugin.server.routes import API_HEADERS, endpoint

if TYPE_CHECKING:
    from byok_plugin.app import App

__all__ = ["LOOPBACK_HOSTS", "LocalGuardMiddleware", "create_local_app", "login_url"]

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


def create_local_app(
    app: App,
    login: LocalLogin,
    *,
    pm: pluggy.PluginManager | None = None,
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
) -> Starlette:
    """The app ``byok serve`` runs: :func:`create_app` with the one-time login and its cookie."""

    async def session(request: Request) -> Response:
        body = await read_json_body(request, "SessionRequest", limit=1024)
        session_id = login.exchange(body["token"])
        if session_id is None:
            raise ApiError(
                ErrorCode.UNAUTHENTICATED,
                "this sign-in link has expired, was already used, or is wrong; "
                "restart byok serve for a new one",
            )
        response = Response(status_code=204, headers=API_HEADERS)
        root = request.scope.get("root_path", "").rstrip("/")
        response.set_cookie(
            SESSION_COOKIE, session_id, path=f"{root}/", httponly=True, samesite="strict"
        )
        return response

    return create_app(
        app,
        identify=login,
        pm=pm,
        extra_routes=[Route("/api/byok/session", endpoint(session), methods=["POST"])],
        middleware=[Middleware(LocalGuardMiddleware, allowed_hosts=allowed_hosts)],
    )


def login_url(host: str, port: int, token: str, workspace: str | None) -> str:
    """The URL to print: the settings page, the workspace, and the one-time token in the
    fragment."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    query = f"?workspace={quote(workspace, safe='')}" if workspace else ""
    return f"http://{shown}:{port}/settings/{query}#login={token}"
