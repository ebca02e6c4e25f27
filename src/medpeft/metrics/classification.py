"""Classification metrics over a whole split (never averaged over batches).

AUROC is the Mann-Whitney statistic with mid-ranks for ties, which equals the area under the
ROC curve (and scikit-learn's ``roc_auc_score``). A label whose `y_true` holds a single class has
no AUROC: it is reported as undefined (None), left out of the mean, and warned about.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, f1_score


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for a label (e.g. only one class present)."""


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """Area under the ROC curve for binary `y_true` (N,) and scores (N,); None if one class only."""
    y_true = np.asarray(y_true).astype(bool)
    n_pos = int(y_true.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(y_score, dtype=np.float64))
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(targets: np.ndarray, probs: np.ndarray, labels: list[str], task: str) -> dict:
    """Per-label AUROC / AUPRC and their macro means over labels where they are defined.

    targets: (N, K) 0/1, NaN = unknown (one-hot for 'multiclass'); probs: (N, K) sigmoid or softmax outputs.
    'multiclass' adds accuracy and macro F1 of the arg-max prediction.
    """
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    if targets.shape != probs.shape or targets.ndim != 2 or targets.shape[1] != len(labels):
        raise ValueError(f"targets {targets.shape} and probs {probs.shape} must both be (N, {len(labels)})")
    per_label, undefined = {}, []
    for k, name in enumerate(labels):
        known = np.isfinite(targets[:, k])  # NaN: unknown label (e.g. an ignored uncertain one), left out
        y, score = targets[known, k], probs[known, k]
        area = auroc(y, score)
        if area is None:
            undefined.append(name)
        per_label[name] = {
            "auroc": area,
            "auprc": None if area is None else float(average_precision_score(y, score)),
            "positives": int(y.sum()),
            "negatives": int(y.size - y.sum()),
            "unknown": int((~known).sum()),
        }
    if undefined:
        warnings.warn(f"AUROC undefined (one class only in this split) for: {', '.join(undefined)}; "
                      f"left out of the mean", UndefinedMetricWarning, stacklevel=2)
    defined = [m for m in per_label.values() if m["auroc"] is not None]
    out = {
        "n": int(targets.shape[0]),
        "mean_auroc": float(np.mean([m["auroc"] for m in defined])) if defined else None,
        "mean_auprc": float(np.mean([m["auprc"] for m in defined])) if defined else None,
        "undefined": undefined,
        "per_label": per_label,
    }
    if task == "multiclass":
        true_class, predicted = targets.argmax(1), probs.argmax(1)
        out["accuracy"] = float((true_class == predicted).mean())
        out["macro_f1"] = float(f1_score(true_class, predicted, labels=list(range(len(labels))),
                                         average="macro", zero_division=0))
    return out
