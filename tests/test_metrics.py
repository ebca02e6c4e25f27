import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from medpeft.metrics import UndefinedMetricWarning, auroc, classification_metrics


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_scikit_learn_including_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auroc_of_perfect_and_reversed_scores():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(y, np.full(4, 0.5)) == 0.5


def test_single_class_label_is_undefined_left_out_of_mean_and_warned():
    rng = np.random.default_rng(0)
    targets = np.stack([rng.integers(0, 2, 50), np.zeros(50, int), rng.integers(0, 2, 50)], 1)
    probs = rng.random((50, 3))
    with pytest.warns(UndefinedMetricWarning, match="AUROC undefined .* for: b"):
        m = classification_metrics(targets, probs, ["a", "b", "c"], "multilabel")
    assert m["per_label"]["b"]["auroc"] is None and m["undefined"] == ["b"]
    expected = np.mean([roc_auc_score(targets[:, k], probs[:, k]) for k in (0, 2)])
    assert m["mean_auroc"] == pytest.approx(expected, abs=1e-12)


def test_metrics_are_computed_over_the_whole_split_not_averaged_over_batches():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, (64, 2))
    probs = rng.random((64, 2))
    whole = classification_metrics(targets, probs, ["a", "b"], "multilabel")
    batches = [classification_metrics(targets[i:i + 16], probs[i:i + 16], ["a", "b"], "multilabel")["mean_auroc"]
               for i in range(0, 64, 16)]
    reference = np.mean([roc_auc_score(targets[:, k], probs[:, k]) for k in range(2)])
    assert whole["mean_auroc"] == pytest.approx(reference, abs=1e-12)
    assert abs(np.mean(batches) - reference) > 1e-6
    assert whole["per_label"]["a"]["auprc"] == pytest.approx(average_precision_score(targets[:, 0], probs[:, 0]))


def test_multiclass_adds_accuracy_and_macro_f1():
    rng = np.random.default_rng(2)
    classes = rng.integers(0, 3, 90)
    targets = np.eye(3)[classes]
    logits = rng.normal(size=(90, 3)) + 1.5 * targets
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(targets, probs, ["n", "b", "v"], "multiclass")
    assert m["accuracy"] == pytest.approx(accuracy_score(classes, probs.argmax(1)))
    assert m["macro_f1"] == pytest.approx(f1_score(classes, probs.argmax(1), average="macro"))
    assert m["per_label"]["b"]["auroc"] == pytest.approx(roc_auc_score(classes == 1, probs[:, 1]))


def test_unknown_targets_are_left_out_of_each_label_metric():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2, (40, 2)).astype(float)
    probs = rng.random((40, 2))
    masked = targets.copy()
    masked[:10, 0] = np.nan
    m = classification_metrics(masked, probs, ["a", "b"], "multilabel")
    assert m["per_label"]["a"]["auroc"] == pytest.approx(roc_auc_score(targets[10:, 0], probs[10:, 0]))
    assert m["per_label"]["a"]["unknown"] == 10 and m["per_label"]["b"]["unknown"] == 0
    assert m["per_label"]["b"]["auroc"] == pytest.approx(roc_auc_score(targets[:, 1], probs[:, 1]))


def test_masked_bce_ignores_unknown_targets():
    import torch

    from medpeft.train.components import masked_bce

    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.allclose(masked_bce(logits, targets), expected)
    assert masked_bce(logits, torch.full((2, 2), float("nan"))).item() == 0.0
