"""The emulator's ASGI application: every provider's routes under its own prefix.

| provider | prefix | the base URL a client or SDK is given |
|---|---|---|
| openai | ``/openai`` | ``<root>/openai/v1`` (as ``https://api.openai.com/v1``) |
| anthropic | ``/anthropic`` | ``<root>/anthropic`` (as ``https://api.anthropic.com``) |
| google | ``/google`` | ``<root>/google`` (as ``https://generativelanguage.googleapis.com``) |
| mistral | ``/mistral`` | ``<root>/mistral`` (as ``https://api.mistral.ai``) |
| exa | ``/exa`` | ``<root>/exa`` (as ``https://api.exa.ai``) |

Plus ``GET /_emulator/calls`` (the call log as JSON, without bodies) and ``GET /_emulator/health``,
for an emulator run as a separate process (``byok emulator``).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from byok_plugin.host.emulator.apis import API_CLASSES
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

    routes += [
        Route("/_emulator/health", health, methods=["GET"]),
        Route("/_emulator/calls", calls, methods=["GET"]),
    ]
    return Starlette(routes=routes)
