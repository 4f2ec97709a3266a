"""A worker process for the cooldown tests (importable by ``multiprocessing`` spawn): it resolves a
key through the real plugin, calls the emulator over HTTP with it (no retry in place), and asks
resolution again with the provider's refusal, as the runner does."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from typing import Any

from byok_hookspecs import Actor, CredentialRequest, FailureReason, ProviderFailure

from byok_plugin.app import App
from byok_plugin.host.providers import (
    NO_RETRY,
    CompletionRequest,
    RateLimitError,
    create_client,
    new_http_client,
)
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

#: who starts the worker's runs (resolution asks byok_authorize about every request)
OPERATOR = Actor(id="operator", operator=True)


def call_with_resolved_keys(
    environ: dict[str, str], workspace: str, provider: str, model: str
) -> dict[str, Any]:
    """One call, on as many keys as it takes: returns the key ids used, in order, and the
    provider's ``retry_after`` hints, with the wall-clock time around the call."""
    app = App(Settings.from_environ(environ))
    pm = plugin_manager_for(app, load_entrypoints=False)
    request = CredentialRequest(
        workspace, provider, model, run_id="r", block_id="b", actor=OPERATOR
    )
    used: list[str | None] = []
    hints: list[float | None] = []
    started = datetime.now(UTC)

    async def call() -> None:
        nonlocal request
        http = new_http_client()
        client = create_client(provider, http, environ=environ, retry=NO_RETRY)
        try:
            credential = pm.hook.byok_resolve_credential(request=request)
            for _ in range(3):
                used.append(credential.key_id)
                try:
                    await client.complete(
                        CompletionRequest.simple(model, "Hi"), api_key=credential.api_key
                    )
                    return
                except RateLimitError as exc:
                    hints.append(exc.retry_after)
                    failure = ProviderFailure(
                        FailureReason.RATE_LIMIT,
                        credential.source,
                        credential.key_id,
                        exc.status,
                        retry_after=exc.retry_after,
                    )
                    credential = pm.hook.byok_resolve_credential(
                        request=CredentialRequest(
                            workspace,
                            provider,
                            model,
                            run_id="r",
                            block_id="b",
                            actor=OPERATOR,
                            failure=failure,
                        )
                    )
        finally:
            await http.aclose()

    try:
        asyncio.run(call())
    finally:
        app.close()
    return {
        "pid": os.getpid(),
        "used": used,
        "hints": hints,
        "started": started.isoformat(),
        "ended": datetime.now(UTC).isoformat(),
    }
