"""``byok reconcile``: the ledger's cost beside the cost the provider reported, per key and day,
with the differences and the calls left to settle (``uncertain``, ``interrupted``, unpriced)."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.keys import handles_errors
from byok_plugin.cli.text import plain
from byok_plugin.cli.usage import parse_when
from byok_plugin.reconcile import reconcile

__all__ = ["reconcile_command"]


def _money(amount: object) -> str:
    return f"{amount:f}" if amount else "0"


@click.command("reconcile")
@click.option("--provider", "-p", default=None, help="Only this provider (e.g. exa). Default: all.")
@click.option(
    "--workspace", "-w", "workspaces", multiple=True, help="Only this workspace (repeatable)."
)
@click.option("--since", metavar="DATE", help="From this date or time (UTC), inclusive.")
@click.option("--until", metavar="DATE", help="Until this date (inclusive) or time (exclusive).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (amounts as decimal strings).")
@pass_cli
@handles_errors
def reconcile_command(
    cli: CliContext,
    provider: str | None,
    workspaces: tuple[str, ...],
    since: str | None,
    until: str | None,
    as_json: bool,
) -> None:
    """The ledger's cost beside what the provider reported, per key and day.

    \b
    byok reconcile --provider exa --since 2026-12-01
    """
    start = parse_when(since, "--since", end=False)
    stop = parse_when(until, "--until", end=True)
    rows = cli.app.ledger.rows(workspaces=workspaces, since=start, until=stop)
    lines = reconcile(rows, cli.app.billing, provider)
    differing = [line for line in lines if line.difference]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "lines": [line.to_dict() for line in lines],
                    "differences": [line.to_dict() for line in differing],
                },
                indent=2,
            )
        )
        return
    console = Console()
    if not lines:
        console.print("No calls recorded.")
        return
    table = Table(title="byok reconcile, amounts in USD")
    for header in ("provider", "key", "day", "calls", "reported", "uncertain", "interrupted"):
        table.add_column(
            header, justify="left" if header in ("provider", "key", "day") else "right"
        )
    for header in ("unpriced", "list cost", "reported cost", "table price", "difference"):
        table.add_column(header, justify="right")
    for line in lines:
        table.add_row(
            plain(line.provider),
            plain(line.key_id),
            line.day,
            str(line.calls),
            str(line.reported_calls),
            str(line.uncertain_calls),
            str(line.interrupted_calls),
            str(line.unpriced_calls),
            _money(line.list_cost),
            _money(line.reported_cost),
            _money(line.table_cost),
            _money(line.difference),
        )
    console.print(table)
    if differing:
        console.print(f"{len(differing)} key-days where the provider's cost differs from the table")
    unsettled = sum(line.uncertain_calls for line in lines)
    if unsettled:
        console.print(
            f"{unsettled} uncertain calls: the provider may have run them; check its own usage"
        )
