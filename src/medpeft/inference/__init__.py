"""Use a finished run: evaluate, predict, explain, export; several task runs on one shared backbone."""

from medpeft.inference.inputs import UnreadableInputWarning
from medpeft.inference.run import Run, evaluate, load_run, load_runs, predict, zero_shot

__all__ = ["Run", "UnreadableInputWarning", "evaluate", "load_run", "load_runs", "predict", "zero_shot"]
