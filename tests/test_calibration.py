import numpy as np
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss, roc_auc_score

from medpeft.metrics.calibration import (
    apply_temperature,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_curve,
)


def _ece_by_loop(y, p, n_bins):
    """Equal-mass ECE written out: sort by p, bins of n // B images, the first n % B bins one more."""
    pairs = sorted(zip(p, y), key=lambda pair: pair[0])
    n, bins = len(pairs), min(n_bins, len(pairs))
    total, start = 0.0, 0
    for b in range(bins):
        size = n // bins + (1 if b < n % bins else 0)
        chunk = pairs[start:start + size]
        start += size
        mean_p = sum(q for q, _ in chunk) / size
        mean_y = sum(t for _, t in chunk) / size
        total += size / n * abs(mean_y - mean_p)
    assert start == n
    return total


def test_ece_of_a_four_image_example_worked_by_hand():
    y, p = np.array([1, 0, 0, 1]), np.array([0.2, 0.3, 0.6, 0.9])
    # 2 bins: {0.2 (y 1), 0.3 (y 0)}: |0.5 - 0.25| = 0.25; {0.6 (y 0), 0.9 (y 1)}: |0.5 - 0.75| = 0.25.
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.25, abs=1e-15)
    # 4 bins (and 10: fewer images than bins gives one bin per image): (0.8 + 0.3 + 0.6 + 0.1) / 4.
    assert expected_calibration_error(y, p, n_bins=4) == pytest.approx(0.45, abs=1e-15)
    assert expected_calibration_error(y, p) == pytest.approx(0.45, abs=1e-15)
    assert expected_calibration_error(y, np.array(y, float)) == 0.0  # perfectly sure and right


@pytest.mark.parametrize("n,n_bins", [(1000, 10), (997, 10), (53, 7), (5, 10)])
def test_ece_equals_a_brute_force_loop_on_random_data(n, n_bins):
    rng = np.random.default_rng(n)
    p = np.round(rng.random(n), 3)  # some ties
    y = (rng.random(n) < p ** 1.5).astype(int)  # miscalibrated
    assert expected_calibration_error(y, p, n_bins) == pytest.approx(_ece_by_loop(y, p, n_bins), abs=1e-12)


def test_brier_equals_sklearn_and_the_reliability_bins_hold_every_image_in_order():
    rng = np.random.default_rng(0)
    p = rng.random(103)
    y = (rng.random(103) < p).astype(int)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-14)
    curve = reliability_curve(y, p)
    assert curve["count"] == [11, 11, 11] + [10] * 7  # np.array_split: the first 103 % 10 bins one larger
    assert curve["predicted"] == sorted(curve["predicted"])
    ordered = np.argsort(p)
    assert curve["predicted"][0] == pytest.approx(p[ordered[:11]].mean())
    assert curve["observed"][-1] == pytest.approx(y[ordered[-10:]].mean())
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5 at index 1"):
        brier_score([0, 1], [0.2, 1.5])


def test_calibration_metrics_drops_unknown_targets_per_label_and_leaves_an_empty_label_out_of_the_means():
    rng = np.random.default_rng(1)
    probs = rng.random((200, 3))
    targets = (rng.random((200, 3)) < probs).astype(float)
    targets[rng.random(200) < 0.3, 0] = np.nan
    targets[:, 2] = np.nan
    probs_junk = np.where(np.isnan(targets), np.nan, probs)  # probabilities of unknown targets are never read
    out = calibration_metrics(targets, probs_junk, ["a", "b", "c"])
    known = ~np.isnan(targets[:, 0])
    assert out["per_label"]["a"]["ece"] == pytest.approx(_ece_by_loop(targets[known, 0], probs[known, 0], 10))
    assert out["per_label"]["a"]["brier"] == pytest.approx(brier_score_loss(targets[known, 0], probs[known, 0]))
    assert sum(out["per_label"]["a"]["reliability"]["count"]) == known.sum()
    assert out["per_label"]["c"] == {"ece": None, "brier": None, "reliability": None}
    assert out["mean_ece"] == pytest.approx((out["per_label"]["a"]["ece"] + out["per_label"]["b"]["ece"]) / 2)
    assert (out["binning"], out["n_bins"]) == ("equal-mass", 10)


def _numpy_bce(logits, targets):
    p = 1 / (1 + np.exp(-logits))
    known = ~np.isnan(targets)
    y, q = targets[known], p[known]
    return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))


def test_temperature_scaling_of_over_confident_multilabel_logits_lowers_nll_and_keeps_auroc():
    rng = np.random.default_rng(2)
    true_logits = rng.normal(0, 1.5, (4000, 3)) + np.array([0.0, -1.0, 1.0])
    targets = (rng.random(true_logits.shape) < 1 / (1 + np.exp(-true_logits))).astype(float)
    targets[rng.random(4000) < 0.2, 1] = np.nan
    logits = 3 * true_logits  # over-confident by a factor 3
    temperatures = fit_temperature(logits, targets, "multilabel")
    assert temperatures == pytest.approx([3, 3, 3], rel=0.1)
    calibrated = apply_temperature(logits, temperatures, "multilabel")
    before, after = _numpy_bce(logits, targets), _numpy_bce(logits / np.array(temperatures), targets)
    assert after < before - 0.05
    assert negative_log_likelihood(logits, targets, "multilabel") == pytest.approx(before, rel=1e-9)
    assert negative_log_likelihood(logits, targets, "multilabel", temperatures) == pytest.approx(after, rel=1e-9)
    for k in range(3):
        known = ~np.isnan(targets[:, k])
        assert roc_auc_score(targets[known, k], calibrated[known, k]) == pytest.approx(
            roc_auc_score(targets[known, k], logits[known, k]), abs=1e-12)
    raw = calibration_metrics(targets, 1 / (1 + np.exp(-logits)), list("abc"))
    scaled = calibration_metrics(targets, calibrated, list("abc"))
    assert scaled["mean_ece"] < raw["mean_ece"] and scaled["mean_brier"] < raw["mean_brier"]


def test_a_label_without_both_classes_keeps_temperature_one():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(50, 2))
    targets = np.stack([rng.integers(0, 2, 50), np.zeros(50)], axis=1).astype(float)
    assert fit_temperature(logits, targets, "multilabel")[1] == 1.0


def test_temperature_scaling_of_a_multiclass_task_fits_one_t_lowers_nll_and_keeps_accuracy():
    rng = np.random.default_rng(4)
    true_logits = rng.normal(0, 2, (3000, 4))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    classes = np.array([rng.choice(4, p=row) for row in p])
    targets = np.eye(4)[classes]
    logits = 2.5 * true_logits
    (temperature,) = fit_temperature(logits, targets, "multiclass")
    assert temperature == pytest.approx(2.5, rel=0.1)

    def cross_entropy(z):
        z = z - z.max(1, keepdims=True)
        return -np.mean(z[np.arange(len(z)), classes] - np.log(np.exp(z).sum(1)))

    assert cross_entropy(logits / temperature) < cross_entropy(logits) - 0.05
    calibrated = apply_temperature(logits, [temperature], "multiclass")
    np.testing.assert_allclose(calibrated.sum(1), 1.0)
    assert accuracy_score(classes, calibrated.argmax(1)) == accuracy_score(classes, logits.argmax(1))
    with pytest.raises(ValueError, match="1 value"):
        apply_temperature(logits, [1.0, 2.0], "multiclass")
    with pytest.raises(ValueError, match="task must be one of"):
        fit_temperature(logits, targets, "binary")
