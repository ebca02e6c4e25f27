"""Started by tests/test_distributed.py under torchrun: every process trains the runs of a JSON list of
configs in turn, in one process group; ``--crash-in-epoch K`` interrupts each run in its K-th epoch
(before its validation), as a killed job would be."""

import argparse
import json

import torch.distributed as dist

from medpeft.config import config_from_dict
from medpeft.train import recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs")
    parser.add_argument("--crash-in-epoch", type=int)
    args = parser.parse_args()
    if args.crash_in_epoch:
        evaluate, calls = recipe.evaluate_split, []

        def crash(*a, **k):
            calls.append(1)
            if len(calls) == args.crash_in_epoch:
                raise SystemExit(3)
            return evaluate(*a, **k)

        recipe.evaluate_split = crash
    dist.init_process_group("gloo")  # one group for all the runs: train() joins it and leaves it open
    for config in json.load(open(args.configs)):
        recipe.train(config_from_dict(config), quiet=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
