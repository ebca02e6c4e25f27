"""The command line's Typer app and what its command modules share: the console and the one-line exit."""

from __future__ import annotations

import sys
from typing import Optional

import typer
import typer.core
from rich.console import Console

# Typer's help labels a flag, --help included, with a value type ("--tta <bool>"); a flag takes no value.
_value_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _value_type(self, ctx)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Parameter-efficient fine-tuning of medical vision foundation models.")
console = Console()


def _on_missing(value: Optional[str]) -> list[str]:
    return [f"data.on_missing={value}"] if value else []


def _exit(code: int, message: str, prefix: str = "[red]error:[/red] ") -> None:
    """One line on stderr, then exit with `code`."""
    from rich.markup import escape

    Console(stderr=True).print(prefix + escape(message), highlight=False, soft_wrap=True)
    sys.exit(code)
