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


def _launch(devices: int, args: list[str]) -> None:
    """Run `medpeft ARGS` in `devices` local processes through torch's elastic launcher (torchrun)."""
    import os

    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from medpeft.errors import ConfigError, TrainingError

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--devices starts the processes itself; under a launcher (torchrun, accelerate "
                          "launch) leave it out")
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise ConfigError(f"--devices {devices}: this machine has {torch.cuda.device_count()} GPUs")
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={devices}", "-m", "medpeft", *args]))
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        raise TrainingError(f"process {rank} of {devices} failed (exit code {failure.exitcode}); "
                            f"its error is printed above") from None
