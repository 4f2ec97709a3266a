"""The one rule every table of the CLI follows (``byok usage``, ``keys list``, ``run``,
``budget list``, ``reconcile``, ``demo``, ``plugins``), so that a table fits the terminal it is
shown on.

- A cell a user needs whole (money, ids, models, numbers: a :class:`Column` whose ``kind`` is
  not ``"text"``) is never cut, wrapped or folded.
- On a terminal narrower than the whole table, columns are dropped by priority (the highest
  ``priority`` number first; ``0`` is never dropped) and ``"text"`` columns wrap between words;
  a line under the table names what was left out. If even the columns that are never dropped do
  not fit, each row is printed as ``header: value`` lines instead of a table.
- When the output is not a terminal (piped, redirected), every column is printed at its natural
  width: no colour, no line break inside a value, no padding at the end of a line, whatever
  ``COLUMNS`` says. ``--json`` is the
  machine format; this is for people and ``grep``.

Titles are printed as a line of their own above the table (a table's width never wraps them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich import box
from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from byok_plugin.cli.text import plain

__all__ = ["Column", "TableSpec", "console_for", "show"]

#: the least width a wrapping ("text") column is given before columns are dropped instead
TEXT_MIN = 16

Kind = Literal["text", "id", "model", "money", "number"]


@dataclass(frozen=True)
class Column:
    header: str
    #: "text" may wrap between words; any other kind is shown whole or not at all
    kind: Kind = "text"
    #: 0: always shown; on a narrow terminal the highest numbers are dropped first
    priority: int = 0

    @property
    def whole(self) -> bool:
        return self.kind != "text"


@dataclass(frozen=True)
class TableSpec:
    """A table before it meets a console: its columns and rows of cells (``str`` cells are shown
    as they are, through :func:`~byok_plugin.cli.text.plain`; :class:`~rich.text.Text` cells keep
    their style). ``footer`` rows (totals) follow a rule and are bold."""

    columns: tuple[Column, ...]
    rows: tuple[tuple[str | Text, ...], ...]
    title: str | None = None
    footer: tuple[tuple[str | Text, ...], ...] = ()

    def __post_init__(self) -> None:
        for row in (*self.rows, *self.footer):
            if len(row) != len(self.columns):
                raise ValueError(f"a row of {len(row)} cells for {len(self.columns)} columns")

    def _widest(self, index: int) -> int:
        """The width the column at ``index`` needs to show every cell whole (the header may
        wrap between its words)."""
        words = self.columns[index].header.split() or [""]
        cells = [row[index] for row in (*self.rows, *self.footer)]
        return max(*(cell_len(w) for w in words), *(_cell_width(c) for c in cells), 1)

    def _narrowest(self, index: int) -> int:
        """A wrapping column's least width: its longest word, and no fewer than
        :data:`TEXT_MIN` characters unless all of it is narrower (a text squeezed to a word per
        line is worse than a column dropped)."""
        cells = [_cell_text(row[index]) for row in (*self.rows, *self.footer)]
        natural = max((cell_len(c) for c in cells), default=1)
        longest = max((cell_len(w) for c in cells for w in c.split()), default=1)
        return max(longest, min(natural, TEXT_MIN))

    def table(self, keep: Sequence[int] | None = None) -> Table:
        """A Rich table of the columns at the indexes ``keep`` (default: all)."""
        indexes = list(range(len(self.columns))) if keep is None else list(keep)
        # two spaces between columns: one of padding, then the box's blank divider
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
        for i in indexes:
            column = self.columns[i]
            right = column.kind in ("money", "number")
            table.add_column(
                column.header,
                justify="right" if right else "left",
                no_wrap=column.whole,
                overflow="fold",  # never an ellipsis: if all else fails a value folds, whole
                # Rich measures a no_wrap column by its longest word: say it needs its widest cell
                min_width=self._widest(i) if column.whole else self._narrowest(i),
            )
        for row in self.rows:
            table.add_row(*(_cell(row[i]) for i in indexes))
        if self.footer:
            table.add_section()
            for row in self.footer:
                table.add_row(*(_cell(row[i]) for i in indexes), style="bold")
        return table


def console_for(*, stderr: bool = False) -> Console:
    """A console for the CLI's output: when the stream is not a terminal, plain (no colour) and
    never wrapped, so no line break lands inside a value."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, soft_wrap=True, color_system=None, emoji=False)
    return console


def _cell_text(value: str | Text) -> str:
    return value.plain if isinstance(value, Text) else value


def _cell_width(value: str | Text) -> int:
    return cell_len(_cell_text(value))


def _cell(value: str | Text) -> RenderableType:
    return value if isinstance(value, Text) else plain(value)


def _measure(console: Console, table: Table) -> Measurement:
    # unclamped: Measurement.get never says more than the width it is given
    return Measurement.get(console, console.options.update_width(100_000), table)


def _min_width(console: Console, table: Table) -> int:
    return _measure(console, table).minimum


def _natural_width(console: Console, table: Table) -> int:
    return _measure(console, table).maximum


def fitting_columns(spec: TableSpec, console: Console, width: int) -> list[int] | None:
    """The indexes of the columns to show in ``width`` characters, dropping by priority; ``None``
    when even the columns of priority 0 do not fit."""
    keep = list(range(len(spec.columns)))
    droppable = sorted(
        (i for i, c in enumerate(spec.columns) if c.priority > 0),
        key=lambda i: (-spec.columns[i].priority, -i),
    )
    while _min_width(console, spec.table(keep)) > width:
        if not droppable:
            return None
        keep.remove(droppable.pop(0))
    return keep


def show(console: Console, spec: TableSpec) -> None:
    """Print ``spec`` on ``console`` by the module's rule."""
    if spec.title:
        console.print(plain(spec.title, style="bold"), soft_wrap=True)
    if not console.is_terminal:
        table = spec.table()
        piped = Console(
            width=max(_natural_width(console, table), 20),
            color_system=None,
            highlight=False,
            emoji=False,
        )
        with piped.capture() as captured:
            piped.print(table)
        # no padding after the last value of a line
        console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
        return
    keep = fitting_columns(spec, console, console.width)
    if keep is None:
        _print_records(console, spec)
        return
    console.print(spec.table(keep))
    dropped = [c.header for i, c in enumerate(spec.columns) if i not in keep]
    if dropped:
        console.print(
            plain(
                f"not shown at this width: {', '.join(dropped)} (a wider terminal, a pipe or "
                "--json shows them)",
                style="dim",
            ),
            soft_wrap=True,
        )


def _print_records(console: Console, spec: TableSpec) -> None:
    """Each row as ``header: value`` lines: for a terminal too narrow for any table."""
    width = max(len(c.header) for c in spec.columns)
    rows = [(row, "dim") for row in spec.rows] + [(row, "bold") for row in spec.footer]
    for n, (row, style) in enumerate(rows):
        if n:
            console.print()
        for column, value in zip(spec.columns, row, strict=True):
            line = Text(f"{column.header:>{width}}: ", style=style)
            line.append_text(value if isinstance(value, Text) else plain(value))
            console.print(line, soft_wrap=True)
