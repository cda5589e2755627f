"""The command line's rich console: progress bars, default-output notes and summary tables.

Only the command layer (``uadct/cli.py`` and ``uadct/commands/``) draws with rich; the library
reports through callbacks and return values. Commands print through :data:`out` (results,
stdout) and :data:`console` (progress, notes and errors, stderr, so ``--json`` stays clean).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

console = Console(stderr=True)
out = Console()


def progress() -> Progress:
    """The progress bar of a batch command (drawn only on a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def announce(output: Path) -> Path:
    """Say where a default output goes before any work starts (stderr, so --json output stays clean)."""
    console.print(f"output: {output}", highlight=False, soft_wrap=True)
    return output


def id_column() -> Column:
    """The subject column of summary tables: never cut or wrapped (the other columns shrink instead)."""
    return Column("subject", no_wrap=True)


def print_table(table: Table) -> None:
    """Print a summary table without cutting a cell, at any console width (80 in logs).

    As it is when it fits; else with columns sized so that no word is cut (headers and texts
    wrap between words), boxed or, if only that fits, borderless; else one line per row
    (``header: value`` pairs, long lines left whole for the terminal or the log to wrap).
    """
    cells = [[str(cell) for cell in column.cells] for column in table.columns]
    texts = [[str(column.header), *column_cells] for column, column_cells in zip(table.columns, cells)]
    natural = [max(len(text) for text in column_texts) for column_texts in texts]
    needed = [natural[i] if column.no_wrap else max(len(word) for text in texts[i] for word in text.split() or [""]) or 1
              for i, column in enumerate(table.columns)]
    count = len(table.columns)
    if sum(natural) + 3 * count + 1 <= out.width:
        out.print(table)
        return
    for extra, compact in ((3 * count + 1, False), (2 * (count - 1), True)):
        if sum(needed) + extra <= out.width:
            widths = list(needed)
            for _ in range(out.width - extra - sum(widths)):  # spare room to the columns that wrap most
                deficit, index = max((natural[i] - widths[i], i) for i in range(count))
                if deficit <= 0:
                    break
                widths[index] += 1
            for column, width in zip(table.columns, widths):
                column.width = width
            if compact:
                table.box, table.show_edge, table.pad_edge, table.collapse_padding = box.SIMPLE_HEAD, False, False, True
            out.print(table)
            return
    if table.title:
        out.print(str(table.title), highlight=False)
    headers = [" ".join(str(column.header).split()) for column in table.columns]
    for row in zip(*cells):
        out.print("  ".join(f"{name}: {value}" for name, value in zip(headers, row) if value), highlight=False, soft_wrap=True)


def fmt(value: Any) -> str:
    """A number with three decimals, "n/a" for NaN, "-" for None, anything else as text."""
    if value is None:
        return "-"
    try:
        number = float(value)
        return "n/a" if number != number else f"{number:.3f}"
    except (TypeError, ValueError):
        return str(value)

