"""Per-label decision thresholds chosen on the validation split: Youden's J (the default) or the most
specific threshold that keeps a required sensitivity. A probability >= the threshold is positive."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from medpeft.errors import ConfigError

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
    """One label's threshold; None when `y_true` has a single class (no ROC curve to choose on).

    Youden: the ROC point maximising sensitivity + specificity - 1, the highest threshold among ties.
    sensitivity:X: the highest threshold whose sensitivity is >= X (the most specific such point)."""
    name, target = parse_rule(rule)
    known = np.isfinite(y_true)
    y_true, y_score = np.asarray(y_true)[known].astype(int), np.asarray(y_score, dtype=np.float64)[known]
    if y_true.min(initial=1) == y_true.max(initial=0):
        return None
    fpr, tpr, thresholds = roc_curve(y_true, y_score, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first point (threshold +inf) predicts nothing positive
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if name == YOUDEN:
        j = tpr - fpr  # thresholds decrease: the first of the (rounding-tolerant) ties is the highest
        index = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    else:
        index = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    return float(thresholds[index])


def select_thresholds(targets: np.ndarray, probs: np.ndarray, labels: list[str], rule: str = YOUDEN) -> dict:
    """{label: threshold or None} over (N, K) targets (NaN = unknown) and probabilities."""
    return {label: select_threshold(targets[:, k], probs[:, k], rule) for k, label in enumerate(labels)}
