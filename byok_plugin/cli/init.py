"""``byok init``: create the master key file (mode 0600) and the database, and migrate it.

Safe to run again: an existing key file is never overwritten, and migrations only move forward.
``--new-master-key`` puts a fresh master key first in the key file (it encrypts from then on)
and keeps the others, for a rotation finished by ``byok keys rewrap``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.keys import user_errors

if TYPE_CHECKING:
    from byok_plugin.core.crypto import Keyring

__all__ = ["init_command"]


def _backup_reminder(path: object) -> None:
    lines = [
        "",
        f"IMPORTANT: back up the master key file {path} now, somewhere off this machine",
        "(a password manager or a secrets vault). Without it, nobody - not even you - can",
        "decrypt the API keys stored in the database. Never commit it or share it.",
        "",
    ]
    for line in lines:
        click.echo(click.style(line, fg="yellow", bold=True), err=True)


@click.command("init")
@click.option(
    "--new-master-key",
    is_flag=True,
    help="Add a fresh master key first in the key file (rotation; then run `byok keys rewrap`).",
)
@pass_cli
def init_command(cli: CliContext, new_master_key: bool) -> None:
    """Create the master key file and the database (safe to run again)."""
    from byok_plugin.core.crypto import Keyring, add_master_key_to_file, create_key_file
    from byok_plugin.store import describe_url
    from byok_plugin.store.migrate import current_revision

    settings = cli.settings
    with user_errors():
        if settings.encryption_keys:
            if new_master_key:
                raise click.UsageError(
                    "the master keys come from BYOK_ENCRYPTION_KEYS: add the new key first in "
                    "that variable instead of using --new-master-key"
                )
            keyring = Keyring.from_environment_value(settings.encryption_keys)
            click.echo(
                f"master keys: {len(keyring.ids)} from BYOK_ENCRYPTION_KEYS "
                f"(current: {keyring.current.id}); no key file written"
            )
        elif settings.key_file.exists():
            if new_master_key:
                key = add_master_key_to_file(settings.key_file)
                click.echo(
                    f"added master key {key.id} first in {settings.key_file}; it encrypts from "
                    f"now on. Run `byok keys rewrap` to move the stored keys to it."
                )
                _backup_reminder(settings.key_file)
            keyring = Keyring.from_file(settings.key_file)
            if not new_master_key:
                click.echo(
                    f"master key file {settings.key_file} already exists: kept as it is "
                    f"(current key: {keyring.current.id})"
                )
        else:
            if new_master_key:
                raise click.UsageError(
                    f"there is no key file at {settings.key_file} yet: run `byok init` first"
                )
            key = create_key_file(settings.key_file)
            keyring = Keyring.from_file(settings.key_file)
            click.echo(f"created master key file {settings.key_file} (mode 0600), key {key.id}")
            _backup_reminder(settings.key_file)

        engine = cli.app.engine  # creates and migrates the database
        click.echo(
            f"database ready: {describe_url(settings.database_url)} "
            f"(schema revision {current_revision(engine)})"
        )
        _check_keyring_against_database(cli, keyring)
        _check_key_provider(cli)


def _check_key_provider(cli: CliContext) -> None:
    """Show the active key-encryption provider and, under envelope encryption, check that it
    wraps and unwraps a throw-away data key (a KMS that does not answer is reported now, not at
    the first resolution)."""
    import secrets

    from byok_plugin.cli.plugins import key_provider_summary
    from byok_plugin.core.crypto import KEY_BYTES, DataKey

    click.echo(key_provider_summary(cli))
    if not cli.settings.key_envelopes:
        return
    from byok_plugin.store.data_keys_repo import StoredDataKey

    probe, workspace = secrets.token_bytes(KEY_BYTES), "byok-init-probe"
    data_keys = cli.app.data_keys
    wrapped = data_keys.wrap(workspace, probe)
    now = cli.app.clock()
    check = DataKey(workspace, probe).check_value
    back = data_keys.unwrap(StoredDataKey(workspace, wrapped, now, now, check))
    if back.secret != probe:  # pragma: no cover - a provider that answers wrongly
        raise click.ClickException(
            f"the key provider {wrapped.provider} unwrapped a test data key into other bytes"
        )
    click.echo(f"key provider check: wrapped and unwrapped a test data key with {wrapped.key_id}")


def _check_keyring_against_database(cli: CliContext, keyring: Keyring) -> None:
    from byok_plugin.core.crypto import ENVELOPE_MASTER_KEY_ID

    store = cli.app.key_store
    recorded = store.master_key_check_values()
    counts = store.count_by_master_key()
    wrong = [
        kid
        for kid, check in recorded.items()
        if (key := keyring.get(kid)) is not None and key.check_value != check
    ]
    if wrong:
        raise click.ClickException(
            "the keyring's master key(s) "
            + ", ".join(wrong)
            + " differ from the ones this database was encrypted with under the same id; "
            "restore the original key file (or BYOK_ENCRYPTION_KEYS)"
        )
    missing = {
        kid: n
        for kid, n in counts.items()
        if n and kid != ENVELOPE_MASTER_KEY_ID and keyring.get(kid) is None
    }
    for kid, count in sorted(missing.items()):
        click.echo(
            click.style(
                f"warning: {count} stored keys are encrypted under master key {kid}, which is "
                f"not in the keyring; they cannot be decrypted until it is added back",
                fg="yellow",
            ),
            err=True,
        )
