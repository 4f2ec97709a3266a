"""The emulator's ASGI application: every provider's routes under its own prefix.

| provider | prefix | the base URL a client or SDK is given |
|---|---|---|
| openai | ``/openai`` | ``<root>/openai/v1`` (as ``https://api.openai.com/v1``) |
| anthropic | ``/anthropic`` | ``<root>/anthropic`` (as ``https://api.anthropic.com``) |
| google | ``/google`` | ``<root>/google`` (as ``https://generativelanguage.googleapis.com``) |
| mistral | ``/mistral`` | ``<root>/mistral`` (as ``https://api.mistral.ai``) |
| exa | ``/exa`` | ``<root>/exa`` (as ``https://api.exa.ai``) |

Plus a control API for an emulator run as a separate process (``byok emulator``), on loopback:

| route | what |
|---|---|
| ``GET /_emulator/health`` | ``{"ok": true}`` once it serves |
| ``GET /_emulator/calls[?provider=openai]`` | the call log (no bodies, keys only as label/fingerprint) |
| ``DELETE /_emulator/calls`` | forget the call log |
| ``POST /_emulator/faults`` | add a fault: ``{"kind": "rate_limit", "provider": "openai", "times": 2, "retry_after": 1}`` (fields of :class:`Fault`) |
| ``DELETE /_emulator/faults`` | clear the faults |
| ``POST /_emulator/keys`` | accept a key: ``{"provider": "openai", "key": "...", "label": "ws-a"}`` (a request body, never a URL) |

Other local programs and web pages can reach a loopback port, so the control API, as ``byok serve``:

- answers only to the loopback ``Host`` names and the address it is bound to (400 otherwise): a
  DNS-rebinding page's requests carry its own host name, and cannot read the call log;
- refuses a mutating request whose ``Origin`` is not its own (403), and a ``POST`` whose body is not
  declared ``application/json`` (415): a page's cross-origin form or ``text/plain`` fetch cannot add
  keys or faults.

The provider routes have no such check: they need a key, and a client or SDK may reach the emulator
under any name (a container's, say).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from byok_plugin.host.emulator.apis import API_CLASSES
from byok_plugin.host.emulator.faults import Fault
from byok_plugin.host.emulator.state import EmulatorState

#: the ``Host`` names the control API answers to, besides the address the emulator is bound to
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")

#: provider -> the path, relative to the emulator's root URL, that the provider's base URL points to
BASE_PATHS = {
    "openai": "/openai/v1",
    "anthropic": "/anthropic",
    "google": "/google",
    "mistral": "/mistral",
    "exa": "/exa",
}


def _host_name(host_header: str) -> str:
    """``127.0.0.1:8765`` -> ``127.0.0.1``; ``[::1]:8765`` -> ``[::1]``."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if ":" in host_header else host_header


def _control_guard(request: Request, allowed_hosts: frozenset[str]) -> Response | None:
    """The refusal of a control request that a web page (or a rebinding host name) may have sent."""
    host = request.headers.get("host", "")
    if _host_name(host).lower() not in allowed_hosts:
        return JSONResponse(
            {"error": "the control API answers only to its loopback address"}, status_code=400
        )
    origin = request.headers.get("origin")
    own_origin = f"{request.url.scheme}://{host}".lower()
    if request.method != "GET" and origin is not None and origin.lower().rstrip("/") != own_origin:
        return JSONResponse({"error": "cross-origin requests are refused"}, status_code=403)
    if request.method == "POST":
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return JSONResponse(
                {"error": "the control API takes a JSON body (Content-Type: application/json)"},
                status_code=415,
            )
    return None


def build_app(state: EmulatorState, *, allowed_hosts: Iterable[str] = LOOPBACK_HOSTS) -> Starlette:
    """An ASGI app emulating all five providers, answering from (and recording into) ``state``.

    :param allowed_hosts: the ``Host`` names the control API answers to (as a URL writes them:
        ``127.0.0.1``, ``[::1]``); give the bound address too when it is not one of
        :data:`LOOPBACK_HOSTS`.
    """
    hosts = frozenset(h.lower() for h in allowed_hosts)
    routes: list[Route] = []
    for api_class in API_CLASSES:
        routes += api_class(state).all_routes()

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "providers": sorted(BASE_PATHS)})

    async def calls(request: Request) -> Response:
        provider = request.query_params.get("provider")
        return JSONResponse(
            [
                {
                    "provider": c.provider,
                    "method": c.method,
                    "path": c.path,
                    "model": c.model,
                    "key_label": c.key_label,
                    "key_fingerprint": c.key_fingerprint,
                    "stream": c.stream,
                    "status": c.status,
                    "fault": c.fault.value if c.fault else None,
                    "at": c.at,
                }
                for c in state.calls(provider)
            ]
        )

    async def clear_calls(request: Request) -> Response:
        state.clear_calls()
        return JSONResponse({"ok": True})

    async def add_fault(request: Request) -> Response:
        try:
            spec = await request.json()
            if not isinstance(spec, dict):
                raise TypeError("a fault is a JSON object")
            if "paths" in spec:
                spec["paths"] = tuple(spec["paths"])
            fault = state.add_fault(Fault(**spec))
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": f"invalid fault: {exc}"}, status_code=400)
        return JSONResponse({"ok": True, "kind": fault.kind.value, "provider": fault.provider})

    async def clear_faults(request: Request) -> Response:
        state.clear_faults()
        return JSONResponse({"ok": True})

    async def add_key(request: Request) -> Response:
        try:
            spec = await request.json()
            label = state.add_key(str(spec["provider"]), str(spec["key"]), spec.get("label"))
        except (ValueError, TypeError, KeyError) as exc:
            message = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            return JSONResponse({"error": f"invalid key registration: {message}"}, status_code=400)
        return JSONResponse({"ok": True, "label": label})

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            refusal = _control_guard(request, hosts)
            return refusal if refusal is not None else await handler(request)

        return endpoint

    routes += [
        Route("/_emulator/health", guarded(health), methods=["GET"]),
        Route("/_emulator/calls", guarded(calls), methods=["GET"]),
        Route("/_emulator/calls", guarded(clear_calls), methods=["DELETE"]),
        Route("/_emulator/faults", guarded(add_fault), methods=["POST"]),
        Route("/_emulator/faults", guarded(clear_faults), methods=["DELETE"]),
        Route("/_emulator/keys", guarded(add_key), methods=["POST"]),
    ]
    return Starlette(routes=routes)
