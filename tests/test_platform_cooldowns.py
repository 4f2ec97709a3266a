"""Platform-key cooldowns are shared through the store (revision 0005): a platform key one
worker saw refused is skipped by every worker on the same store, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from byok_hookspecs import (
    CredentialRequest,
    CredentialSource,
    FailureReason,
    ProviderFailure,
)
from keys_support import OPERATOR
from migration_support import model_differences

from byok_plugin.app import App
from byok_plugin.manager import plugin_manager_for
from byok_plugin.resolution.platform_cooldowns import platform_key_cooldowns
from byok_plugin.settings import Settings
from byok_plugin.store import create_store_engine, ensure_migrated

TABLE = platform_key_cooldowns.name
KEYS = ("sk-proj-" + "a" * 40, "sk-proj-" + "b" * 40)


def test_the_migration_creates_the_table_as_modelled(database_url: str) -> None:
    engine = create_store_engine(database_url)
    try:
        ensure_migrated(engine)
        with engine.connect() as conn:
            assert TABLE in sa.inspect(conn).get_table_names()
            assert model_differences(conn, {TABLE}) == []
    finally:
        engine.dispose()


def worker(home: Path, database_url: str) -> App:
    return App(
        Settings.from_environ(
            {
                "BYOK_HOME": str(home),
                "BYOK_DATABASE_URL": database_url,
                "BYOK_PLATFORM_KEYS_OPENAI": ",".join(KEYS),
                "BYOK_KEY_CACHE_SECONDS": "0",
                "BYOK_KEY_COOLDOWN_SECONDS": "600",
            }
        )
    )


def request(failure: ProviderFailure | None = None) -> CredentialRequest:
    return CredentialRequest(
        workspace_id="globex",
        provider="openai",
        model="gpt-4o-mini",
        actor=OPERATOR,
        failure=failure,
    )


def test_a_platform_key_refused_in_one_worker_is_skipped_by_the_others(
    tmp_path: Path, database_url: str
) -> None:
    first, second = worker(tmp_path, database_url), worker(tmp_path, database_url)
    try:
        pm1, pm2 = plugin_manager_for(first), plugin_manager_for(second)
        # the second worker hands out both keys in turn before anything happens
        seen = {pm2.hook.byok_resolve_credential(request=request()).api_key for _ in range(4)}
        assert seen == set(KEYS)
        # the first worker's call on the first key is refused with a 429
        served = pm1.hook.byok_resolve_credential(request=request())
        assert served.api_key == KEYS[0]
        failure = ProviderFailure(
            reason=FailureReason.RATE_LIMIT,
            source=CredentialSource.PLATFORM,
            key_id=served.key_id,
            status=429,
        )
        again = pm1.hook.byok_resolve_credential(request=request(failure))
        assert again.api_key == KEYS[1]
        # the second worker never learnt of it itself, and skips that key all the same
        for _ in range(6):
            credential = pm2.hook.byok_resolve_credential(request=request())
            assert credential.api_key == KEYS[1]
            assert credential.source is CredentialSource.PLATFORM
        # and a worker started later too
        third = worker(tmp_path, database_url)
        try:
            pm3 = plugin_manager_for(third)
            assert {
                pm3.hook.byok_resolve_credential(request=request()).api_key for _ in range(4)
            } == {KEYS[1]}
        finally:
            third.close()
    finally:
        first.close()
        second.close()
