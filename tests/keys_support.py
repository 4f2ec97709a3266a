"""Helpers shared by the key store tests: random keys, apps on a given database, recorders.

Not a test module (no ``test_`` prefix); imported by tests/test_keys*.py, test_store*.py,
test_rewrap.py and test_cli_keys.py. The concurrency workers live here so that spawned processes
import something small.
"""

from __future__ import annotations

import base64
import secrets
import string
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pluggy
import sqlalchemy as sa
from byok_hookspecs import (
    PROJECT_NAME,
    Actor,
    AuditEvent,
    KeyCheck,
    KeyCheckStatus,
    add_to,
    hookimpl,
)

from byok_plugin.app import App
from byok_plugin.core.crypto import MasterKey
from byok_plugin.keys.service import KeyService
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

ALNUM = string.ascii_letters + string.digits
OPERATOR = Actor(id="operator", operator=True)


def _random(n: int, alphabet: str = ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def random_key(provider: str) -> str:
    """A random key with the provider's real shape."""
    if provider == "openai":
        return "sk-proj-" + _random(56)
    if provider == "anthropic":
        return "sk-ant-api03-" + _random(93, ALNUM + "-_") + "AA"
    if provider == "google":
        return "AIza" + _random(35, ALNUM + "-_")
    if provider == "mistral":
        return _random(32)
    if provider == "exa":
        return str(uuid.uuid4())
    raise ValueError(provider)


def master_key(key_id: str = "k1") -> MasterKey:
    return MasterKey(key_id, secrets.token_bytes(32))


def keyring_value(*keys: MasterKey) -> str:
    """A BYOK_ENCRYPTION_KEYS value for these master keys (the first encrypts)."""
    return ",".join(f"{k.id}:{base64.b64encode(k.secret).decode()}" for k in keys)


def windows(secret: str, size: int = 7) -> set[str]:
    """Every substring of ``size`` characters: longer than any run the display hint shows."""
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


#: the providers' public key prefixes: they show in messages ("anthropic keys start with ...")
PUBLIC_PREFIXES = ("sk-ant-api03-", "sk-proj-", "AIza")


def leaks(text: str | bytes, secrets_: Iterable[str], size: int = 7) -> list[str]:
    """The substrings (of ``size`` characters or more) of any secret that occur in ``text``,
    except runs wholly inside a public prefix such as ``sk-ant-api03-``."""
    haystack = text.decode("latin-1") if isinstance(text, bytes) else text
    found = []
    for secret in secrets_:
        prefix = next((p for p in PUBLIC_PREFIXES if secret.startswith(p)), "")
        for window in windows(secret, size):
            if window in haystack and window not in prefix:
                found.append(window)
    return found


def settings_for(
    database_url: str,
    home: Path,
    *,
    keys: Iterable[MasterKey] | None = None,
    validate: bool = False,
    extra: Mapping[str, str] | None = None,
) -> Settings:
    env = {"BYOK_HOME": str(home), "BYOK_DATABASE_URL": database_url}
    env["BYOK_VALIDATE_KEYS"] = "1" if validate else "0"
    if keys is not None:
        env["BYOK_ENCRYPTION_KEYS"] = keyring_value(*keys)
    env.update(extra or {})
    return Settings.from_environ(env)


def make_app(database_url: str, home: Path, **kwargs: Any) -> App:
    return App(settings_for(database_url, home, **kwargs))


class Recorder:
    """A plugin that records audit events and (optionally) answers key checks first."""

    def __init__(self, check: KeyCheckStatus | None = None) -> None:
        self.events: list[AuditEvent] = []
        self.checked: list[str] = []
        self.check = check

    @hookimpl
    def byok_audit(self, event: AuditEvent) -> None:
        self.events.append(event)

    @hookimpl(tryfirst=True)
    def byok_validate_key(self, provider: str, api_key: str) -> KeyCheck | None:
        if self.check is None:
            return None
        self.checked.append(provider)
        return KeyCheck(provider, self.check, f"recorder says {self.check.value}")

    def actions(self, outcome: str | None = None) -> list[str]:
        return [e.action for e in self.events if outcome is None or e.outcome == outcome]


def service_for(app: App, *plugins: object) -> tuple[KeyService, pluggy.PluginManager]:
    """A key service whose plugin manager has the default plugin (bound to ``app``) and
    ``plugins``, and no entry-point plugin."""
    pm = plugin_manager_for(app, load_entrypoints=False)
    for plugin in plugins:
        pm.register(plugin)
    return app.key_service(pm), pm


def bare_service(app: App, *plugins: object) -> tuple[KeyService, pluggy.PluginManager]:
    """A key service on a plugin manager WITHOUT the default plugin: nobody answers
    ``byok_authorize``."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    add_to(pm, load_entrypoints=False)
    for plugin in plugins:
        pm.register(plugin)
    return app.key_service(pm), pm


def dump_database(database_url: str, home: Path | None = None) -> bytes:
    """Everything a reader of the database sees: the SQLite files' bytes (WAL included), or the
    text of every row of every table in PostgreSQL."""
    url = sa.engine.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        out = b""
        for suffix in ("", "-wal", "-shm", "-journal"):
            candidate = path.with_name(path.name + suffix)
            if candidate.exists():
                out += candidate.read_bytes()
        return out
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
            chunks = []
            for table in tables:
                rows = conn.execute(sa.text(f'SELECT t::text FROM "{table}" t')).scalars()
                chunks.extend(rows)
        return "\n".join(chunks).encode()
    finally:
        engine.dispose()


# --- workers for the multi-process tests ----------------------------------------------------------


def concurrent_set_worker(
    database_url: str,
    home: str,
    keyring: str,
    barrier: Any,
    workspace: str,
    provider: str,
    jobs: list[tuple[str, str]],
) -> dict[str, Any]:
    """Set ``(label, key)`` pairs after every worker reached the barrier; report what happened."""
    from byok_plugin.core.errors import KeyLimitReached

    settings = Settings.from_environ(
        {
            "BYOK_HOME": home,
            "BYOK_DATABASE_URL": database_url,
            "BYOK_ENCRYPTION_KEYS": keyring,
            "BYOK_VALIDATE_KEYS": "0",
        }
    )
    app = App(settings)
    service, _ = service_for(app)
    _ = app.key_store  # connect and migrate before the start line
    barrier.wait(timeout=60)
    stored: list[tuple[str, str, str]] = []
    refused: list[str] = []
    for label, api_key in jobs:
        try:
            result = service.set_key(
                OPERATOR, workspace, provider, api_key, label=label, test=False
            )
        except KeyLimitReached:
            refused.append(label)
        else:
            stored.append((label, result.key.id, api_key))
    app.close()
    return {"stored": stored, "refused": refused}
