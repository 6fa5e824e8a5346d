"""What the tools print: sizes, the counters of ``vm.stats()``, progress."""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def human(n: float) -> str:
    """*n* bytes as people read them: "512 B", "1.5 MiB"."""
    if n < 1024:
        return f"{n:.0f} B"
    exp = min(3, (int(n).bit_length() - 1) // 10)  # 1 KiB, 2 MiB, 3 GiB and over
    return f"{n / (1 << 10 * exp):.1f} {('KiB', 'MiB', 'GiB')[exp - 1]}"


def field_docs(cls: type) -> dict[str, str]:
    """The meaning of each field of the dataclass *cls*, from its
    ``Annotated[int, "meaning"]`` annotation ("" where there is none)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: next((m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, str)), "")
            for f in dataclasses.fields(cls)}


def stats_table(stats: Any, title: str = "vm.stats()") -> Table:
    """A table of a statistics dataclass (``vm.stats()``): each field, its
    value and its meaning."""
    table = Table(title=title, title_justify="left")
    table.add_column("counter")
    table.add_column("value", justify="right")
    table.add_column("meaning", style="dim")
    for name, doc in field_docs(type(stats)).items():
        table.add_row(name, f"{getattr(stats, name):,}", doc)
    return table


def progress(*, total: bool = True) -> Progress:
    """A progress display on stderr (stdout carries the results), shown only
    when stderr is a terminal, so that piped or captured runs print no bars.
    *total*: the tasks have a known length (a bar and N of M), else a
    pulsing bar and the time so far."""
    columns = [TextColumn("[bold cyan]{task.description}[/]"), BarColumn(),
               *([MofNCompleteColumn()] if total else []), TimeElapsedColumn()]
    return Progress(*columns, console=Console(stderr=True, highlight=False), transient=True,
                    disable=not sys.stderr.isatty())
