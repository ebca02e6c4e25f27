"""Run one study cell as an ordinary training run, in its own process:

    python -m medpeft.study.cell CONFIG.yaml THREADS

Trains (or resumes) the run the config describes, then prints one JSON line with its peak memory
(the GPU's peak allocation when it trained on a GPU, else the process's maximum resident set). A medpeft error is one line on stderr and exit 2, like the CLI.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from medpeft.config import load_config
from medpeft.errors import MedpeftError
from medpeft.train import train


def main(config_path: str, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        train(load_config(config_path), quiet=True)
    except MedpeftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if torch.cuda.is_initialized():  # the GPU's peak when training ran there, else the process's
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"peak_memory_mb": round(peak, 1)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
