import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from medpeft.metrics.classification import classification_metrics
from medpeft.metrics.compare import (
    bootstrap_auroc_difference,
    bootstrap_auroc_difference_over_seeds,
    bootstrap_indices,
    delong_test,
    label_strata,
    resampled_mean_aurocs,
)


def _delong_by_definition(y, a, b):
    """DeLong et al. 1988 written out: O(m * n) Heaviside kernel, structural components, covariances."""
    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    v10, v01 = [], []
    for s in (a, b):
        x, z = s[pos][:, None], s[neg][None, :]
        psi = (x > z) + 0.5 * (x == z)  # psi(X_i, Y_j): 1 if the positive scores higher, 1/2 on a tie
        v10.append(psi.mean(1))  # V10(X_i), one per positive
        v01.append(psi.mean(0))  # V01(Y_j), one per negative
    areas = np.array([c.mean() for c in v10])
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))  # ddof=1, as in the paper
    contrast = np.array([1.0, -1.0])
    variance = contrast @ (s10 / m + s01 / n) @ contrast
    z = (areas[0] - areas[1]) / np.sqrt(variance)
    return areas, variance, 2 * norm.sf(abs(z))


def _scores(seed, n=300, k=3, nan_fraction=0.1):
    """(N, K) targets with some NaN, and two score sets where a separates the classes better than b."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, k)).astype(float)
    a = np.round(rng.normal(size=(n, k)) + 1.0 * y, 1)  # rounded: ties
    b = np.round(rng.normal(size=(n, k)) + 0.6 * y, 1)
    y[rng.random((n, k)) < nan_fraction] = np.nan
    return y, a, b


@pytest.mark.parametrize("seed", range(4))
def test_delong_equals_the_structural_components_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 157)
    a = np.round(rng.random(157) + 0.4 * y, 1)  # one decimal: many ties, within and across classes
    b = np.round(0.5 * a + rng.random(157), 1)
    result = delong_test(y, a, b)
    (area_a, area_b), variance, p = _delong_by_definition(y, a, b)
    assert result.auroc_a == pytest.approx(area_a, abs=1e-10)
    assert result.auroc_b == pytest.approx(area_b, abs=1e-10)
    assert result.difference == pytest.approx(area_a - area_b, abs=1e-10)
    assert result.std_error ** 2 == pytest.approx(variance, rel=1e-10, abs=1e-14)
    assert result.p_value == pytest.approx(p, rel=1e-10, abs=1e-12)
    assert (result.n_positive, result.n_negative) == (int(y.sum()), int((1 - y).sum()))


# pROC's `aSAH` data (Turck et al. 2010, Intensive Care Med 36:107-115; shipped with the R package pROC):
# outcome Poor = 1 (41 of 113 patients), S100beta and the WFNS grade (1-5, heavily tied).
_ASAH_POOR = [
    0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0,
    1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0,
    0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0,
]
_ASAH_S100B = [
    0.13, 0.14, 0.1, 0.04, 0.13, 0.1, 0.47, 0.16, 0.18, 0.1, 0.12, 0.1, 0.44, 0.71, 0.04, 0.08, 0.49, 0.04, 0.07,
    0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11, 0.13, 0.19, 0.05, 0.16, 0.41, 0.14, 0.34, 0.35, 0.48,
    0.09, 0.96, 0.25, 0.5, 0.46, 0.16, 0.07, 0.43, 0.45, 0.11, 0.08, 0.09, 0.86, 0.52, 0.08, 0.06, 0.13, 2.07, 0.1,
    0.14, 0.15, 0.07, 0.06, 0.77, 0.05, 0.09, 0.3, 0.03, 0.09, 0.04, 0.23, 0.7, 0.09, 0.27, 0.71, 0.08, 0.26, 0.08,
    0.16, 0.09, 0.13, 0.1, 0.08, 0.11, 0.33, 0.11, 0.28, 0.07, 0.1, 0.32, 0.22, 0.07, 0.05, 0.24, 0.38, 0.1, 0.15,
    0.08, 0.14, 0.1, 0.07, 0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82, 0.74, 0.15, 0.47, 0.17, 0.44, 0.15, 0.5, 0.48,
]
_ASAH_WFNS = [
    1, 1, 1, 1, 3, 2, 5, 4, 1, 2, 5, 2, 5, 5, 1, 2, 5, 2, 2, 5, 2, 1, 1, 1, 1, 2, 1, 2, 1, 1, 3, 4, 2, 1, 4, 5, 4, 1,
    4, 2, 5, 5, 1, 1, 2, 4, 1, 1, 2, 5, 5, 2, 1, 2, 5, 1, 2, 2, 2, 1, 5, 1, 1, 2, 5, 2, 1, 4, 5, 2, 4, 4, 1, 4, 1, 2,
    1, 4, 2, 1, 2, 3, 2, 4, 2, 1, 4, 5, 1, 1, 5, 4, 2, 2, 1, 1, 1, 3, 1, 2, 5, 2, 2, 5, 5, 5, 2, 4, 4, 5, 1, 1, 1,
]


def test_delong_reproduces_the_published_proc_example():
    # pROC's documented example, roc.test(roc(aSAH$outcome, aSAH$s100b), roc(aSAH$outcome, aSAH$wfns)):
    # "DeLong's test for two correlated ROC curves: Z = -2.209, p-value = 0.02718;
    #  AUC of roc1 0.7313686, AUC of roc2 0.8236789" (Robin et al. 2011, BMC Bioinformatics 12:77).
    y, s100b, wfns = np.array(_ASAH_POOR), np.array(_ASAH_S100B), np.array(_ASAH_WFNS, dtype=float)
    assert (y.size, y.sum(), s100b.size, wfns.size) == (113, 41, 113, 113)
    result = delong_test(y, s100b, wfns)
    assert result.auroc_a == pytest.approx(0.7313686, abs=5e-8)
    assert result.auroc_b == pytest.approx(0.8236789, abs=5e-8)
    assert result.auroc_a == pytest.approx(roc_auc_score(y, s100b), abs=1e-12)
    assert result.auroc_b == pytest.approx(roc_auc_score(y, wfns), abs=1e-12)
    assert result.z == pytest.approx(-2.209, abs=5e-4)
    assert result.p_value == pytest.approx(0.02718, abs=5e-6)


def test_delong_of_identical_scores_is_p_one_and_a_clearly_better_model_is_significant():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    a = y + rng.normal(0, 0.5, 400)
    same = delong_test(y, a, a.copy())
    assert same.difference == 0.0 and same.std_error == 0.0 and same.p_value == 1.0
    better = delong_test(y, a, y + rng.normal(0, 2.0, 400))
    assert better.difference > 0.1 and better.p_value < 1e-3
    reversed_order = delong_test(y, y + rng.normal(0, 2.0, 400), a)
    assert reversed_order.difference < 0 and reversed_order.z < 0
    # Zero variance with a non-zero difference (perfect vs. all-tied scores): z is infinite, p is 0.
    degenerate = delong_test(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.1, 0.2]), np.full(4, 0.5))
    assert (degenerate.difference, degenerate.z, degenerate.p_value) == (0.5, np.inf, 0.0)


def test_delong_drops_unknown_targets_and_refuses_a_one_class_label():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120).astype(float)
    a, b = rng.random(120) + 0.3 * y, rng.random(120)
    unknown = rng.random(120) < 0.25
    y_nan, a_junk = y.copy(), a.copy()
    y_nan[unknown], a_junk[unknown] = np.nan, np.nan  # scores of unknown images do not matter
    assert delong_test(y_nan, a_junk, b) == delong_test(y[~unknown], a[~unknown], b[~unknown])
    with pytest.raises(ValueError, match="both classes"):
        delong_test(np.array([1.0, 1.0, np.nan, 1.0]), rng.random(4), rng.random(4))
    with pytest.raises(ValueError, match="both classes"):
        delong_test(np.array([0, 0, 0, 1, 0]), rng.random(5), rng.random(5))  # 1 positive: no variance


def _reference_strata(targets):
    """Each image's positive label with the fewest known positives (first such label on a tie), else K."""
    counts = [int(np.sum(targets[:, j] == 1)) for j in range(targets.shape[1])]
    strata = []
    for row in targets:
        positive = [j for j in range(len(row)) if row[j] == 1]
        strata.append(min(positive, key=lambda j: (counts[j], j)) if positive else len(row))
    return np.array(strata)


def _reference_replicates(targets, scores_a, scores_b, n_resamples, seed, stratified=False):
    """A plain loop: the same row draws (one rng.integers per resample, or per stratum in ascending
    order when stratified), per-label sklearn AUROC on known rows, mean over defined labels."""
    rng = np.random.default_rng(seed)
    n, k = targets.shape
    strata = _reference_strata(targets) if stratified else np.zeros(n, int)
    out = []
    for _ in range(n_resamples):
        rows = np.concatenate([np.flatnonzero(strata == s)[rng.integers(0, np.sum(strata == s), np.sum(strata == s))]
                               for s in sorted(set(strata.tolist()))])
        means = []
        for scores in (scores_a, scores_b):
            areas = []
            for j in range(k):
                y, s = targets[rows, j], scores[rows, j]
                known = ~np.isnan(y)
                if len(np.unique(y[known])) == 2:
                    areas.append(roc_auc_score(y[known], s[known]))
            means.append(np.mean(areas) if areas else np.nan)
        out.append(means)
    return np.array(out)


def test_bootstrap_replicates_equal_a_plain_loop_with_the_same_draws():
    y, a, b = _scores(seed=2, n=80, k=3)
    ours = resampled_mean_aurocs(y, a, b, n_resamples=25, seed=7, stratify=False)
    np.testing.assert_allclose(ours, _reference_replicates(y, a, b, 25, seed=7), rtol=0, atol=1e-12)
    # Tiny sample: a label is often one-class in a resample, and sometimes no label is defined.
    y = np.array([[1, 0], [0, np.nan], [0, 0], [0, 1], [0, 0], [0, 0]], dtype=float)
    rng = np.random.default_rng(3)
    a, b = rng.random(y.shape), rng.random(y.shape)
    ours = resampled_mean_aurocs(y, a, b, n_resamples=60, seed=1, stratify=False)
    reference = _reference_replicates(y, a, b, 60, seed=1)
    assert 0 < np.isnan(reference[:, 0]).sum() < 60
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)  # NaN rows in the same places
    result = bootstrap_auroc_difference(y, a, b, n_resamples=60, seed=1, stratify=False)
    assert result.n_skipped == np.isnan(reference[:, 0]).sum()
    assert result.n_resamples == 60 - result.n_skipped


def test_bootstrap_difference_contains_the_estimate_and_is_deterministic_for_a_seed():
    y, a, b = _scores(seed=3)
    result = bootstrap_auroc_difference(y, a, b, n_resamples=500, seed=0)
    expected = (classification_metrics(y, a, list("abc"), "multilabel")["mean_auroc"]
                - classification_metrics(y, b, list("abc"), "multilabel")["mean_auroc"])
    assert result.estimate == pytest.approx(expected, abs=1e-12)
    assert result.ci_low < result.estimate < result.ci_high
    assert (result.n_resamples, result.n_skipped, result.seed, result.confidence) == (500, 0, 0, 0.95)
    assert bootstrap_auroc_difference(y, a, b, n_resamples=500, seed=0) == result
    other = bootstrap_auroc_difference(y, a, b, n_resamples=500, seed=1)
    assert (other.ci_low, other.ci_high) != (result.ci_low, result.ci_high)
    narrower = bootstrap_auroc_difference(y, a, b, n_resamples=500, seed=0, confidence=0.5)
    assert result.ci_low < narrower.ci_low < narrower.ci_high < result.ci_high


def test_bootstrap_ci_excludes_zero_for_a_much_better_model_and_is_exactly_zero_for_identical_scores():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (300, 2)).astype(float)
    a = y + rng.normal(0, 0.5, y.shape)
    b = y + rng.normal(0, 2.0, y.shape)
    better = bootstrap_auroc_difference(y, a, b, n_resamples=500)
    assert better.ci_low > 0
    worse = bootstrap_auroc_difference(y, b, a, n_resamples=500)
    assert worse.ci_high < 0
    same = bootstrap_auroc_difference(y, a, a.copy(), n_resamples=500)
    assert (same.estimate, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)


def test_bootstrap_ignores_unknown_targets_per_label_and_accepts_one_label_as_1d():
    y, a, b = _scores(seed=5, n=150, k=2, nan_fraction=0.3)
    a_junk = np.where(np.isnan(y), 1e6, a)  # scores of unknown (image, label) pairs must not matter
    np.testing.assert_array_equal(resampled_mean_aurocs(y, a_junk, b, n_resamples=50),
                                  resampled_mean_aurocs(y, a, b, n_resamples=50))
    one = bootstrap_auroc_difference(y[:, 0], a[:, 0], b[:, 0], n_resamples=200)
    assert one == bootstrap_auroc_difference(y[:, :1], a[:, :1], b[:, :1], n_resamples=200)
    known = ~np.isnan(y[:, 0])
    assert one.estimate == pytest.approx(roc_auc_score(y[known, 0], a[known, 0])
                                         - roc_auc_score(y[known, 0], b[known, 0]), abs=1e-12)
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 0.0)  # label 2 one-class: left out everywhere
    both = bootstrap_auroc_difference(y, a, b, n_resamples=200)
    assert (both.estimate, both.ci_low, both.ci_high) == pytest.approx((one.estimate, one.ci_low, one.ci_high))


def test_bootstrap_over_seeds_takes_percentiles_of_the_seed_averaged_differences_of_shared_resamples():
    samples = [_scores(seed=s, n=120, k=2) for s in (10, 11, 12)]
    result = bootstrap_auroc_difference_over_seeds(samples, n_resamples=300, seed=4)
    averaged = np.mean([np.subtract(*resampled_mean_aurocs(y, a, b, n_resamples=300, seed=4).T)
                        for y, a, b in samples], axis=0)
    assert (result.ci_low, result.ci_high) == tuple(np.quantile(averaged, [0.025, 0.975]))  # exactly 2.5 / 97.5
    singles = [bootstrap_auroc_difference(y, a, b, n_resamples=300, seed=4) for y, a, b in samples]
    assert result.estimate == pytest.approx(np.mean([r.estimate for r in singles]), abs=1e-15)
    assert (result.n_resamples, result.n_skipped, result.seed) == (300, 0, 4)
    assert bootstrap_auroc_difference_over_seeds(samples[:1], n_resamples=300, seed=4) == singles[0]


def test_bootstrap_over_seeds_skips_a_resample_skipped_in_any_seed():
    y = np.array([[1, 0], [0, np.nan], [0, 0], [0, 1], [0, 0], [0, 0]], dtype=float)
    rng = np.random.default_rng(3)
    tiny = (y, rng.random(y.shape), rng.random(y.shape))
    large = _scores(seed=13, n=6, k=2, nan_fraction=0.0)
    skipped = np.isnan(resampled_mean_aurocs(*tiny, n_resamples=60, seed=1, stratify=False)[:, 0])
    skipped |= np.isnan(resampled_mean_aurocs(*large, n_resamples=60, seed=1, stratify=False)[:, 0])
    result = bootstrap_auroc_difference_over_seeds([tiny, large], n_resamples=60, seed=1, stratify=False)
    assert 0 < result.n_skipped == skipped.sum() and result.n_resamples == 60 - skipped.sum()


def test_bootstrap_refuses_mismatched_or_invalid_input():
    y, a, b = _scores(seed=7, n=50)
    with pytest.raises(ValueError, match="same"):
        bootstrap_auroc_difference(y, a, b[:, :2])
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        bootstrap_auroc_difference(np.where(np.isnan(y), 2.0, y), a, b)
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_auroc_difference(np.zeros_like(y), a, b)
    with pytest.raises(ValueError, match="confidence must be in"):
        bootstrap_auroc_difference(y, a, b, confidence=95)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_auroc_difference_over_seeds([])


def test_bootstrap_is_vectorised_2000_resamples_of_1000_images_and_3_labels():
    y, a, b = _scores(seed=8, n=1000, k=3)
    start = time.perf_counter()
    result = bootstrap_auroc_difference(y, a, b, n_resamples=2000)
    assert time.perf_counter() - start < 5.0  # a few tenths of a second when vectorised; a loop takes minutes
    assert result.n_resamples == 2000 and result.ci_low > 0


def test_label_strata_are_each_images_rarest_positive_label():
    y = np.array([[1, 1], [0, 1], [1, 0], [0, 0], [np.nan, 1], [1, np.nan]])
    # label 0: 3 known positives, label 1: 3 -> a tie, label 0 first; an image positive for none: stratum 2
    np.testing.assert_array_equal(label_strata(y), [0, 1, 0, 2, 1, 0])
    # without image 4, label 1 has 2 known positives and label 0 has 3: image 0 (positive for both) goes to 1
    np.testing.assert_array_equal(label_strata(y[[0, 1, 2, 3, 5]]), [1, 1, 0, 2, 0])
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 4)).astype(float) * (rng.random((200, 4)) < [0.05, 0.5, 0.2, 0.2])
    y[rng.random((200, 4)) < 0.1] = np.nan
    np.testing.assert_array_equal(label_strata(y), _reference_strata(y))


def test_stratified_replicates_equal_a_plain_loop_drawing_within_each_stratum():
    y, a, b = _scores(seed=6, n=90, k=3)
    ours = resampled_mean_aurocs(y, a, b, n_resamples=30, seed=5)
    np.testing.assert_allclose(ours, _reference_replicates(y, a, b, 30, seed=5, stratified=True), rtol=0, atol=1e-12)
    # One stratum (a single label, no positive: nothing to stratify) draws the same rows as no stratification.
    rows = np.stack(list(bootstrap_indices(50, 20, 3, np.zeros(50, int))))
    np.testing.assert_array_equal(rows, np.stack(list(bootstrap_indices(50, 20, 3))))


def test_a_rare_label_is_lost_in_unstratified_resamples_counted_and_kept_in_every_stratified_one():
    rng = np.random.default_rng(11)
    y = np.zeros((60, 2))
    y[[5, 40], 0] = 1  # 2 positives in 60 images
    y[:, 1] = rng.integers(0, 2, 60)
    a, b = y + rng.normal(0, 1, y.shape), y + rng.normal(0, 1.5, y.shape)
    plain = bootstrap_auroc_difference(y, a, b, n_resamples=1000, seed=0, stratify=False)
    # A resample loses label 0 when it draws neither positive: (58/60)^60 = 13% of resamples; counted by a loop.
    draws = np.random.default_rng(0).integers(0, 60, (1000, 60))
    lost = np.sum([len(np.unique(y[rows, 0])) < 2 or len(np.unique(y[rows, 1])) < 2 for rows in draws])
    assert plain.n_label_lost == lost and 0.08 < lost / 1000 < 0.18
    assert (plain.stratified, plain.n_skipped) == (False, 0)  # label 1 stays: no resample is skipped
    stratified = bootstrap_auroc_difference(y, a, b, n_resamples=1000, seed=0)
    assert (stratified.stratified, stratified.n_label_lost, stratified.n_skipped) == (True, 0, 0)
    for rows in bootstrap_indices(60, 1000, 0, label_strata(y)):
        assert y[rows, 0].sum() == 2
    assert stratified.estimate == plain.estimate


def test_bootstrap_p_value_is_one_for_identical_models_small_for_a_clearly_better_one_and_symmetric():
    rng = np.random.default_rng(12)
    y = rng.integers(0, 2, (300, 2)).astype(float)
    a = y + rng.normal(0, 0.7, y.shape)
    assert bootstrap_auroc_difference(y, a, a.copy(), n_resamples=500).p_value == 1.0
    better = bootstrap_auroc_difference(y, a, y + rng.normal(0, 2.0, y.shape), n_resamples=500)
    assert better.estimate > 0 and better.p_value == pytest.approx(2 / 501)  # no resampled difference <= 0
    close = y + rng.normal(0, 0.75, y.shape)
    forward = bootstrap_auroc_difference(y, a, close, n_resamples=500, seed=2)
    backward = bootstrap_auroc_difference(y, close, a, n_resamples=500, seed=2)
    differences = np.subtract(*resampled_mean_aurocs(y, a, close, n_resamples=500, seed=2).T)
    expected = 2 * (min(np.sum(differences <= 0), np.sum(differences >= 0)) + 1) / 501
    assert forward.p_value == backward.p_value == pytest.approx(min(1.0, expected))
    assert 0.01 < forward.p_value  # a small difference: not significant
