"""Use a finished run: predict, explain, export; several task runs on one shared backbone."""

from medpeft.inference.run import Run, load_run, load_runs, predict

__all__ = ["Run", "load_run", "load_runs", "predict"]
