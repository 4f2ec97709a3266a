"""``byok audit``: read the audit log (who changed which key, who was refused, when the platform
key stood in), newest first.

Reading it is for a workspace's admins (``keys.manage``) and operators, asked of the
``byok_authorize`` hook like every other action; without ``-w`` the command shows every
workspace's events, which only an operator may read. The CLI acts as the local operator.
"""

from __future__ import annotations

import click

from byok_plugin.audit_log import DEFAULT_LIMIT, MAX_LIMIT, AuditQuery, event_json, read_audit_log
from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import echo_json
from byok_plugin.cli.keys import handles_errors
from byok_plugin.cli.tables import console_for
from byok_plugin.cli.text import plain
from byok_plugin.cli.usage import parse_when

__all__ = ["audit_command"]


@click.command("audit")
@click.option(
    "--workspace", "-w", "workspace_id", default=None, help="One workspace (default: all)."
)
@click.option("--since", metavar="DATE", help="From this date or time (UTC), inclusive.")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1, MAX_LIMIT),
    default=DEFAULT_LIMIT,
    show_default=True,
    help="At most this many events, newest first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@handles_errors
def audit_command(
    cli: CliContext, workspace_id: str | None, since: str | None, limit: int, as_json: bool
) -> None:
    """Show the audit log, newest first.

    \b
    byok audit -w acme
    byok audit -w acme --since 2026-11-01 --json
    """
    query = AuditQuery(
        workspace_id=workspace_id,
        since=parse_when(since, "--since", end=False, now=cli.clock()),
        limit=limit,
    )
    events = read_audit_log(cli.pm, cli.app.audit_store, cli.actor, query, clock=cli.clock)
    if as_json:
        echo_json(
            {
                "workspace_id": workspace_id,
                "since": query.since.isoformat() if query.since else None,
                "events": [event_json(event) for event in events],
            }
        )
        return
    where = f"workspace {workspace_id}" if workspace_id is not None else "every workspace"
    console = console_for()
    if not events:
        console.print(
            plain(f"No audit events in {where}" + (f" since {since}." if since else ".")),
            soft_wrap=True,
        )
        return
    # one event per line and its detail below it, never a table: at any width nothing (an id,
    # a time) is cut, and a pipe gets the same lines, unwrapped
    console.print(plain(f"audit log of {where}, newest first:"), soft_wrap=True)
    for event in events:
        parts = [f"{event.occurred_at:%Y-%m-%d %H:%M:%S}Z"]
        if workspace_id is None:
            parts.append(event.workspace_id)
        parts.append(event.action if event.outcome == "ok" else f"{event.action} ({event.outcome})")
        parts.append(f"by {event.actor_id or 'the system'}")
        if event.provider or event.key_id:
            parts.append(" ".join(p for p in (event.provider, event.key_id) if p))
        console.print(plain("  ".join(parts)), soft_wrap=True)
        if event.detail:
            console.print(plain(f"    {event.detail}"), soft_wrap=True)
