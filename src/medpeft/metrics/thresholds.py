"""Per-label decision thresholds chosen on the validation split: Youden's J (the default) or the most
specific threshold that keeps a required sensitivity. A probability >= the threshold is positive."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from medpeft.errors import ConfigError
from medpeft.metrics.validation import check_binary_problem

YOUDEN = "youden"


def parse_rule(rule: str) -> tuple[str, float | None]:
    """'youden' -> ('youden', None); 'sensitivity:0.9' -> ('sensitivity', 0.9)."""
    if rule == YOUDEN:
        return YOUDEN, None
    name, _, value = rule.partition(":")
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if name != "sensitivity" or not 0.0 < target <= 1.0:
        raise ConfigError(f"threshold rule {rule!r}: expected 'youden' or 'sensitivity:X' with 0 < X <= 1")
    return name, target


def select_threshold(y_true: np.ndarray, y_score: np.ndarray, rule: str = YOUDEN) -> float | None:
    """One label's threshold: `y_true` (N,) 0/1 with NaN = unknown (left out), `y_score` (N,) finite
    where the target is known. None when the known targets hold a single class (no ROC curve to
    choose on). Invalid input raises ValueError; an unknown rule ConfigError.

    Youden: the ROC point maximising sensitivity + specificity - 1, the highest threshold among ties.
    sensitivity:X: the highest threshold whose sensitivity is >= X (the most specific such point)."""
    name, target = parse_rule(rule)
    y, (score,) = check_binary_problem(y_true, {"y_score": y_score}, allow_unknown=True)
    return _threshold(y, score, name, target)


def select_thresholds(targets: np.ndarray, probs: np.ndarray, labels: list[str], rule: str = YOUDEN) -> dict:
    """{label: threshold or None}: `select_threshold` of each column of (N, K) targets (0/1, NaN =
    unknown) and probabilities, K = len(labels)."""
    name, target = parse_rule(rule)
    targets, (probs,) = check_binary_problem(targets, {"probs": probs}, targets_name="targets",
                                             allow_unknown=True, ndims=(2,))
    if targets.shape[1] != len(labels):
        raise ValueError(f"targets {targets.shape} and probs {probs.shape} must both be (N, {len(labels)})")
    return {label: _threshold(targets[:, k], probs[:, k], name, target) for k, label in enumerate(labels)}


def _threshold(y: np.ndarray, score: np.ndarray, name: str, target: float | None) -> float | None:
    """The threshold of a parsed rule on checked (N,) targets (NaN = unknown) and scores."""
    known = ~np.isnan(y)
    y, score = y[known].astype(int), score[known]
    if y.min(initial=1) == y.max(initial=0):
        return None
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first point (threshold +inf) predicts nothing positive
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if name == YOUDEN:
        j = tpr - fpr  # thresholds decrease: the first of the (rounding-tolerant) ties is the highest
        index = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    else:
        index = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    return float(thresholds[index])
