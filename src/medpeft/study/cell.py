"""Run one study cell as an ordinary training run, in its own process:

    python -m medpeft.study.cell CONFIG.yaml THREADS RESULT.json [generate]

Trains (or resumes) the run the config describes (with ``generate``: a ``medpeft generate train``
config), then writes its peak memory to RESULT.json, ``{"peak_memory_mb": ...}`` (the GPU's peak
allocation when it trained on a GPU, else the process's maximum resident set). A medpeft error is one
line on stderr and exit 2, like the CLI.
"""

from __future__ import annotations

import resource
import sys

import torch

from medpeft.config import load_config
from medpeft.errors import MedpeftError
from medpeft.files import write_json_atomic
from medpeft.train import train


def main(config_path: str, threads: int, result_path: str, generate: bool = False) -> None:
    torch.set_num_threads(threads)
    try:
        if generate:
            from medpeft.generate.config import load_generate_config
            from medpeft.generate.train import generate_train

            generate_train(load_generate_config(config_path), quiet=True)
        else:
            train(load_config(config_path), quiet=True)
    except MedpeftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if torch.cuda.is_initialized():  # the GPU's peak when training ran there, else the process's
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    write_json_atomic(result_path, {"peak_memory_mb": round(peak, 1)})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:] == ["generate"])
