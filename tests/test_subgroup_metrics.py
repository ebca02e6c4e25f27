import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medpeft.metrics.subgroups import MIN_COUNT, subgroup_metrics

LABELS = ["effusion", "nodule"]


def _data(seed=0, n=600):
    """Two labels, some unknown targets; the model is worse on sex 'F' and on the 80+ band."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["F", "M", ""], n, p=[0.45, 0.45, 0.1])
    age = rng.choice(["20-39", "40-59", "80+"], n, p=[0.45, 0.5, 0.05])
    y = (rng.random((n, 2)) < [0.4, 0.3]).astype(float)
    noise = np.where(((sex == "F") | (age == "80+"))[:, None], 2.0, 0.8)
    probs = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1, (n, 2)) * noise)))
    y[rng.random((n, 2)) < 0.1] = np.nan
    return y, probs, {"sex": sex, "age": age}


def test_per_group_auroc_equals_sklearn_on_the_groups_rows_and_the_worst_group_and_gap_are_found():
    y, probs, groups = _data()
    out = subgroup_metrics(y, probs, LABELS, groups, n_resamples=300)
    sex = out["sex"]
    assert list(sex["groups"]) == ["F", "M"] and sex["n_unknown"] == int(np.sum(groups["sex"] == ""))
    for value, metrics in sex["groups"].items():
        rows = groups["sex"] == value
        assert metrics["n"] == rows.sum()
        areas = []
        for k, label in enumerate(LABELS):
            known = rows & ~np.isnan(y[:, k])
            areas.append(roc_auc_score(y[known, k], probs[known, k]))
            assert metrics["per_label"][label] == pytest.approx(areas[-1], abs=1e-12)
            assert metrics["positives"][label] == int(np.sum(y[known, k] == 1))
            assert metrics["negatives"][label] == int(np.sum(y[known, k] == 0))
        assert metrics["mean_auroc"] == pytest.approx(np.mean(areas), abs=1e-12)
        assert metrics["ci_low"] < metrics["mean_auroc"] < metrics["ci_high"]
        assert not metrics["small"]
    assert (sex["worst"], sex["best"]) == ("F", "M")
    assert sex["worst_auroc"] == sex["groups"]["F"]["mean_auroc"]
    assert sex["gap"] == pytest.approx(sex["groups"]["M"]["mean_auroc"] - sex["groups"]["F"]["mean_auroc"])


def test_a_small_group_is_flagged_and_reported_but_left_out_of_worst_and_gap():
    y, probs, groups = _data()
    age = subgroup_metrics(y, probs, LABELS, groups, n_resamples=200)["age"]
    old = age["groups"]["80+"]
    assert old["small"] and min(min(old["positives"].values()), min(old["negatives"].values())) < MIN_COUNT
    assert old["mean_auroc"] is not None  # reported, not hidden
    assert old["mean_auroc"] < min(age["groups"][v]["mean_auroc"] for v in ("20-39", "40-59"))
    assert age["worst"] in ("20-39", "40-59") and age["gap"] is not None
    # With a threshold of 1 the 80+ group counts, and is the worst.
    loose = subgroup_metrics(y, probs, LABELS, groups, n_resamples=200, min_count=1)["age"]
    assert not loose["groups"]["80+"]["small"] and loose["worst"] == "80+"


def test_a_group_without_both_classes_is_small_with_no_auroc_and_one_good_group_has_no_gap():
    y = np.array([[1.0], [0.0], [1.0], [0.0], [1.0], [1.0]] * 10)
    probs = np.linspace(0, 1, 60)[:, None]
    site = np.array(["a"] * 40 + ["b"] * 20)
    y[40:] = 1.0  # site b: positives only
    out = subgroup_metrics(y, probs, ["x"], {"site": site}, n_resamples=100, min_count=5)["site"]
    b = out["groups"]["b"]
    assert (b["per_label"], b["mean_auroc"], b["ci_low"], b["ci_high"], b["small"]) == ({"x": None}, None, None,
                                                                                      None, True)
    assert (out["worst"], out["best"], out["gap"]) == ("a", "a", None)
    assert subgroup_metrics(y, probs, ["x"], {}) == {}


def test_refuses_a_group_column_of_the_wrong_length():
    y, probs, groups = _data(n=50)
    with pytest.raises(ValueError, match=r"groups\['sex'\] must hold one value per image \(50\), got shape \(49,\)"):
        subgroup_metrics(y, probs, LABELS, {"sex": groups["sex"][:49]})
