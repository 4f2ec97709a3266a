"""``byok fallback show|set``: may the platform key serve a call after the workspace's own key
failed at the provider? ``never`` (the default), ``on_rate_limit`` or ``on_error``.

Changes are authorized (``keys.manage``) and audited (``settings.fallback_policy``) through the
hooks, as key changes are.
"""

from __future__ import annotations

import click
from byok_hookspecs import Action, AuditEvent, NotAuthorized

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.keys import handles_errors, workspace_option

#: byok_plugin.resolution.workspace_settings.FallbackPolicy's values (the store loads when a command runs)
POLICIES = ("never", "on_rate_limit", "on_error")

__all__ = ["fallback_group"]


def _authorize(cli: CliContext, workspace_id: str, action: Action) -> None:
    allowed = cli.pm.hook.byok_authorize(actor=cli.actor, workspace_id=workspace_id, action=action)
    if allowed is not True:
        raise NotAuthorized(cli.actor.id, workspace_id, action.value)


@click.group("fallback")
def fallback_group() -> None:
    """Whether the platform key may serve a call after a workspace's own key failed."""


@fallback_group.command("show")
@workspace_option
@pass_cli
@handles_errors
def show_command(cli: CliContext, workspace_id: str) -> None:
    """Print the workspace's fallback policy."""
    _authorize(cli, workspace_id, Action.READ_KEYS)
    settings = cli.app.workspace_settings.get(workspace_id)
    changed = (
        f" (set by {settings.updated_by or '?'} at {settings.updated_at:%Y-%m-%d %H:%M:%SZ})"
        if settings.updated_at is not None
        else " (the default)"
    )
    click.echo(f"workspace {workspace_id!r}: fallback {settings.fallback_policy.value}{changed}")


@fallback_group.command("set")
@workspace_option
@click.argument("policy", type=click.Choice(POLICIES))
@pass_cli
@handles_errors
def set_command(cli: CliContext, workspace_id: str, policy: str) -> None:
    """Set the workspace's fallback policy: never, on_rate_limit or on_error."""
    _authorize(cli, workspace_id, Action.MANAGE_KEYS)
    before = cli.app.workspace_settings.fallback_policy(workspace_id)
    settings = cli.app.workspace_settings.set_fallback_policy(
        workspace_id, policy, actor_id=cli.actor.id
    )
    cli.pm.hook.byok_audit(
        event=AuditEvent(
            action="settings.fallback_policy",
            workspace_id=workspace_id,
            actor_id=cli.actor.id,
            detail=f"{before.value} -> {settings.fallback_policy.value}",
            occurred_at=cli.clock(),
        )
    )
    click.echo(f"workspace {workspace_id!r}: fallback {settings.fallback_policy.value}")
