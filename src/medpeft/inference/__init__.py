"""Use a finished run: evaluate, predict, explain, export; several task runs on one shared backbone, an
ensemble of runs, test-time augmentation, thresholds re-fitted on a target site's sample."""

from medpeft.inference.ensemble import Ensemble, load_ensemble
from medpeft.inference.evaluation import evaluate, zero_shot
from medpeft.inference.inputs import UnreadableInputWarning
from medpeft.inference.run import Run, load_run, load_runs, predict
from medpeft.inference.target import fit_thresholds, read_sample
from medpeft.inference.tta import IDENTITY, View, tta_views

__all__ = ["IDENTITY", "Ensemble", "Run", "UnreadableInputWarning", "View", "evaluate", "fit_thresholds",
           "load_ensemble", "load_run", "load_runs", "predict", "read_sample", "tta_views", "zero_shot"]
