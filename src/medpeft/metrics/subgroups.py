"""AUROC per subgroup (sex, age band, view, ...): per group, the worst group and the largest gap.

For each subgroup column the images sharing a value form a group; '' = unknown (left out, counted).
A group's AUROC per label is over its known rows, its mean AUROC over the labels with both classes
in it (as `classification_metrics`), and its interval the stratified percentile bootstrap of that
mean over the group's own images (`resampled_mean_aurocs`, `percentile_interval`). A group is small
when a label with both classes in the whole set has fewer than `min_count` known positives or
negatives in it, or when its mean AUROC is undefined: it is reported and flagged, and left out of
the worst group, the best group and the gap (best - worst mean AUROC). Invalid input raises ValueError.
"""

from __future__ import annotations

import numpy as np

from medpeft.metrics.classification import mann_whitney_auroc
from medpeft.metrics.compare import percentile_interval, resampled_mean_aurocs
from medpeft.metrics.validation import check_binary_problem

MIN_COUNT = 10


def subgroup_metrics(targets: np.ndarray, probs: np.ndarray, labels: list[str], groups: dict[str, np.ndarray],
                     n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                     min_count: int = MIN_COUNT) -> dict:
    """{column: {"groups": {value: metrics}, "n_unknown", "worst", "worst_auroc", "best", "gap"}}.

    targets (N, K) 0/1/NaN, probs (N, K) finite where the target is known, K = len(labels); groups:
    {column: (N,) strings}. Per group (values sorted): "n", "positives" and "negatives" ({label: known
    count}), "per_label" ({label: AUROC or None}), "mean_auroc", "ci_low", "ci_high" (None when the mean
    is undefined) and "small". "worst" / "best": the value of the lowest / highest mean AUROC among the
    groups that are not small (None if there is none), "gap": best - worst (None unless two such groups).
    """
    y, (p,) = check_binary_problem(targets, {"probs": probs}, targets_name="targets", allow_unknown=True,
                                   ndims=(2,))
    if y.shape[1] != len(labels):
        raise ValueError(f"targets {y.shape} and probs {p.shape} must both be (N, {len(labels)})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    both_classes = [k for k in range(y.shape[1]) if (y[:, k] == 1).any() and (y[:, k] == 0).any()]
    out = {}
    for column, values in groups.items():
        values = np.asarray(values).astype(str)
        if values.shape != (y.shape[0],):
            raise ValueError(f"groups[{column!r}] must hold one value per image ({y.shape[0]}), "
                             f"got shape {values.shape}")
        found = {}
        for value in sorted(set(values.tolist()) - {""}):
            rows = values == value
            found[value] = _group(y[rows], p[rows], labels, both_classes, min_count, n_resamples, seed, confidence)
        ranked = sorted((m["mean_auroc"], value) for value, m in found.items() if not m["small"])
        out[column] = {"groups": found, "n_unknown": int(np.sum(values == "")),
                       "worst": ranked[0][1] if ranked else None,
                       "worst_auroc": ranked[0][0] if ranked else None,
                       "best": ranked[-1][1] if ranked else None,
                       "gap": ranked[-1][0] - ranked[0][0] if len(ranked) > 1 else None}
    return out


def _group(y: np.ndarray, p: np.ndarray, labels: list[str], both_classes: list[int], min_count: int,
           n_resamples: int, seed: int, confidence: float) -> dict:
    """The metrics of one group's rows (checked input)."""
    positives = {name: int(np.sum(y[:, k] == 1)) for k, name in enumerate(labels)}
    negatives = {name: int(np.sum(y[:, k] == 0)) for k, name in enumerate(labels)}
    per_label = {}
    for k, name in enumerate(labels):
        known = ~np.isnan(y[:, k])
        per_label[name] = mann_whitney_auroc(y[known, k].astype(bool), p[known, k])
    defined = [a for a in per_label.values() if a is not None]
    mean = float(np.mean(defined)) if defined else None
    interval = None if mean is None else percentile_interval(
        resampled_mean_aurocs(y, p, n_resamples=n_resamples, seed=seed)[:, 0], confidence)
    small = mean is None or any(min(positives[labels[k]], negatives[labels[k]]) < min_count for k in both_classes)
    return {"n": int(y.shape[0]), "positives": positives, "negatives": negatives, "per_label": per_label,
            "mean_auroc": mean, "ci_low": None if interval is None else interval[0],
            "ci_high": None if interval is None else interval[1], "small": small}
