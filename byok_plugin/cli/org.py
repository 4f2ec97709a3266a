"""``byok org``: organizations, the workspaces they own and the key pool those workspaces inherit.

An organization's keys are stored keys like a workspace's (encrypted the same way, owner id
``org:<id>``); these commands go through :class:`~byok_plugin.resolution.organizations.Organizations` and
:class:`~byok_plugin.keys.service.KeyService`, so authorization (``byok_authorize`` on ``org:<id>``) and
audit are the same as everywhere. A key is read from standard input or a hidden prompt, never from
the command line. ``byok org inherited`` shows what a workspace inherits, masked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import echo_json
from byok_plugin.cli.keys import (
    handles_errors,
    label_option,
    provider_option,
    read_api_key,
    warn_key_budgets,
    workspace_option,
)
from byok_plugin.cli.tables import Column, TableSpec, console_for, show
from byok_plugin.core.key_format import KNOWN_PROVIDERS

if TYPE_CHECKING:
    from byok_plugin.resolution.organizations import Organizations
    from byok_plugin.store.keys_repo import KeyInfo

__all__ = ["org_group"]


def _orgs(cli: CliContext) -> Organizations:
    return cli.app.organizations(cli.pm)


def _owner(org_id: str) -> str:
    from byok_plugin.resolution.organizations import org_owner

    return org_owner(org_id)


def _when(value: object) -> str:
    return f"{value:%Y-%m-%d %H:%M:%SZ}" if value is not None else "-"


def _print_keys(title: str, keys: list[KeyInfo]) -> None:
    spec = TableSpec(
        columns=(
            Column("provider", "id"),
            Column("label", "id"),
            Column("id", "id"),
            Column("key", "id", priority=1),
            Column("status", "id"),
            Column("cooldown until", "text", priority=2),
        ),
        rows=tuple(
            (
                info.provider,
                info.label,
                info.id,
                info.hint,
                info.status,
                _when(info.cooldown_until),
            )
            for info in keys
        ),
        title=title,
    )
    show(console_for(), spec)


org_option = click.argument("org_id", metavar="ORG")
optional_provider = click.option(
    "--provider",
    "-p",
    default=None,
    type=click.Choice(KNOWN_PROVIDERS, case_sensitive=False),
    help="Only this provider's keys.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group("org")
def org_group() -> None:
    """Organizations: their workspaces inherit their keys (block > workspace > organization >
    platform)."""


@org_group.command("create")
@org_option
@pass_cli
@handles_errors
def create_command(cli: CliContext, org_id: str) -> None:
    """Create an organization."""
    created = _orgs(cli).create(cli.actor, org_id)
    click.echo(f"organization {org_id!r} {'created' if created else 'already exists'}")


@org_group.command("attach")
@org_option
@workspace_option
@pass_cli
@handles_errors
def attach_command(cli: CliContext, org_id: str, workspace_id: str) -> None:
    """Make a workspace one of the organization's: it inherits the organization's keys."""
    _orgs(cli).attach(cli.actor, org_id, workspace_id)
    click.echo(f"workspace {workspace_id!r} belongs to organization {org_id!r}")


@org_group.command("opt-out")
@workspace_option
@click.option("--undo", is_flag=True, help="Opt back in: use the organization's keys again.")
@pass_cli
@handles_errors
def opt_out_command(cli: CliContext, workspace_id: str, undo: bool) -> None:
    """Stop (or, with --undo, resume) using the organization's keys in a workspace."""
    membership = _orgs(cli).set_opt_out(cli.actor, workspace_id, not undo)
    state = "does not use" if membership.opted_out else "uses"
    click.echo(
        f"workspace {workspace_id!r} {state} the keys of organization "
        f"{membership.organization_id!r}"
    )


@org_group.command("keys")
@org_option
@optional_provider
@json_option
@pass_cli
@handles_errors
def keys_command(cli: CliContext, org_id: str, provider: str | None, as_json: bool) -> None:
    """List an organization's keys, masked."""
    keys = _orgs(cli).list_keys(cli.actor, org_id, provider)
    if as_json:
        echo_json({"organization": org_id, "keys": [info.to_dict() for info in keys]})
    elif not keys:
        click.echo(f"no keys stored for organization {org_id!r}")
    else:
        _print_keys(f"keys of organization {org_id}", keys)


@org_group.command("set-key")
@org_option
@provider_option
@label_option
@click.option(
    "--no-test", is_flag=True, help="Store without checking the key live with the provider."
)
@pass_cli
@handles_errors
def set_key_command(
    cli: CliContext, org_id: str, provider: str, label: str | None, no_test: bool
) -> None:
    """Store an organization's key for a provider (or replace the one with the same label).

    The key is read from standard input, or asked for with a hidden prompt:

        printf '%s' "$OPENAI_KEY" | byok org set-key acme --provider openai
    """
    orgs = _orgs(cli)
    orgs.list_keys(cli.actor, org_id, provider)  # the organization exists, before the key is read
    api_key = read_api_key(provider.lower(), f"organization {org_id}")
    result = orgs.keys.set_key(
        cli.actor, _owner(org_id), provider, api_key, label=label, test=not no_test
    )
    verb = "replaced" if result.replaced else "stored"
    click.echo(
        f"{verb} {provider} key {result.key.id} ({result.key.hint}, label "
        f"{result.key.label!r}) for organization {org_id!r}"
    )
    if result.replaced is not None:
        warn_key_budgets(cli, [result.replaced.id], "replaced", result.key.id)


@org_group.command("delete-key")
@org_option
@provider_option
@click.option("--label", "-l", default=None, help="The key's label.")
@click.option("--key-id", default=None, help="The key's id (key_...).")
@pass_cli
@handles_errors
def delete_key_command(
    cli: CliContext, org_id: str, provider: str, label: str | None, key_id: str | None
) -> None:
    """Delete an organization's key by --label or --key-id."""
    if (label is None) == (key_id is None):
        raise click.UsageError("say which key to delete: exactly one of --label or --key-id")
    orgs = _orgs(cli)
    orgs.list_keys(cli.actor, org_id, provider)  # the organization exists
    deleted = orgs.keys.delete_keys(cli.actor, _owner(org_id), provider, key_id=key_id, label=label)
    for info in deleted:
        click.echo(
            f"deleted {info.provider} key {info.id} ({info.hint}) of organization {org_id!r}"
        )
    warn_key_budgets(cli, [info.id for info in deleted], "deleted", None)


@org_group.command("inherited")
@workspace_option
@optional_provider
@json_option
@pass_cli
@handles_errors
def inherited_command(
    cli: CliContext, workspace_id: str, provider: str | None, as_json: bool
) -> None:
    """List the keys a workspace inherits from its organization, masked."""
    membership, inherited = _orgs(cli).inherited_keys(cli.actor, workspace_id, provider)
    if as_json:
        echo_json(
            {
                "workspace_id": workspace_id,
                "organization_id": membership.organization_id if membership else None,
                "opted_out": membership.opted_out if membership else None,
                "keys": [k.to_dict() for k in inherited],
            }
        )
        return
    if membership is None:
        click.echo(f"workspace {workspace_id!r} belongs to no organization")
        return
    state = " (opted out: not used)" if membership.opted_out else ""
    if not inherited:
        click.echo(
            f"workspace {workspace_id!r} inherits no keys from organization "
            f"{membership.organization_id!r}{state}"
        )
        return
    _print_keys(
        f"keys workspace {workspace_id} inherits from organization "
        f"{membership.organization_id}{state}",
        [k.key for k in inherited],
    )
