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
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from byok_plugin.host.emulator.apis import API_CLASSES
from byok_plugin.host.emulator.faults import Fault
from byok_plugin.host.emulator.state import EmulatorState

#: provider -> the path, relative to the emulator's root URL, that the provider's base URL points to
BASE_PATHS = {
    "openai": "/openai/v1",
    "anthropic": "/anthropic",
    "google": "/google",
    "mistral": "/mistral",
    "exa": "/exa",
}


def build_app(state: EmulatorState) -> Starlette:
    """An ASGI app emulating all five providers, answering from (and recording into) ``state``."""
    routes: list[Route] = []
    for api_class in API_CLASSES:
        routes += api_class(state).routes()

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

    routes += [
        Route("/_emulator/health", health, methods=["GET"]),
        Route("/_emulator/calls", calls, methods=["GET"]),
        Route("/_emulator/calls", clear_calls, methods=["DELETE"]),
        Route("/_emulator/faults", add_fault, methods=["POST"]),
        Route("/_emulator/faults", clear_faults, methods=["DELETE"]),
        Route("/_emulator/keys", add_key, methods=["POST"]),
    ]
    return Starlette(routes=routes)
