"""Paired comparison of two classifiers scored on the SAME test images.

DeLong's test (DeLong, DeLong & Clarke-Pearson 1988) compares the AUROC of two models on one binary
label; it is computed with the midrank formulation of Sun & Xu 2014 ("Fast implementation of
DeLong's algorithm for comparing the areas under correlated receiver operating characteristic
curves", IEEE SPL 21(11)), O(n log n). The paired bootstrap resamples images (rows) with
replacement, the same rows for both models, and gives a percentile confidence interval for the
difference in mean AUROC over labels, of one pair of runs or averaged over the pairs of several
training seeds, and a two-sided bootstrap p-value of "difference = 0". Stratified (the default), it
resamples within strata (`label_strata`: each image's rarest positive label), so every label keeps
its positives in (almost) every resample; a resample in which a label defined on the full sample
has one class only averages over fewer labels, and such resamples are counted (`n_label_lost`).
Targets are 0/1 with NaN = unknown: an image with an unknown label is left out for that label only
(its scores are never looked at). Invalid input raises ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from medpeft.metrics.classification import mann_whitney_auroc
from medpeft.metrics.validation import check_binary_problem

_CHUNK_CELLS = 4_000_000  # resamples x images held in memory at once by the bootstrap


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's paired test of AUROC(a) - AUROC(b) on one binary label."""

    auroc_a: float
    auroc_b: float
    difference: float  # auroc_a - auroc_b
    std_error: float  # standard error of the difference
    z: float
    p_value: float  # two-sided, normal approximation
    n_positive: int
    n_negative: int


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile bootstrap interval of a difference in mean AUROC over labels (a - b, AUROC units).

    p_value: two-sided test of "difference = 0", 2 min(#(d <= 0) + 1, #(d >= 0) + 1) / (B + 1) over the
    B resampled differences d that were not skipped, capped at 1.
    """

    estimate: float  # the statistic on the full sample(s)
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int  # resamples used (requested minus skipped)
    n_skipped: int  # resamples in which no label had both classes (in some sample)
    seed: int
    p_value: float
    n_label_lost: int  # resamples in which a label defined on the full sample had one class (in some sample)
    stratified: bool


def delong_test(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
    """DeLong's test for one binary label: targets (N,) 0/1/NaN, scores_a and scores_b (N,).

    Images with a NaN target are dropped (their scores may be anything); the other scores must be
    finite. Raises ValueError on invalid input, or unless at least two positives and two negatives
    remain (the variance needs two of each). If the variance of the difference is 0 the p-value is
    1.0 when the difference is 0 (e.g. identical scores) and 0.0 otherwise.
    """
    y, (a, b) = check_binary_problem(targets, {"scores_a": scores_a, "scores_b": scores_b},
                                     targets_name="targets", allow_unknown=True)
    known = ~np.isnan(y)
    positive, scores = y[known].astype(bool), np.stack([a[known], b[known]])
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs both classes (at least 2 positives and 2 negatives); "
                         f"got {m} positive(s) and {n} negative(s) after dropping unknown targets")
    # Sun & Xu: midranks among all images (tz), among positives (tx) and among negatives (ty).
    tz = rankdata(scores, axis=1)
    tx = rankdata(scores[:, positive], axis=1)
    ty = rankdata(scores[:, ~positive], axis=1)
    # Structural components: V10 = share of negatives each positive beats (ties 1/2),
    # V01 = share of positives that beat each negative.
    v10 = (tz[:, positive] - tx) / n
    v01 = 1.0 - (tz[:, ~positive] - ty) / m
    # var(A - B) = (S10_aa + S10_bb - 2 S10_ab) / m + (S01_aa + ...) / n, taken as the variance of the
    # component differences: the same quantity, and exactly 0 when the two score vectors rank alike.
    variance = float(np.var(v10[0] - v10[1], ddof=1) / m + np.var(v01[0] - v01[1], ddof=1) / n)
    auroc_a, auroc_b = mann_whitney_auroc(positive, scores[0]), mann_whitney_auroc(positive, scores[1])
    difference = auroc_a - auroc_b
    if variance > 0:
        z = difference / math.sqrt(variance)
        p_value = math.erfc(abs(z) / math.sqrt(2))  # 2 * (1 - Phi(|z|))
    else:
        z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
        p_value = 1.0 if difference == 0 else 0.0
    return DeLongResult(auroc_a=auroc_a, auroc_b=auroc_b, difference=difference,
                        std_error=math.sqrt(max(variance, 0.0)), z=z, p_value=p_value,
                        n_positive=m, n_negative=n)


def bootstrap_indices(n: int, n_resamples: int, seed: int, strata: np.ndarray | None = None):
    """The rows of each bootstrap resample, in order: one `rng.integers(0, n, size=n)` per resample.

    With `strata` ((n,) stratum of each image) every stratum, in ascending order, draws its own size
    from its own members (`members[rng.integers(0, n_s, size=n_s)]`), so each stratum keeps its size;
    a single stratum draws the same rows as none.
    """
    rng = np.random.default_rng(seed)
    members = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    for _ in range(n_resamples):
        yield np.concatenate([m[rng.integers(0, m.size, size=m.size)] for m in members])


def label_strata(targets: np.ndarray) -> np.ndarray:
    """The stratum of each image of (N, K) 0/1/NaN targets: the index of its rarest positive label.

    Rarest = fewest known positives on the full sample, ties by label order; an image positive for no
    label is in stratum K. For one label: positives and the rest; one-hot targets: the classes.
    """
    positive = np.asarray(targets) == 1
    rarest_first = np.argsort(positive.sum(0), kind="stable")
    ranked = positive[:, rarest_first]
    return np.where(ranked.any(1), rarest_first[ranked.argmax(1)], positive.shape[1])


def resampled_mean_aurocs(targets: np.ndarray, *scores: np.ndarray, n_resamples: int = 2000,
                          seed: int = 0, stratify: bool = True) -> np.ndarray:
    """Mean AUROC over labels of each model on each paired bootstrap resample: (n_resamples, n_models).

    targets (N, K) or (N,) 0/1/NaN; each scores array has the same shape and is finite where the
    target is known. Resample b uses the rows from `bootstrap_indices(N, n_resamples, seed, strata)`
    for every model, strata = `label_strata(targets)` if `stratify`, else none. A label is left out
    of a resample's mean when its known rows in that resample hold one class only (the same labels for
    every model, as the rows are shared); a resample in which no label has both classes is a row of
    NaN (skipped by the intervals, not redrawn).
    """
    y, s = _as_columns(targets, {f"scores[{i}]": x for i, x in enumerate(scores)})
    return _resampled_mean_aurocs(y, s, n_resamples, seed, stratify)[0]


def bootstrap_auroc_difference(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                               n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95,
                               stratify: bool = True) -> BootstrapResult:
    """Paired bootstrap CI of mean AUROC(a) - mean AUROC(b) over labels, resampling images.

    targets, scores_a, scores_b: (N, K), or (N,) for one label; NaN target = unknown. The estimate
    averages over the labels defined on the full sample; each resample averages over the labels
    defined in it. Resamples with no defined label are skipped (not redrawn) and counted. The
    interval is the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles of the resampled
    differences. `stratify`: resample within `label_strata` (see `resampled_mean_aurocs`). The same as
    `bootstrap_auroc_difference_over_seeds` with one sample.
    """
    return bootstrap_auroc_difference_over_seeds([(targets, scores_a, scores_b)], n_resamples=n_resamples,
                                                 seed=seed, confidence=confidence, stratify=stratify)


def bootstrap_auroc_difference_over_seeds(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                                          n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95,
                                          stratify: bool = True) -> BootstrapResult:
    """Paired bootstrap CI of the mean over samples of mean AUROC(a) - mean AUROC(b).

    samples: one (targets, scores_a, scores_b) per training seed, each as in
    `bootstrap_auroc_difference` (e.g. two methods' test predictions of one seed, on the same images).
    Every sample is resampled with the same bootstrap `seed` (the same rows when the samples hold the
    same images, targets and `stratify`), the per-resample differences are averaged over the samples,
    and the interval and p-value are taken from those averages; a resample skipped in any sample is
    skipped. The estimate is the mean over samples of the full-sample differences.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not samples:
        raise ValueError("samples must hold at least one (targets, scores_a, scores_b)")
    checked = [_as_columns(y, {"scores_a": a, "scores_b": b}) for y, a, b in samples]
    estimate = np.mean([_mean_auroc(y, a) - _mean_auroc(y, b) for y, (a, b) in checked])
    differences, lost = [], np.zeros(n_resamples, dtype=bool)
    for y, scores in checked:
        means, lost_here = _resampled_mean_aurocs(y, scores, n_resamples, seed, stratify)
        differences.append(means[:, 0] - means[:, 1])
        lost |= lost_here
    replicates = np.mean(differences, axis=0)
    interval = percentile_interval(replicates, confidence)
    if interval is None:
        raise ValueError("no bootstrap resample had a label with both classes")
    used = replicates[np.isfinite(replicates)]
    tail = min(np.count_nonzero(used <= 0), np.count_nonzero(used >= 0))
    return BootstrapResult(estimate=float(estimate), ci_low=interval[0], ci_high=interval[1],
                           confidence=confidence, n_resamples=int(used.size),
                           n_skipped=int(replicates.size - used.size), seed=seed,
                           p_value=float(min(1.0, 2 * (tail + 1) / (used.size + 1))),
                           n_label_lost=int(lost.sum()), stratified=stratify)


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float] | None:
    """The (1 - confidence) / 2 and (1 + confidence) / 2 percentiles of the finite `replicates`; None if none."""
    used = replicates[np.isfinite(replicates)]
    if used.size == 0:
        return None
    # 1 - 0.95 is 0.050000000000000044 in binary; rounded, 0.95 takes exactly the 2.5th and 97.5th percentiles.
    tail = round((1 - confidence) / 2, 12)
    low, high = np.quantile(used, [tail, 1 - tail])
    return float(low), float(high)


def _resampled_mean_aurocs(y: np.ndarray, s: list[np.ndarray], n_resamples: int, seed: int,
                           stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """`resampled_mean_aurocs` of checked (N, K) targets and scores, and per resample whether a label
    with both classes on the full sample had one class in it."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    n, k = y.shape
    chunk = max(1, _CHUNK_CELLS // max(n, 1))
    out = np.empty((n_resamples, len(s)))
    lost = np.zeros(n_resamples, dtype=bool)
    draws = bootstrap_indices(n, n_resamples, seed, label_strata(y) if stratify else None)
    # A label with one class on the full sample has one class in every resample: never defined.
    labels = [_label_levels(y[:, j], [x[:, j] for x in s]) for j in range(k)
              if {0.0, 1.0} <= set(np.unique(y[np.isfinite(y[:, j]), j]).tolist())]
    for start in range(0, n_resamples, chunk):
        rows = np.stack([next(draws) for _ in range(min(chunk, n_resamples - start))])
        b = rows.shape[0]
        # Resample b as multiplicities: counts[b, i] = how often image i was drawn.
        counts = np.bincount((rows + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        total = np.zeros((b, len(s)))
        defined = np.zeros(b, dtype=np.int64)
        for known, positive, levels in labels:
            c = counts[:, known]
            n_pos = c[:, positive].sum(1)
            n_neg = c[:, ~positive].sum(1)
            ok = (n_pos > 0) & (n_neg > 0)
            defined += ok
            lost[start:start + b] |= ~ok
            for model, (order, starts) in enumerate(levels):
                area = _weighted_auroc(c[:, order], positive[order], starts, n_pos, n_neg)
                total[:, model] += np.where(ok, area, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + b] = np.where(defined[:, None] > 0, total / defined[:, None], np.nan)
    return out, lost


def _weighted_auroc(counts: np.ndarray, positive: np.ndarray, starts: np.ndarray,
                    n_pos: np.ndarray, n_neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC of each resample from per-image counts (B, n) sorted by score.

    Images with equal scores form one level (starting at `starts`); a positive beats every negative
    on a lower level and ties with those on its own level (1/2). Integer sums: exact.
    """
    pos_at = np.add.reduceat(counts * positive, starts, axis=1)
    neg_at = np.add.reduceat(counts * ~positive, starts, axis=1)
    neg_below = np.cumsum(neg_at, axis=1) - neg_at
    twice_u = (pos_at * (2 * neg_below + neg_at)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return twice_u / (2 * n_pos * n_neg)


def _label_levels(target: np.ndarray, scores: list[np.ndarray]):
    """Known rows, their class, and per model the score order and the starts of tied levels."""
    known = np.isfinite(target)
    positive = target[known].astype(bool)
    levels = []
    for score in scores:
        s = score[known]
        order = np.argsort(s, kind="stable")
        sorted_s = s[order]
        starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]]) if s.size else np.zeros(0, int)
        levels.append((order, starts))
    return known, positive, levels


def _mean_auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUROC over the labels with both classes among their known rows; checked (N, K) input."""
    areas = []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        areas.append(mann_whitney_auroc(y[known, j].astype(bool), scores[known, j]))
    defined = [a for a in areas if a is not None]
    if not defined:
        raise ValueError("no label has both classes among its known targets")
    return float(np.mean(defined))


def _as_columns(targets: np.ndarray, scores: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Checked (N, K) or (N,) targets and same-shape scores as (N, K) float arrays (K = 1 for (N,))."""
    y, s = check_binary_problem(targets, scores, targets_name="targets", allow_unknown=True, ndims=(1, 2))
    if y.ndim == 1:
        y, s = y[:, None], [x[:, None] for x in s]
    return y, s
