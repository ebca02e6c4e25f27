"""What medpeft shows while it works: one kind of progress bar (rich), off where output is no terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(console: Console | None = None, *fields: str) -> Progress:
    """A progress bar on `console` (standard error by default) showing `fields`, rich format strings of
    the task's fields (e.g. ``"loss {task.fields[loss]:.4f}"``); disabled when the console is no terminal."""
    console = console or Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *(TextColumn(text) for text in fields), TimeElapsedColumn(), console=console,
                    disable=not console.is_terminal)
