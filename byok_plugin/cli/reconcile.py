"""``byok reconcile``: the ledger's cost beside the cost the provider reported, per key and day,
with the differences and the calls left to settle (``uncertain``, ``interrupted``, unpriced)."""

from __future__ import annotations

from decimal import Decimal

import click

from byok_plugin.billing.reconcile import reconcile
from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import echo_json
from byok_plugin.cli.keys import handles_errors
from byok_plugin.cli.tables import Column, TableSpec, console_for, show
from byok_plugin.cli.text import money
from byok_plugin.cli.usage import parse_when

__all__ = ["reconcile_command"]


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
    now = cli.clock()
    start = parse_when(since, "--since", end=False, now=now)
    stop = parse_when(until, "--until", end=True, now=now)
    rows = cli.app.ledger.rows(workspaces=workspaces, since=start, until=stop)
    try:
        lines = reconcile(rows, cli.app.billing, provider)
    except ValueError as exc:  # several currencies
        raise click.ClickException(str(exc)) from None
    differing = [line for line in lines if line.difference]
    if as_json:
        echo_json(
            {
                "lines": [line.to_dict() for line in lines],
                "differences": [line.to_dict() for line in differing],
            }
        )
        return
    console = console_for()
    if not lines:
        console.print("No calls recorded.")
        return
    show(
        console,
        TableSpec(
            columns=(
                Column("provider", "id"),
                Column("key", "id"),
                Column("day", "id"),
                Column("calls", "number", priority=3),
                Column("reported", "number", priority=4),
                Column("uncertain", "number", priority=2),
                Column("uncertain est.", "money", priority=8),
                Column("interrupted", "number", priority=5),
                Column("unpriced", "number", priority=6),
                Column("list cost", "money", priority=7),
                Column("reported cost", "money"),
                Column("table price", "money"),
                Column("difference", "money"),
            ),
            rows=tuple(
                (
                    line.provider,
                    line.key_id,
                    line.day,
                    str(line.calls),
                    str(line.reported_calls),
                    str(line.uncertain_calls),
                    money(line.uncertain_estimated_cost),
                    str(line.interrupted_calls),
                    str(line.unpriced_calls),
                    money(line.list_cost),
                    money(line.reported_cost),
                    money(line.table_cost),
                    money(line.difference),
                )
                for line in lines
            ),
            title="byok reconcile, amounts in USD",
        ),
    )
    if differing:
        console.print(f"{len(differing)} key-days where the provider's cost differs from the table")
    unsettled = sum(line.uncertain_calls for line in lines)
    if unsettled:
        console.print(
            f"{unsettled} uncertain calls: the provider may have run them; check its own usage "
            f"(estimated {money(sum((ln.uncertain_estimated_cost for ln in lines), Decimal(0)))} "
            f"at list price, not charged)"
        )
