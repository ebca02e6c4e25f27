"""What medpeft shows: one kind of progress bar (rich), off where output is no terminal, and listings."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def progress_bar(console: Console | None = None, *fields: str) -> Progress:
    """A progress bar on `console` (standard error by default) showing `fields`, rich format strings of
    the task's fields (e.g. ``"loss {task.fields[loss]:.4f}"``); disabled when the console is no terminal."""
    console = console or Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *(TextColumn(text) for text in fields), TimeElapsedColumn(), console=console,
                    disable=not console.is_terminal)


def print_listing(rows: list[dict], what: str, as_json: bool, columns: dict) -> None:
    """`rows` as JSON, or as a table whose columns show a row's field (a key) or what a function makes of it."""
    import json

    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} {what}")
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column in ("name", "px"))
    for row in rows:
        table.add_row(*(str(row[show]) if isinstance(show, str) else show(row) for show in columns.values()))
    Console().print(table)
