"""The training recipe and the run directory it writes."""

from medpeft.train.recipe import evaluate, train

__all__ = ["evaluate", "train"]
