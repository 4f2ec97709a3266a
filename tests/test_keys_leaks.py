"""With logging at DEBUG and every key path exercised, no key shows anywhere.

Every log record (ours, SQLAlchemy's statements and parameters, httpx's), every exception's text
and repr, every returned value's repr and every CLI output is searched for any run of 7 or more
characters of any API key used (random keys), and for the master key.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from byok_hookspecs import Actor, Role
from click.testing import CliRunner
from keys_support import (
    OPERATOR,
    leaks,
    make_app,
    master_key,
    random_key,
    service_for,
)

from byok_plugin.cli import main
from byok_plugin.core.key_format import KNOWN_PROVIDERS
from byok_plugin.store.tables import workspace_keys


class Seen:
    """Everything a key could leak into."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.errors = 0

    def value(self, value: Any) -> Any:
        self.texts.append(repr(value))
        self.texts.append(str(value))
        return value

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return self.value(func(*args, **kwargs))
        except Exception as exc:
            self.errors += 1
            self.texts.extend([str(exc), repr(exc), repr(exc.args)])
            return None


def test_no_key_in_any_log_line_exception_repr_or_output(
    database_url: str, tmp_path: Path, emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy")  # SQLAlchemy sets its own WARN level
    k1, k2 = master_key("k1"), master_key("k2")
    keys = {p: random_key(p) for p in KNOWN_PROVIDERS}
    for provider, key in keys.items():
        emulator.add_key(provider, key)
    refused = {p: random_key(p) for p in KNOWN_PROVIDERS}
    seen = Seen()

    app = make_app(database_url, tmp_path, keys=[k1], validate=True, extra=emulator.environ())
    service, pm = service_for(app)
    admin = Actor("alice", {"acme": Role.ADMIN})
    member = Actor("bob", {"acme": Role.MEMBER})
    for provider in KNOWN_PROVIDERS:
        seen.call(service.set_key, admin, "acme", provider, keys[provider], label="main")
        seen.call(service.set_key, admin, "acme", provider, refused[provider], label="bad")
        seen.call(
            service.set_key, admin, "acme", provider, refused[provider], label="bad", test=False
        )
        seen.call(service.set_key, admin, "acme", provider, keys[provider], label="dup", test=False)
        seen.call(service.set_key, member, "acme", provider, keys[provider])
        seen.call(service.set_key, admin, "acme", provider, keys[provider] + " x", test=False)
        seen.call(pm.hook.byok_validate_key, provider=provider, api_key=refused[provider])
        seen.call(service.test_keys, admin, "acme", provider)
        seen.call(service.list_keys, member, "acme", provider)
        access = app.key_access
        stored = seen.call(access.enabled_keys, "acme", provider)
        for key in stored:
            seen.call(access.reveal, key)
            seen.call(access.credential, "acme", provider, key.id)
    wrong_provider = seen.call(
        service.set_key, admin, "acme", "anthropic", keys["openai"], test=False
    )
    assert wrong_provider is None
    seen.call(service.disable, admin, "acme", "openai", label="bad")
    seen.call(service.enable, admin, "acme", "openai", label="bad")

    # broken rows: tampered, copied, and a wrong master key
    rows = {k.label: k for k in app.key_access.enabled_keys("acme", "mistral")}
    with app.engine.begin() as conn:
        conn.execute(
            sa.update(workspace_keys)
            .where(workspace_keys.c.id == rows["bad"].id)
            .values(ciphertext=rows["main"].ciphertext)
        )
    for key in app.key_access.enabled_keys("acme", "mistral"):
        seen.call(app.key_access.reveal, key)
    impostor = make_app(database_url, tmp_path, keys=[master_key("k1")])
    for key in impostor.key_access.enabled_keys("acme", "exa"):
        seen.call(impostor.key_access.reveal, key)
    impostor.close()
    seen.call(service.rewrap, OPERATOR, batch_size=3)
    seen.call(service.delete_keys, admin, "acme", "google", label="main")
    app.close()

    # rotate to k2 and rewrap, then the resolution path once more
    app = make_app(database_url, tmp_path, keys=[k2, k1], validate=True, extra=emulator.environ())
    service, _ = service_for(app)
    seen.call(service.rewrap, OPERATOR, batch_size=2)
    for key in app.key_access.enabled_keys("acme", "anthropic"):
        seen.call(app.key_access.reveal, key)
    app.close()
    down = make_app("postgresql://u:p@127.0.0.1:1/x", tmp_path, keys=[k1])
    seen.call(lambda: down.key_access.enabled_keys("acme", "openai"))

    # the CLI, as the operator
    env = {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_ENCRYPTION_KEYS": ",".join(
            f"{k.id}:{base64.b64encode(k.secret).decode()}" for k in (k2, k1)
        ),
        **emulator.environ(),
    }
    runner = CliRunner()
    cli_runs = [
        (["init"], None),
        (["keys", "set", "-w", "beta", "-p", "openai"], keys["openai"]),
        (["keys", "set", "-w", "beta", "-p", "openai", "-l", "x"], refused["openai"]),
        (["keys", "set", "-w", "beta", "-p", "openai", keys["openai"]], ""),
        (["keys", "set", "-w", "beta", "-p", "anthropic"], keys["openai"]),
        (["keys", "list", "-w", "beta"], None),
        (["keys", "list", "-w", "acme", "--json"], None),
        (["keys", "test", "-w", "beta", "-p", "openai"], None),
        (["keys", "test", "-w", "acme", "-p", "mistral"], None),
        (["keys", "rewrap"], None),
        (["keys", "delete", "-w", "beta", "-p", "openai", "--all"], None),
    ]
    for args, stdin in cli_runs:
        result = runner.invoke(main, args, input=stdin, env=env)
        seen.texts.append(result.output)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception

    assert seen.errors > 20  # the refusals and failures really happened
    assert caplog.records, "logging captured nothing"
    logged = [
        record.getMessage() + (record.exc_text or "") + repr(record.args)
        for record in caplog.records
    ]
    assert any("sqlalchemy" in r.name for r in caplog.records)  # SQL and parameters included
    secrets_ = [*keys.values(), *refused.values()]
    master = [
        form for k in (k1, k2) for form in (base64.b64encode(k.secret).decode(), k.secret.hex())
    ]
    everything = "\n".join(seen.texts + logged)
    assert leaks(everything, secrets_) == []
    assert [m for m in master if m in everything] == []
