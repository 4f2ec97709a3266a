"""``byok usage``: what the ledger says was used and charged, by workspace, provider, model,
credential source and day, over a date range; with the BYOK share of calls and what BYOK saved
each workspace at list price. A table, ``--json`` or ``--csv``.
"""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import click
from byok_hookspecs import USAGE_COUNTS
from rich.console import Console
from rich.table import Table

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.keys import handles_errors
from byok_plugin.cli.text import plain
from byok_plugin.usage_report import GROUP_KEYS, Totals, UsageReport, build_report

__all__ = ["csv_cell", "parse_when", "usage_command"]

_COLUMNS = (
    "calls",
    "byok_calls",
    "byok_share",
    *USAGE_COUNTS,
    "list_cost",
    "charged",
    "byok_saved",
)


def parse_when(value: str | None, option: str, *, end: bool) -> datetime | None:
    """A date (``2026-11-27``) or an ISO 8601 time; naive times are UTC. A date given to
    ``--until`` includes that whole day."""
    if value is None:
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime.combine(day, time.min, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date (YYYY-MM-DD) or an ISO 8601 time", param_hint=option
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _money(amount: Decimal) -> str:
    if amount == 0:
        return "0"
    return f"{amount.normalize():f}"


def _cells(totals: Totals) -> list[str]:
    return [
        str(totals.calls),
        str(totals.byok_calls),
        f"{totals.byok_share * 100:.1f}%",
        f"{totals.input_tokens:,}",
        f"{totals.cached_input_tokens:,}",
        f"{totals.cache_write_tokens:,}",
        f"{totals.output_tokens:,}",
        f"{totals.reasoning_tokens:,}",
        f"{totals.tool_requests:,}",
        _money(totals.list_cost),
        _money(totals.charged),
        _money(totals.byok_saved),
    ]


_HEADERS = (
    "calls",
    "BYOK calls",
    "BYOK share",
    "input",
    "cached in",
    "cache write",
    "output",
    "reasoning",
    "tool req.",
    "list cost",
    "charged",
    "BYOK saved",
)


def _range(report: UsageReport) -> str:
    since = report.since.isoformat() if report.since else "the beginning"
    until = report.until.isoformat() if report.until else "now"
    return f"from {since} until {until} (exclusive)"


def _print_table(report: UsageReport) -> None:
    console = Console()
    if not report.totals.calls:
        console.print(plain(f"No usage recorded {_range(report)}."))
        return
    rows = Table(title=plain(f"byok usage {_range(report)}, amounts in {report.currency}"))
    for name in report.group_by:
        rows.add_column(name)
    for header in _HEADERS:
        rows.add_column(header, justify="right")
    for key, totals in report.rows:
        rows.add_row(*map(plain, key), *_cells(totals))
    console.print(rows)
    summary = Table(title="by workspace: what BYOK saved at list price")
    summary.add_column("workspace")
    for header in _HEADERS:
        summary.add_column(header, justify="right")
    for workspace, totals in report.workspaces:
        summary.add_row(plain(workspace), *_cells(totals))
    summary.add_row("total", *_cells(report.totals), style="bold")
    console.print(summary)
    t = report.totals
    console.print(
        plain(
            f"{t.calls} calls, {t.byok_share * 100:.1f}% on the workspaces' own keys "
            f"({t.byok_calls} BYOK, {t.platform_calls} platform of which {t.fallback_calls} "
            f"fallbacks, {t.block_calls} block keys); charged {_money(t.charged)} "
            f"{report.currency}; BYOK saved {_money(t.byok_saved)} {report.currency} at list price"
            + (f"; {t.unpriced_calls} calls had no price" if t.unpriced_calls else "")
        )
    )


#: what a spreadsheet reads as the start of a formula (OWASP "CSV injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: one starting like a formula gets a leading
    ``'``, as OWASP advises. Only for text (ids, models); numbers are written as they are."""
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def _print_csv(report: UsageReport) -> None:
    # RFC 4180 line ends: the csv module then quotes a cell holding a CR, which it writes bare
    # with "\n" line ends (a spreadsheet would split the row there)
    writer = csv.writer(sys.stdout, lineterminator="\r\n")
    writer.writerow([*report.group_by, *_COLUMNS, "currency"])
    for key, totals in report.rows:
        data = totals.to_dict()
        writer.writerow(
            [*map(csv_cell, key), *(data[name] for name in _COLUMNS), csv_cell(report.currency)]
        )


@click.command("usage")
@click.option(
    "--workspace",
    "-w",
    "workspaces",
    multiple=True,
    help="Only this workspace (repeat for several). Default: all.",
)
@click.option("--since", metavar="DATE", help="From this date or time (UTC), inclusive.")
@click.option("--until", metavar="DATE", help="Until this date (inclusive) or time (exclusive).")
@click.option(
    "--by",
    "group_by",
    default=",".join(GROUP_KEYS),
    show_default=True,
    help=f"Group rows by these, comma-separated: {', '.join(GROUP_KEYS)}.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (amounts as decimal strings).")
@click.option("--csv", "as_csv", is_flag=True, help="Print the grouped rows as CSV.")
@pass_cli
@handles_errors
def usage_command(
    cli: CliContext,
    workspaces: tuple[str, ...],
    since: str | None,
    until: str | None,
    group_by: str,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Usage and charges from the ledger, with the BYOK share and what BYOK saved.

    \b
    byok usage --since 2026-11-01 --until 2026-11-30
    byok usage -w acme --by workspace,provider --json
    """
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    start = parse_when(since, "--since", end=False)
    stop = parse_when(until, "--until", end=True)
    if start is not None and stop is not None and stop <= start:
        raise click.BadParameter("must be after --since", param_hint="--until")
    groups = tuple(part.strip() for part in group_by.split(",") if part.strip())
    unknown = [g for g in groups if g not in GROUP_KEYS]
    if unknown or not groups:
        raise click.BadParameter(
            f"{', '.join(unknown) or 'nothing'} is not a grouping: choose from "
            f"{', '.join(GROUP_KEYS)}",
            param_hint="--by",
        )
    rows = cli.app.ledger.rows(workspaces=workspaces, since=start, until=stop)
    try:
        report = build_report(rows, group_by=groups, since=start, until=stop)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif as_csv:
        _print_csv(report)
    else:
        _print_table(report)
