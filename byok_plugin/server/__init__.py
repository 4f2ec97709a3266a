"""Key management over HTTP, and the workspace's BYOK settings page (``byok-plugin[server]``).

A host mounts the ASGI app that :func:`create_app` returns, and tells it who is calling::

    from byok_plugin.server import create_app

    byok_api = create_app(App(Settings.from_environ()), identify=my_identify)
    host.mount("/byok", byok_api)

``my_identify(request)`` is the host's authentication: it returns a
:class:`byok_hookspecs.Actor` with the caller's workspace roles, or ``None`` (401). ``byok serve``
runs the same app on loopback for the local operator (see :mod:`byok_plugin.server.local`).

May import: byok_plugin.core, byok_plugin.store, byok_plugin.keys, byok_plugin.billing,
byok_plugin.resolution, byok_plugin.settings, byok_plugin.app, byok_plugin.manager,
byok_plugin.audit_log, byok_plugin (its ``__version__``).
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the HTTP API needs the server extra: pip install 'byok-plugin[server]'"
    ) from exc

from byok_plugin.server.app import create_app
from byok_plugin.server.bodies import DEFAULT_MAX_BODY_BYTES
from byok_plugin.server.errors import ErrorCode
from byok_plugin.server.identity import BearerTokens, Identify, LocalLogin
from byok_plugin.server.openapi import openapi_document

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "BearerTokens",
    "ErrorCode",
    "Identify",
    "LocalLogin",
    "create_app",
    "openapi_document",
]
