"""Several runs of one task on one backbone as one predictor: the mean of their calibrated probabilities.

Seeds of one recipe, or different PEFT methods, fine-tuned from one backbone checkpoint are loaded
together (medpeft.load_runs: the backbone once, each run's adapter and head). Each run's logits are
divided by its own temperatures (calibration.json) before the probabilities are averaged, so runs whose
logits sit on different scales weigh alike. The ensemble's thresholds are chosen by the same rule as a
run's (youden or sensitivity:X) on the ensemble's probabilities of the runs' common validation split
(their predictions.csv): the runs must share their val and test images, as the runs of a study do."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from scipy.special import logit
from torch.nn import functional as F

from medpeft.engine import rundir
from medpeft.errors import ConfigError
from medpeft.inference.run import Run, decisions, load_runs, predict
from medpeft.metrics.thresholds import YOUDEN, select_thresholds


@dataclass
class Ensemble:
    """Runs of one task on one backbone whose calibrated probabilities are averaged (`combine`)."""

    runs: list[Run]
    rule: str
    """'youden', 'sensitivity:X' or 'argmax' (multiclass)."""
    thresholds: dict | None
    """{label: threshold on the mean probabilities, None where val had one class}; None for arg-max."""
    name: str = "ensemble"
    """The column group of its predictions ('ensemble/prob:LABEL')."""

    @property
    def members(self) -> list[Run]:
        return self.runs

    @property
    def labels(self) -> list[str]:
        return self.runs[0].labels

    @property
    def task(self) -> str:
        return self.runs[0].config.data.task

    def mean_logits(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """(..., K) float64 logits whose sigmoid (softmax for a multiclass task) is the mean of the runs'
        calibrated probabilities, from each run's (..., K) logits in order: log(mean p) - log(mean (1 - p))
        per label, log(mean p) over the classes; computed in log space, so saturated probabilities stay finite."""
        scaled = torch.stack([run.scaled(z.double()) for run, z in zip(self.runs, logits)])
        if self.task == "multiclass":
            return torch.logsumexp(scaled.log_softmax(-1), 0) - math.log(len(self.runs))
        return torch.logsumexp(F.logsigmoid(scaled), 0) - torch.logsumexp(F.logsigmoid(-scaled), 0)

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """(..., K) mean of the runs' calibrated probabilities, from each run's logits in order."""
        z = self.mean_logits(logits)
        return z.softmax(-1) if self.task == "multiclass" else z.sigmoid()

    def decide(self, probs: np.ndarray) -> pd.DataFrame:
        """Decision columns for (N, K) mean probabilities, as `Run.decide`."""
        return decisions(self.labels, self.thresholds, probs)

    def predict(self, images, batch_size: int | None = None, strict: bool = False, workers: int = 0,
                progress: bool = False, tta=False) -> pd.DataFrame:
        """One row per image: input, error, ensemble/prob:<label>..., ensemble/pred:<label>... (or pred)."""
        return predict([self], images, batch_size=batch_size, strict=strict, workers=workers, progress=progress,
                       tta=tta)


def load_ensemble(paths, threshold: str = YOUDEN) -> Ensemble:
    """An Ensemble of finished runs fine-tuned from one backbone checkpoint (loaded as medpeft.load_runs does),
    of one task (the same labels) and one split (the same val and test images; else ConfigError naming the
    run), its thresholds chosen by `threshold` on the ensemble's probabilities of the val split."""
    runs = load_runs(paths, threshold)
    first = runs[0]
    for run in runs[1:]:
        task = run.config.data.task
        if (run.labels, task) != (first.labels, first.config.data.task):
            raise ConfigError(f"{run.path}: predicts {run.labels} ({task}), {first.path} {first.labels} "
                              f"({first.config.data.task}); an ensemble averages runs of one task")
    val = [rundir.read_predictions(run.path, "val", run.labels) for run in runs]
    images = [(ids, rundir.read_predictions(run.path, "test", run.labels)[0]) for run, (ids, _, _) in zip(runs, val)]
    for run, (val_ids, test_ids) in zip(runs[1:], images[1:]):
        if not (np.array_equal(val_ids, images[0][0]) and np.array_equal(test_ids, images[0][1])):
            raise ConfigError(f"{run.path}: its val or test images differ from {first.path}'s; an ensemble's "
                              f"thresholds are chosen on its runs' common val split (the runs of a study share it)")
    ensemble = Ensemble(runs, "argmax", None)
    if first.thresholds is None:
        return ensemble
    with np.errstate(divide="ignore"):  # predictions.csv holds raw probabilities: their logits, +-inf at 0 and 1
        probs = ensemble.combine([torch.from_numpy(logit(p)) for _, _, p in val]).numpy()
    return replace(ensemble, rule=threshold, thresholds=select_thresholds(val[0][1], probs, first.labels, threshold))
