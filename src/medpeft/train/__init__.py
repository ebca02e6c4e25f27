"""The training recipe and the run directory it writes."""

from medpeft.train.recipe import evaluate, load_run, train

__all__ = ["evaluate", "load_run", "train"]
