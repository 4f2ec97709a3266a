"""``byok keys``: set, list, delete, enable, disable, test and rewrap a workspace's stored keys,
delete a whole workspace's keys (destroying its data key), and retire a master key no stored key
uses any more.

The CLI acts as the local operator (:data:`~byok_plugin.cli.context.OPERATOR`) who holds the
master key; everything goes through the same :class:`~byok_plugin.keys.service.KeyService` as the library
and HTTP API, so the same checks and audit events apply.

A key is read from standard input when it is not a terminal, or else from a hidden prompt; never
from the command line, where it would stay in the shell history and the process list.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click
from byok_hookspecs import ByokError, KeyCheckStatus

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import echo_json
from byok_plugin.cli.tables import Column, TableSpec, console_for, show
from byok_plugin.cli.text import printable
from byok_plugin.core.errors import InvalidInput, KeyNotFound
from byok_plugin.core.key_format import DEFAULT_LABEL, KNOWN_PROVIDERS, check_key_id
from byok_plugin.settings import SettingsError

if TYPE_CHECKING:  # the store and its dependencies load when a command runs, not for --help
    from byok_plugin.keys.service import KeyService
    from byok_plugin.store.keys_repo import KeyInfo

__all__ = ["keys_group", "read_api_key", "user_errors"]

F = TypeVar("F", bound=Callable[..., Any])


class InputMistake(click.ClickException):
    """A mistake in what the user typed or configured (a malformed workspace id, label, key id,
    provider or variable): exit status 2, as click's own usage errors. Refusals, "not found" and
    an unreachable store exit 1."""

    exit_code = 2


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the package's errors (user mistakes, refusals, an unreachable store) into click
    errors: a clear message, exit 2 for a mistake in the input, 1 otherwise, no traceback. A
    message may quote a provider's answer: it is shown with what a terminal acts on escaped."""
    try:
        yield
    except (InvalidInput, SettingsError) as exc:
        raise InputMistake(printable(str(exc), lines=True)) from None
    except ByokError as exc:
        raise click.ClickException(printable(str(exc), lines=True)) from None


def handles_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def read_api_key(provider: str, workspace_id: str) -> str:
    """The key from standard input (one trailing line break removed) or a hidden prompt."""
    stdin = sys.stdin
    if stdin.isatty():
        value = click.prompt(
            f"{provider} API key for workspace {workspace_id} (input hidden)",
            hide_input=True,
            err=True,
        )
    else:
        value = stdin.read()
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
    if not value:
        raise click.UsageError(
            "no key given: pipe it on standard input (printf '%s' \"$KEY\" | byok keys set ...) "
            "or run the command in a terminal to be asked for it"
        )
    return value


def _service(cli: CliContext) -> KeyService:
    return cli.app.key_service(cli.pm)


workspace_option = click.option(
    "--workspace", "-w", "workspace_id", required=True, help="The workspace id."
)
provider_option = click.option(
    "--provider",
    "-p",
    required=True,
    type=click.Choice(KNOWN_PROVIDERS, case_sensitive=False),
    help="The provider.",
)
label_option = click.option("--label", "-l", default=None, help="The key's label.")
key_id_option = click.option("--key-id", default=None, help="The key's id (key_...).")
optional_provider_option = click.option(
    "--provider",
    "-p",
    default=None,
    type=click.Choice(KNOWN_PROVIDERS, case_sensitive=False),
    help="The provider (not needed with --key-id).",
)
yes_option = click.option(
    "--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal."
)


def _on_terminal() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def confirm(question: str, yes: bool) -> None:
    """Ask ``question`` on a terminal, unless ``--yes``; a "no" stops the command (exit 1) with
    nothing changed. Off a terminal (a script, a pipe) nothing is asked."""
    if yes or not _on_terminal():
        return
    if not click.confirm(question, default=False, err=True):
        raise click.ClickException("nothing was changed")


def _provider_for(
    cli: CliContext, workspace_id: str, provider: str | None, key_id: str | None
) -> str:
    """The provider given, or else the one of the key ``--key-id`` names."""
    if provider is not None:
        return provider
    if key_id is None:
        raise click.UsageError("--provider is required unless --key-id names the key")
    key_id = check_key_id(key_id)
    for info in _service(cli).list_keys(cli.actor, workspace_id):
        if info.id == key_id:
            return info.provider
    raise KeyNotFound(workspace_id, None, f"with id {key_id!r}")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


def _describe(info: KeyInfo) -> str:
    return f"{info.provider} key {info.label!r} ({info.id}, {info.hint})"


@click.group("keys")
def keys_group() -> None:
    """Manage the provider keys stored for workspaces (bring your own key)."""


@keys_group.command("set")
@workspace_option
@provider_option
@label_option
@click.option(
    "--no-test", is_flag=True, help="Store without checking the key live with the provider."
)
@yes_option
@click.argument("extra", nargs=-1, required=False, metavar="")
@pass_cli
@handles_errors
def set_command(
    cli: CliContext,
    workspace_id: str,
    provider: str,
    label: str | None,
    no_test: bool,
    yes: bool,
    extra: tuple[str, ...],
) -> None:
    """Store a workspace's key for a provider, or replace the one with the same label.

    The key is read from standard input, or asked for with a hidden prompt:

        printf '%s' "$OPENAI_KEY" | byok keys set --workspace acme --provider openai
    """
    if extra:
        # Never echo what was given: it may well be the key itself.
        raise click.UsageError(
            "byok keys set takes no arguments: the key is never read from the command line "
            "(it would stay in your shell history and the process list). Pipe it on standard "
            "input or answer the hidden prompt. If you typed a key there, consider it exposed "
            "and rotate it."
        )
    if _on_terminal() and not yes:
        wanted = label if label is not None else DEFAULT_LABEL
        current = [
            info
            for info in _service(cli).list_keys(cli.actor, workspace_id, provider)
            if info.label == wanted
        ]
        if current:
            confirm(
                f"Replace {_describe(current[0])} of workspace {workspace_id!r}? The old key is "
                "deleted",
                yes,
            )
    api_key = read_api_key(provider.lower(), workspace_id)
    result = _service(cli).set_key(
        cli.actor, workspace_id, provider, api_key, label=label, test=not no_test
    )
    del api_key
    for warning in result.warnings:
        click.echo(click.style(f"warning: {warning}", fg="yellow"), err=True)
    verb = "replaced" if result.replaced is not None else "stored"
    click.echo(f"{verb} {_describe(result.key)} in workspace {result.key.workspace_id!r}")
    if result.replaced is not None:
        click.echo(f"  the previous key {result.replaced.id} ({result.replaced.hint}) is deleted")
        warn_key_budgets(cli, [result.replaced.id], "replaced", result.key.id)
    if result.check is not None:
        click.echo(f"  live check: {result.check.status.value}: {result.check.message}")
    else:
        click.echo("  live check: not run (--no-test)")


@keys_group.command("list")
@workspace_option
@click.option(
    "--provider",
    "-p",
    default=None,
    type=click.Choice(KNOWN_PROVIDERS, case_sensitive=False),
    help="Only this provider's keys.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@handles_errors
def list_command(cli: CliContext, workspace_id: str, provider: str | None, as_json: bool) -> None:
    """List a workspace's keys, masked (the keys are never decrypted to list them)."""
    keys = _service(cli).list_keys(cli.actor, workspace_id, provider)
    if as_json:
        echo_json({"workspace": workspace_id, "keys": [info.to_dict() for info in keys]})
        return
    if not keys:
        click.echo(f"no keys stored for workspace {workspace_id!r}")
        return
    spec = TableSpec(
        columns=(
            Column("provider", "id"),
            Column("label", "id"),
            Column("id", "id"),
            Column("key", "id", priority=1),
            Column("status", "id"),
            Column("last used", "text", priority=3),
            Column("cooldown until", "text", priority=2),
        ),
        rows=tuple(
            (
                info.provider,
                info.label,
                info.id,
                info.hint,
                info.status,
                _when(info.last_used_at),
                _when(info.cooldown_until),
            )
            for info in keys
        ),
        title=f"keys of workspace {workspace_id}",
    )
    show(console_for(), spec)


def _selection(label: str | None, key_id: str | None, all_keys: bool, verb: str) -> None:
    chosen = sum(x is not None for x in (label, key_id, all_keys or None))
    if chosen != 1:
        raise click.UsageError(
            f"say which keys to {verb}: exactly one of --label, --key-id or --all"
        )


def key_selection(command: F) -> F:
    """The options that pick a workspace's keys of a provider: --label, --key-id or --all."""
    for option in (
        click.option("--all", "all_keys", is_flag=True, help="Every key of the provider."),
        key_id_option,
        label_option,
        optional_provider_option,
        workspace_option,
    ):
        command = option(command)
    return command


@keys_group.command("delete")
@key_selection
@yes_option
@pass_cli
@handles_errors
def delete_command(
    cli: CliContext,
    workspace_id: str,
    provider: str | None,
    label: str | None,
    key_id: str | None,
    all_keys: bool,
    yes: bool,
) -> None:
    """Delete a workspace's key (by label or id), or all its keys for a provider.

    --all asks first on a terminal (--yes does not ask).
    """
    _selection(label, key_id, all_keys, "delete")
    provider = _provider_for(cli, workspace_id, provider, key_id)
    if all_keys:
        count = len(_service(cli).list_keys(cli.actor, workspace_id, provider))
        confirm(f"Delete all {count} {provider} keys of workspace {workspace_id!r}?", yes)
    deleted = _service(cli).delete_keys(
        cli.actor, workspace_id, provider, key_id=key_id, label=label
    )
    for info in deleted:
        click.echo(f"deleted {_describe(info)} from workspace {workspace_id!r}")
    warn_key_budgets(cli, [info.id for info in deleted], "deleted", None)


def warn_key_budgets(
    cli: CliContext, key_ids: list[str], verb: str, new_key_id: str | None
) -> None:
    """Warn about the budgets narrowed to keys that are gone: they apply to no call any more
    (``byok budget list`` marks them) until they are set again with a current key."""
    if not key_ids:
        return
    instead = f" --key-id {new_key_id}" if new_key_id is not None else " --key-id of a current key"
    for workspace_id, name, key_id in cli.app.budgets.scoped_to_keys(key_ids):
        click.echo(
            click.style(
                f"warning: budget {name!r} of workspace {workspace_id!r} is narrowed to the "
                f"{verb} key {key_id}: it no longer applies to any call. To keep it, set it "
                f"again: byok budget set -w {workspace_id} {name}{instead} (and its limit and "
                "other options)",
                fg="yellow",
            ),
            err=True,
        )


@keys_group.command("delete-workspace")
@workspace_option
@click.option("--yes", is_flag=True, help="Confirm: this cannot be undone.")
@pass_cli
@handles_errors
def delete_workspace_command(cli: CliContext, workspace_id: str, yes: bool) -> None:
    """Delete every key of a workspace and destroy its data key (crypto-shredding).

    Copies of its keys that survive elsewhere (a backup, a dump) can no longer be decrypted
    either, whatever master key one holds.
    """
    if not yes:
        raise click.UsageError(
            f"this deletes every key of workspace {workspace_id!r} for good; add --yes"
        )
    deleted, shredded = _service(cli).delete_workspace(cli.actor, workspace_id)
    click.echo(f"deleted {deleted} keys of workspace {workspace_id!r}")
    if shredded:
        click.echo(
            "its data key was destroyed: copies of its keys (backups, dumps) can no longer be "
            "decrypted"
        )


def _status_command(status: str) -> Callable[..., None]:
    verb = "enable" if status == "enabled" else "disable"

    @key_selection
    @pass_cli
    @handles_errors
    def command(
        cli: CliContext,
        workspace_id: str,
        provider: str | None,
        label: str | None,
        key_id: str | None,
        all_keys: bool,
    ) -> None:
        _selection(label, key_id, all_keys, verb)
        provider = _provider_for(cli, workspace_id, provider, key_id)
        service = _service(cli)
        change = service.enable if status == "enabled" else service.disable
        for info in change(cli.actor, workspace_id, provider, key_id=key_id, label=label):
            click.echo(f"{status} {_describe(info)} in workspace {workspace_id!r}")

    command.__doc__ = (
        "Enable a key again (resolution may use it; a cooldown ends)."
        if status == "enabled"
        else "Disable a key: kept and listed, but never used for calls."
    )
    return command


keys_group.command("enable")(_status_command("enabled"))
keys_group.command("disable")(_status_command("disabled"))


@keys_group.command("test")
@workspace_option
@optional_provider_option
@label_option
@key_id_option
@pass_cli
@handles_errors
def test_command(
    cli: CliContext,
    workspace_id: str,
    provider: str | None,
    label: str | None,
    key_id: str | None,
) -> None:
    """Check stored keys live with the provider (all of the provider's keys by default).

    Exits with status 1 when a key is refused or the provider cannot be reached.
    """
    provider = _provider_for(cli, workspace_id, provider, key_id)
    results = _service(cli).test_keys(cli.actor, workspace_id, provider, key_id=key_id, label=label)
    failed = 0
    for result in results:
        status = result.check.status
        if status in (KeyCheckStatus.INVALID, KeyCheckStatus.UNREACHABLE):
            failed += 1
        click.echo(f"{_describe(result.key)}: {status.value}: {result.check.message}")
    if failed:
        raise click.ClickException(f"{failed} of {len(results)} keys did not pass the live check")


@keys_group.command("rewrap")
@click.option("--dry-run", is_flag=True, help="Count and check, change nothing.")
@click.option(
    "--batch-size",
    default=100,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Rows re-encrypted per transaction.",
)
@click.option(
    "--pause",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 60),
    help="Seconds to wait between batches, to spare a busy database.",
)
@pass_cli
@handles_errors
def rewrap_command(cli: CliContext, dry_run: bool, batch_size: int, pause: float) -> None:
    """Re-encrypt every stored key under the current (first) master key, or, with
    BYOK_KEY_ENVELOPES=1, under its workspace's data key (after moving every data key to the
    current key-encryption key; rows are not touched for that).

    Safe to interrupt and run again; afterwards the old master keys can be removed from the
    keyring.
    """
    service = _service(cli)
    envelopes = cli.app.settings.key_envelopes
    if envelopes:
        click.echo("envelope encryption: every key goes under its workspace's data key")
        click.echo(f"data keys wrapped by: {cli.pm.hook.byok_key_provider() or 'no provider'}")
    else:
        click.echo(f"current master key: {cli.app.keyring.current.id}")
    before = cli.app.key_store.count_by_master_key()
    _print_counts("before", before)

    def progress(done: int, total: int) -> None:
        click.echo(f"  batch: {done} rows {'checked' if dry_run else 'rewrapped'} ({total} so far)")

    report = service.rewrap(
        cli.actor, batch_size=batch_size, dry_run=dry_run, pause=pause, progress=progress
    )
    if dry_run:
        click.echo(f"dry run: {report.rewrapped} rows would be rewrapped; nothing was changed")
    else:
        target = "their workspace's data key" if envelopes else report.current_master_key
        click.echo(f"rewrapped {report.rewrapped} rows under {target}")
        _print_counts("after", report.after)
    if report.kek is not None:
        verb = "would be rewrapped" if dry_run else "rewrapped"
        click.echo(f"data keys: {report.data_keys_rewrapped} {verb} under {report.kek}")
        for kek, count in sorted(report.data_keys_after.items()):
            click.echo(f"  {count} data keys wrapped by {kek}")
    for failure in report.failures:
        click.echo(
            f"cannot rewrap {failure.provider} key {failure.key_id} of workspace "
            f"{failure.workspace_id!r}: {failure.reason}",
            err=True,
        )
    if not dry_run and report.retirable:
        click.echo(
            "no stored key uses master key(s) "
            + ", ".join(report.retirable)
            + " any more: retire them with `byok keys retire-master-key ID`"
        )
    if report.failures:
        raise click.ClickException(
            f"{len(report.failures)} stored keys could not be decrypted and were left as they are"
        )


@keys_group.command("retire-master-key")
@click.argument("master_key_id")
@pass_cli
@handles_errors
def retire_master_key_command(cli: CliContext, master_key_id: str) -> None:
    """Remove MASTER_KEY_ID from the master key file once no stored key uses it.

    The last step of a rotation: `byok init --new-master-key`, restart every process that reads
    the key file, `byok keys rewrap`, then this. It refuses while any stored key is still
    encrypted under MASTER_KEY_ID, and never removes the current (first) key.
    """
    from byok_plugin.store import describe_url

    kept = _service(cli).retire_master_key(cli.actor, master_key_id)
    click.echo(
        f"retired master key {master_key_id}: no stored key in "
        f"{describe_url(cli.settings.database_url)} used it; removed from {cli.settings.key_file}"
    )
    click.echo(
        f"It is kept alone in {kept} (mode 0600): move that file offline, and delete it once no "
        f"other database or backup can need the key. A process that has not been restarted "
        f"since the rotation still encrypts with it: restart every process that reads the key "
        f"file.",
        err=True,
    )


def _print_counts(when: str, counts: dict[str, int] | Any) -> None:
    if not counts:
        click.echo(f"{when}: no stored keys")
        return
    from byok_plugin.core.crypto import ENVELOPE_MASTER_KEY_ID

    for kid, count in sorted(counts.items()):
        under = (
            "their workspace's data key" if kid == ENVELOPE_MASTER_KEY_ID else f"master key {kid}"
        )
        click.echo(f"{when}: {count} keys under {under}")
