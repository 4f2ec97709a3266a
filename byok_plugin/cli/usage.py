"""``byok usage``: what the ledger says was used and charged, by workspace, provider, model,
credential source and day (or workflow, block and stored key), over a date range; with the BYOK share of calls and what BYOK saved
each workspace at list price. A table, ``--json`` or ``--csv``.
"""

from __future__ import annotations

import csv
import re
import sys
from datetime import UTC, date, datetime, time, timedelta

import click

from byok_plugin.billing.usage_report import (
    DEFAULT_GROUPS,
    GROUP_KEYS,
    Totals,
    UsageReport,
    build_report,
)
from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import echo_json
from byok_plugin.cli.keys import handles_errors
from byok_plugin.cli.tables import Column, TableSpec, console_for, show
from byok_plugin.cli.text import money, plain, printable

__all__ = ["csv_cell", "parse_when", "usage_command"]

#: the relative dates --since and --until take besides dates and times (UTC)
RELATIVE = ("today", "yesterday", "this-month", "last-month", "Nd (N days before now)")
_DAYS_AGO = re.compile(r"(\d{1,5})d")


def _month_start(day: date, months_back: int = 0) -> datetime:
    month = day.month - 1 - months_back
    return datetime(day.year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def _relative(text: str, *, end: bool, now: datetime) -> datetime | None:
    today = datetime.combine(now.date(), time.min, tzinfo=UTC)
    day = timedelta(days=1)
    spans = {
        "today": (today, today + day),
        "yesterday": (today - day, today),
        "this-month": (_month_start(now.date()), _month_start(now.date(), -1)),
        "last-month": (_month_start(now.date(), 1), _month_start(now.date())),
    }
    if text in spans:
        start, stop = spans[text]
        return stop if end else start
    match = _DAYS_AGO.fullmatch(text)
    if match:
        return now - timedelta(days=int(match.group(1)))
    return None


def parse_when(
    value: str | None, option: str, *, end: bool, now: datetime | None = None
) -> datetime | None:
    """A date (``2026-11-27``), an ISO 8601 time (naive times are UTC) or a relative date:
    ``today``, ``yesterday``, ``this-month``, ``last-month`` (whole UTC days and months: given to
    ``--until`` they include that day or month) or ``7d`` (7 days before ``now``). A date given
    to ``--until`` includes that whole day."""
    if value is None:
        return None
    try:
        return _when(value.strip(), end=end, now=now or datetime.now(UTC))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date (YYYY-MM-DD), an ISO 8601 time or one of "
            f"{', '.join(RELATIVE)}",
            param_hint=option,
        ) from None
    except OverflowError:  # 9999-12-31 as an end, 0001-01-01 east of UTC, 9999999d
        raise click.BadParameter(
            f"{value!r} is beyond the dates this command can count with (years 1 to 9999, UTC)",
            param_hint=option,
        ) from None


def _when(text: str, *, end: bool, now: datetime) -> datetime:
    moment = _relative(text.lower(), end=end, now=now)
    if moment is not None:
        return moment
    if len(text) == 10:
        day = date.fromisoformat(text)
        start = datetime.combine(day, time.min, tzinfo=UTC)
        return start + timedelta(days=1) if end else start
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


#: the table's columns after the groups: (header, JSON field, kind, priority; 0 always shown)
_NUMBERS = (
    ("calls", "calls", "number", 0),
    ("BYOK calls", "byok_calls", "number", 8),
    ("BYOK share", "byok_share", "number", 5),
    ("input", "input_tokens", "number", 4),
    ("cached in", "cached_input_tokens", "number", 11),
    ("cache write", "cache_write_tokens", "number", 10),
    ("output", "output_tokens", "number", 4),
    ("reasoning", "reasoning_tokens", "number", 9),
    ("tool req.", "tool_requests", "number", 7),
    ("list cost", "list_cost", "money", 3),
    ("charged", "charged", "money", 0),
    ("BYOK saved", "byok_saved", "money", 2),
    ("uncertain", "uncertain_calls", "number", 12),
    ("uncertain est.", "uncertain_estimated_cost", "money", 13),
)
#: the groups' columns: kind and priority (the credential source may go on a narrow terminal)
_GROUPS = {
    "day": ("id", 0),
    "workspace": ("id", 0),
    "provider": ("id", 6),
    "model": ("model", 0),
    "source": ("id", 1),
    "workflow": ("id", 0),
    "block": ("id", 0),
    "key": ("id", 0),
}


def _cells(totals: Totals, currency: str) -> tuple[str, ...]:
    cells: list[str] = []
    for _header, name, kind, _priority in _NUMBERS:
        value = getattr(totals, name)
        if kind == "money":
            cells.append(money(value, currency))
        elif name == "byok_share":
            cells.append(f"{value * 100:.1f}%")
        else:
            cells.append(f"{value:,}")
    return tuple(cells)


def _number_columns() -> tuple[Column, ...]:
    return tuple(
        Column(header, kind, priority)  # type: ignore[arg-type]
        for header, _name, kind, priority in _NUMBERS
    )


def _range(report: UsageReport) -> str:
    since = report.since.isoformat() if report.since else "the beginning"
    until = report.until.isoformat() if report.until else "now"
    return f"from {since} until {until} (exclusive)"


def _print_table(report: UsageReport) -> None:
    console = console_for()
    if not report.totals.calls:
        console.print(plain(f"No usage recorded {_range(report)}."))
        return
    groups = tuple(
        Column(name, _GROUPS[name][0], _GROUPS[name][1])  # type: ignore[arg-type]
        for name in report.group_by
    )
    show(
        console,
        TableSpec(
            columns=groups + _number_columns(),
            rows=tuple(
                tuple(value or "-" for value in key) + _cells(totals, report.currency)
                for key, totals in report.rows
            ),
            title=f"byok usage {_range(report)}",
        ),
    )
    console.print()
    show(
        console,
        TableSpec(
            columns=(Column("workspace", "id"), *_number_columns()),
            rows=tuple(
                (workspace, *_cells(totals, report.currency))
                for workspace, totals in report.workspaces
            ),
            footer=(("total", *_cells(report.totals, report.currency)),),
            title="by workspace: what BYOK saved at list price",
        ),
    )
    t = report.totals
    console.print(
        plain(
            f"{t.calls} calls, {t.byok_share * 100:.1f}% on the workspaces' own keys "
            f"({t.byok_calls} BYOK, {t.platform_calls} platform of which {t.fallback_calls} "
            f"fallbacks, {t.block_calls} block keys); charged {money(t.charged, report.currency)}; "
            f"BYOK saved {money(t.byok_saved, report.currency)} at list price"
            + (f"; {t.unpriced_calls} calls had no price" if t.unpriced_calls else "")
            + (
                f"; {t.estimated_calls} calls charged on an estimated input (streams cut "
                "before the provider reported it)"
                if t.estimated_calls
                else ""
            )
            + (
                f"; {t.uncertain_calls} uncertain calls (sent, never answered, not charged): "
                f"estimated {money(t.uncertain_estimated_cost, report.currency)} at list price"
                if t.uncertain_calls
                else ""
            )
        ),
        soft_wrap=True,
    )


#: what a spreadsheet reads as the start of a formula (OWASP "CSV injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: one starting like a formula gets a leading
    ``'``, as OWASP advises. Only for text (ids, models); numbers are written as they are.
    The CSV goes to a terminal as often as to a file: a character a terminal would act on (ESC,
    CR, a bidi override; not a tab or a line break, which a quoted cell holds) is written
    ``\\u001b`` (:func:`~byok_plugin.cli.text.printable`)."""
    return printable(f"'{text}" if text.startswith(_FORMULA_START) else text, lines=True)


def _print_csv(report: UsageReport) -> None:
    # RFC 4180 line ends: the csv module then quotes a cell holding a CR, which it writes bare
    # with "\n" line ends (a spreadsheet would split the row there)
    writer = csv.writer(sys.stdout, lineterminator="\r\n")
    fields = list(Totals().to_dict())  # every field a JSON row has, in the same order
    writer.writerow([*report.group_by, *fields, "currency"])
    for key, totals in report.rows:
        data = totals.to_dict()
        groups = report.group_values(key)
        writer.writerow(
            [
                *(csv_cell(groups[name] or "") for name in report.group_by),
                *(data[name] for name in fields),
                csv_cell(report.currency),
            ]
        )


@click.command("usage")
@click.option(
    "--workspace",
    "-w",
    "workspaces",
    multiple=True,
    help="Only this workspace (repeat for several). Default: all.",
)
@click.option(
    "--since",
    metavar="WHEN",
    help="From this date or time (UTC), inclusive; or today, yesterday, this-month, last-month, "
    "7d (7 days before now).",
)
@click.option(
    "--until",
    metavar="WHEN",
    help="Until this date (inclusive), time (exclusive) or relative date (as --since).",
)
@click.option(
    "--by",
    "group_by",
    default=",".join(DEFAULT_GROUPS),
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
    byok usage --since this-month --by workflow,block,key
    byok usage -w acme --since 7d --by workspace,provider --json
    """
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    now = cli.clock()
    start = parse_when(since, "--since", end=False, now=now)
    stop = parse_when(until, "--until", end=True, now=now)
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
        echo_json(report.to_dict())
    elif as_csv:
        _print_csv(report)
    else:
        _print_table(report)
