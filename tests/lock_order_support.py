"""Workers for the lock-order test: real processes on one PostgreSQL database.

Not a test module; spawned processes import it (and ``keys_support``, which is small).
"""

from __future__ import annotations

import logging
import random
from typing import Any

from byok_hookspecs import Actor, CredentialRequest

#: who the workers resolve for (resolution asks byok_authorize about every request)
OPERATOR = Actor(id="operator", operator=True)

WORKSPACES = [f"ws-{i:02d}" for i in range(20)]


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def flush_worker(
    database_url: str, home: str, keyring: str, barrier: Any, rounds: int, seed: int
) -> dict[str, Any]:
    """Each round: resolve every workspace's key in a shuffled order, then flush their
    last-used times in one transaction (what a worker does every 30 s)."""
    from byok_plugin.app import App
    from byok_plugin.manager import plugin_manager_for
    from byok_plugin.settings import Settings

    app = App(
        Settings.from_environ(
            {
                "BYOK_HOME": home,
                "BYOK_DATABASE_URL": database_url,
                "BYOK_ENCRYPTION_KEYS": keyring,
                "BYOK_KEY_CACHE_SECONDS": "0",
            }
        )
    )
    pm = plugin_manager_for(app, load_entrypoints=False)
    warnings = _Count()
    logging.getLogger("byok").addHandler(warnings)
    rng = random.Random(seed)
    resolver = app.resolver
    flushed: list[int] = []
    barrier.wait(timeout=120)
    for _ in range(rounds):
        order = list(WORKSPACES)
        rng.shuffle(order)
        for workspace in order:
            request = CredentialRequest(
                workspace_id=workspace, provider="openai", model="gpt-4o", actor=OPERATOR
            )
            resolver.resolve(request, pm)
        flushed.append(resolver.flush_last_used())
    app.close()
    return {"flushed": flushed, "warnings": warnings.messages}


def rewrap_worker(
    database_url: str, home: str, keyrings: list[str], barrier: Any, rounds: int
) -> dict[str, Any]:
    """Each round: rewrap every key to the other master key, in batches of 5 rows."""
    from byok_plugin.app import App
    from byok_plugin.keys.rewrap import rewrap_all
    from byok_plugin.settings import Settings

    apps = [
        App(
            Settings.from_environ(
                {"BYOK_HOME": home, "BYOK_DATABASE_URL": database_url, "BYOK_ENCRYPTION_KEYS": k}
            )
        )
        for k in keyrings
    ]
    rewrapped: list[int] = []
    errors: list[str] = []
    barrier.wait(timeout=120)
    for n in range(rounds):
        app = apps[n % 2]
        try:
            report = rewrap_all(app.key_store, app.key_access, app.keyring, batch_size=5)
            rewrapped.append(report.rewrapped)
        except Exception as exc:  # reported, not raised: the test says what went wrong
            errors.append(f"{type(exc).__name__}: {exc}")
    for app in apps:
        app.close()
    return {"rewrapped": rewrapped, "errors": errors}
