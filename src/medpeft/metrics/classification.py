"""Classification metrics over a whole split (never averaged over batches).

AUROC is the Mann-Whitney statistic with mid-ranks for ties, which equals the area under the
ROC curve (and scikit-learn's ``roc_auc_score``). A label whose `y_true` holds a single class has
no AUROC: it is reported as undefined (None), left out of the mean, and warned about with
scikit-learn's ``UndefinedMetricWarning``.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score, f1_score

from medpeft.metrics.validation import check_binary_problem


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """Area under the ROC curve of scores `y_score` (N,) for labels `y_true` (N,); None if one class only.

    `y_true` holds only 0 and 1 (no unknowns: leave those rows out first) and `y_score` is finite;
    anything else raises ValueError. Ties count 1/2.
    """
    y, (score,) = check_binary_problem(y_true, {"y_score": y_score}, allow_unknown=False)
    return mann_whitney_auroc(y.astype(bool), score)


def mann_whitney_auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC of checked input: `positive` (N,) bool, `score` (N,) finite; None if one class only.

    U / (n_pos n_neg), U = the sum of the positives' mid-ranks minus n_pos (n_pos + 1) / 2.
    """
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(targets: np.ndarray, probs: np.ndarray, labels: list[str], task: str) -> dict:
    """Per-label AUROC / AUPRC and their macro means over the labels where they are defined.

    targets: (N, K) 0/1 with NaN = unknown (one-hot for 'multiclass'); an image with an unknown label
    is left out of that label's metrics only. probs: (N, K) sigmoid or softmax outputs, finite
    wherever the target is known. K = len(labels). 'multiclass' adds the accuracy and macro F1 of
    the arg-max prediction. Invalid input raises ValueError.
    """
    targets, (probs,) = check_binary_problem(targets, {"probs": probs}, targets_name="targets",
                                             allow_unknown=True, ndims=(2,))
    if targets.shape[1] != len(labels):
        raise ValueError(f"targets {targets.shape} and probs {probs.shape} must both be (N, {len(labels)})")
    per_label, undefined = {}, []
    for k, name in enumerate(labels):
        known = ~np.isnan(targets[:, k])
        y, score = targets[known, k], probs[known, k]
        area = mann_whitney_auroc(y.astype(bool), score)
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
