"""The metric functions check their input at the boundary and refuse what they cannot score."""

import numpy as np
import pytest
import sklearn.exceptions
from sklearn.metrics import roc_auc_score

import medpeft.metrics
from medpeft.metrics import auroc, classification_metrics
from medpeft.metrics.compare import bootstrap_auroc_difference, delong_test
from medpeft.metrics.thresholds import select_threshold, select_thresholds

SCORES = np.array([0.1, 0.4, 0.35, 0.8])


def test_auroc_refuses_nan_in_y_true():
    with pytest.raises(ValueError, match=r"^y_true must hold only 0 and 1, got nan at index 1$"):
        auroc([0, np.nan, 1, 0], SCORES)


def test_auroc_refuses_a_label_other_than_0_and_1():
    with pytest.raises(ValueError, match=r"^y_true must hold only 0 and 1, got 2 at index 1$"):
        auroc([0, 2, 1, 0], SCORES)


def test_auroc_refuses_y_true_and_y_score_of_different_lengths():
    with pytest.raises(ValueError, match=r"^y_true \(4,\) and y_score \(3,\) must have the same length$"):
        auroc([0, 1, 1, 0], SCORES[:3])


def test_auroc_refuses_2d_input():
    with pytest.raises(ValueError, match=r"^y_true must be 1-D, got shape \(2, 2\)$"):
        auroc([[0, 1], [1, 0]], [[0.1, 0.2], [0.3, 0.4]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_auroc_refuses_non_finite_scores(bad):
    with pytest.raises(ValueError, match=rf"^y_score must be finite, got {bad} at index 2$"):
        auroc([0, 1, 1, 0], [0.1, 0.4, bad, 0.8])


def test_classification_metrics_refuses_targets_and_probs_of_different_shapes():
    with pytest.raises(ValueError, match=r"^targets \(4, 2\) and probs \(4, 3\) must have the same shape$"):
        classification_metrics(np.zeros((4, 2)), np.zeros((4, 3)), ["a", "b"], "multilabel")


def test_classification_metrics_refuses_a_label_count_other_than_the_columns():
    with pytest.raises(ValueError, match=r"must both be \(N, 3\)"):
        classification_metrics(np.zeros((4, 2)), np.zeros((4, 2)), ["a", "b", "c"], "multilabel")


def test_classification_metrics_refuses_a_target_other_than_0_1_or_nan_and_says_where():
    targets = np.array([[0, 1], [1, 0], [0, 0.5], [1, 1]])
    with pytest.raises(ValueError, match=r"^targets must hold only 0, 1 or NaN \(unknown\), got 0.5 at index \(2, 1\)$"):
        classification_metrics(targets, np.full((4, 2), 0.5), ["a", "b"], "multilabel")


def test_classification_metrics_refuses_a_non_finite_probability_of_a_known_target():
    probs = np.full((4, 2), 0.5)
    probs[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"^probs must be finite where the target is known, got nan at index \(3, 0\)$"):
        classification_metrics(np.array([[0, 1], [1, 0], [0, 0], [1, 1]]), probs, ["a", "b"], "multilabel")


def test_classification_metrics_masks_nan_targets_instead_of_refusing_them():
    targets = np.array([[0, 1], [np.nan, 0], [1, 0], [0, 1], [1, np.nan]])
    probs = np.array([[0.2, 0.9], [np.nan, 0.1], [0.7, 0.4], [0.6, 0.3], [0.4, 0.5]])  # unknown: score unused
    m = classification_metrics(targets, probs, ["a", "b"], "multilabel")
    for k, label in enumerate("ab"):
        known = ~np.isnan(targets[:, k])
        assert m["per_label"][label]["auroc"] == roc_auc_score(targets[known, k], probs[known, k])
        assert m["per_label"][label]["unknown"] == 1


def test_delong_refuses_scores_of_a_different_length():
    with pytest.raises(ValueError, match=r"^targets \(4,\) and scores_b \(5,\) must have the same length$"):
        delong_test([0, 1, 1, 0], SCORES, np.append(SCORES, 0.5))


def test_delong_refuses_a_non_finite_score_of_a_known_target():
    with pytest.raises(ValueError, match=r"^scores_a must be finite where the target is known, got inf at index 0$"):
        delong_test([0, 1, 1, 0], [np.inf, 0.4, 0.35, 0.8], SCORES)


def test_bootstrap_refuses_a_non_finite_score_of_a_known_target():
    with pytest.raises(ValueError, match=r"^scores_b must be finite where the target is known, got nan at index 3$"):
        bootstrap_auroc_difference([0, 1, 1, 0], SCORES, [0.1, 0.4, 0.35, np.nan], n_resamples=10)


def test_select_threshold_refuses_a_label_other_than_0_1_or_nan():
    with pytest.raises(ValueError, match=r"^y_true must hold only 0, 1 or NaN \(unknown\), got -1 at index 0$"):
        select_threshold([-1, 1, 1, 0], SCORES)


def test_select_threshold_ignores_the_score_of_an_unknown_target():
    assert select_threshold([0, np.nan, 1, 0], [0.1, np.nan, 0.35, 0.8]) == 0.35 == select_threshold(
        [0, 1, 0], [0.1, 0.35, 0.8])


def test_select_thresholds_refuses_targets_and_probs_of_different_shapes():
    with pytest.raises(ValueError, match=r"^targets \(4, 1\) and probs \(4, 2\) must have the same shape$"):
        select_thresholds(np.zeros((4, 1)), np.zeros((4, 2)), ["a"])


def test_undefined_auroc_warns_with_scikit_learns_warning_class():
    assert medpeft.metrics.UndefinedMetricWarning is sklearn.exceptions.UndefinedMetricWarning
    with pytest.warns(sklearn.exceptions.UndefinedMetricWarning, match="for: b"):
        classification_metrics(np.array([[0, 1], [1, 1], [1, 1]]), np.full((3, 2), 0.5), ["a", "b"], "multilabel")
