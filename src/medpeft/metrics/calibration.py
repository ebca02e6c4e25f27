"""Calibration of predicted probabilities, and temperature scaling.

Expected calibration error (ECE) with equal-mass bins: the images sorted by probability (stable
sort) are split into `n_bins` groups of sizes as equal as possible (``np.array_split`` of the sorted
order; N groups of one when N < n_bins), and ECE = sum_b (n_b / N) |mean(y_b) - mean(p_b)|. The
reliability curve is the (mean p, mean y, n) of the same bins. Brier score = mean((p - y)^2).

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks", ICML) divides the
logits by T > 0, fitted on validation data by minimising the negative log-likelihood over log T in
[log 1e-2, log 1e2]: one T per label for 'multilabel' (sigmoid), one T for 'multiclass' (softmax).
Dividing by T > 0 keeps the order of each label's scores, so AUROC is unchanged. Targets are 0/1
with NaN = unknown (left out per label). Invalid input raises ValueError.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

from medpeft.metrics.validation import check_binary_problem

N_BINS = 10
BINNING = "equal-mass"
TASKS = ("multilabel", "multiclass")
LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE of probabilities `p` (N,) in [0, 1] for outcomes `y` (N,) 0/1, equal-mass bins; N >= 1."""
    curve = reliability_curve(y, p, n_bins)
    weights = np.array(curve["count"]) / sum(curve["count"])
    return float(np.sum(weights * np.abs(np.array(curve["observed"]) - np.array(curve["predicted"]))))


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between probabilities `p` (N,) in [0, 1] and outcomes `y` (N,) 0/1."""
    y, p = _checked(y, p)
    return float(np.mean((p - y) ** 2))


def reliability_curve(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per equal-mass bin (ascending p): {"predicted": mean p, "observed": mean y, "count": n} as lists."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y, p = _checked(y, p)
    bins = np.array_split(np.argsort(p, kind="stable"), min(n_bins, p.size))
    return {"predicted": [float(p[b].mean()) for b in bins], "observed": [float(y[b].mean()) for b in bins],
            "count": [int(b.size) for b in bins]}


def calibration_metrics(targets: np.ndarray, probs: np.ndarray, labels: list[str], n_bins: int = N_BINS) -> dict:
    """ECE, Brier score and reliability curve per label, over its known rows, and their means over labels.

    targets (N, K) 0/1/NaN, probs (N, K) in [0, 1] where the target is known; K = len(labels). A label
    with no known row has None values and is left out of the means (None when no label has a value).
    """
    y, (p,) = check_binary_problem(targets, {"probs": probs}, targets_name="targets", allow_unknown=True,
                                   ndims=(2,))
    if y.shape[1] != len(labels):
        raise ValueError(f"targets {y.shape} and probs {p.shape} must both be (N, {len(labels)})")
    per_label = {}
    for k, name in enumerate(labels):
        known = ~np.isnan(y[:, k])
        if not known.any():
            per_label[name] = {"ece": None, "brier": None, "reliability": None}
            continue
        yk, pk = y[known, k], p[known, k]
        per_label[name] = {"ece": expected_calibration_error(yk, pk, n_bins), "brier": brier_score(yk, pk),
                           "reliability": reliability_curve(yk, pk, n_bins)}
    scored = [m for m in per_label.values() if m["ece"] is not None]
    return {"binning": BINNING, "n_bins": n_bins,
            "mean_ece": float(np.mean([m["ece"] for m in scored])) if scored else None,
            "mean_brier": float(np.mean([m["brier"] for m in scored])) if scored else None,
            "per_label": per_label}


def fit_temperature(logits: np.ndarray, targets: np.ndarray, task: str) -> list[float]:
    """Temperatures minimising the validation NLL: one per label ('multilabel'), one ('multiclass').

    logits (N, K) finite where the target is known, targets (N, K) 0/1/NaN (one-hot for 'multiclass',
    where an image with any unknown target is left out). A 'multilabel' label without both classes
    among its known rows keeps T = 1.0; 'multiclass' needs at least one image with a known class.
    """
    z, y = _logits_and_targets(logits, targets, task)
    if task == "multiclass":
        known = _known_classes(y)
        return [_minimise(lambda t: _softmax_nll(z[known], y[known], t))]
    temperatures = []
    for k in range(z.shape[1]):
        known = ~np.isnan(y[:, k])
        if len(np.unique(y[known, k])) < 2:
            temperatures.append(1.0)
        else:
            temperatures.append(_minimise(lambda t, k=k, known=known: _sigmoid_nll(z[known, k], y[known, k], t)))
    return temperatures


def apply_temperature(logits: np.ndarray, temperatures: list[float], task: str) -> np.ndarray:
    """Probabilities (N, K) of `logits` (N, K) / T: sigmoid(z_k / T_k) per label, or softmax(z / T)."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(temperatures, dtype=np.float64)
    _check_task(task)
    expected = 1 if task == "multiclass" else z.shape[-1]
    if z.ndim != 2 or t.shape != (expected,):
        raise ValueError(f"apply_temperature: logits must be (N, K) and temperatures {expected} value(s) "
                         f"for '{task}', got logits {z.shape} and {t.size} temperature(s)")
    if not (np.isfinite(t) & (t > 0)).all():
        raise ValueError(f"temperatures must be finite and positive, got {t.tolist()}")
    return softmax(z / t[0], axis=1) if task == "multiclass" else expit(z / t)


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray, task: str,
                            temperatures: list[float] | None = None) -> float:
    """Mean NLL of `logits` / T (T = 1 when `temperatures` is None) over the known targets.

    'multilabel': the binary cross-entropy of sigmoid(z / T) averaged over the known (image, label)
    pairs; 'multiclass': the cross-entropy of softmax(z / T) averaged over the images with a known class.
    """
    z, y = _logits_and_targets(logits, targets, task)
    if task == "multiclass":
        known = _known_classes(y)
        return _softmax_nll(z[known], y[known], 1.0 if temperatures is None else temperatures[0])
    t = np.ones(z.shape[1]) if temperatures is None else np.asarray(temperatures, dtype=np.float64)
    known = ~np.isnan(y)
    x = (z / t)[known]
    return float(np.mean(np.logaddexp(0.0, x) - y[known] * x))


def _minimise(nll) -> float:
    result = minimize_scalar(lambda log_t: nll(math.exp(log_t)), bounds=LOG_T_BOUNDS, method="bounded",
                             options={"xatol": 1e-6})
    return float(math.exp(result.x))


def _sigmoid_nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    x = z / t
    return float(np.mean(np.logaddexp(0.0, x) - y * x))  # -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]


def _softmax_nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(-np.mean(np.sum(y * log_softmax(z / t, axis=1), axis=1)))


def _logits_and_targets(logits, targets, task: str) -> tuple[np.ndarray, np.ndarray]:
    _check_task(task)
    y, (z,) = check_binary_problem(targets, {"logits": logits}, targets_name="targets", allow_unknown=True,
                                   ndims=(2,))
    z = np.where(np.isnan(y), 0.0, z)  # the logits of unknown targets are never used
    return z, y


def _known_classes(y: np.ndarray) -> np.ndarray:
    """The images of a one-hot (N, K) target with no unknown entry; at least one."""
    known = ~np.isnan(y).any(1)
    if not known.any():
        raise ValueError("targets: no image has a known class ('multiclass' needs one-hot rows without NaN)")
    return known


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def _checked(y, p) -> tuple[np.ndarray, np.ndarray]:
    y, (p,) = check_binary_problem(y, {"p": p}, targets_name="y", allow_unknown=False)
    if y.size == 0:
        raise ValueError("y and p must hold at least one image")
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p must be in [0, 1], got {p[(p < 0) | (p > 1)][0]:g} at index "
                         f"{int(np.flatnonzero((p < 0) | (p > 1))[0])}")
    return y, p
