"""The report's verdicts: difference, CI and test from the same paired seeds, p-values adjusted across the
pairwise table, significant wins counted, and the direction of every significant DeLong test. The
references (AUROC, Holm, Benjamini-Hochberg, a plain bootstrap) are written out here."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medpeft.errors import ConfigError
from medpeft.study.report import write_report

from test_study_report import LABELS, make_study


def _mean_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """sklearn's AUROC per label over its known rows, averaged over the labels with both classes."""
    areas = [roc_auc_score(y[known, j], p[known, j]) for j in range(y.shape[1])
             for known in [~np.isnan(y[:, j])] if len(set(y[known, j])) == 2]
    return float(np.mean(areas))


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm 1979 as written: step down from the smallest p, multiplier m - i, never decreasing, at most 1."""
    order, m, out, running = np.argsort(p), len(p), np.empty(len(p)), 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        out[k] = running
    return out


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg 1995 as written: step up from the largest p, m / rank, never increasing, at most 1."""
    order, m, out, running = np.argsort(p), len(p), np.empty(len(p)), 1.0
    for i in range(m - 1, -1, -1):
        k = order[i]
        running = min(running, m * p[k] / (i + 1))
        out[k] = running
    return out


def _report(root) -> tuple[pd.DataFrame, str]:
    write_report(root)
    return pd.read_csv(root / "report" / "pairwise.csv"), (root / "report" / "report.md").read_text()


def test_difference_ci_and_test_come_from_the_same_paired_seeds(tmp_path):
    """The bug: lora seeds 0-3, full seeds 0-1. lora is worse than full in the seeds both have and far
    better in its extra seeds; the difference used to average every finished seed (+1.0 points) while the
    CI used the paired ones only ([-14.5, -5.2]). Now everything comes from seeds 0 and 1."""
    signal = {("full", s): 1.7 for s in (0, 1)} | {("lora", 0): 1.0, ("lora", 1): 1.0, ("lora", 2): 8.0,
                                                   ("lora", 3): 8.0}
    made = make_study(tmp_path, LABELS, seeds={"lora": (0, 1, 2, 3), "full": (0, 1)}, fractions=(1.0,),
                      signal=lambda cell: signal[cell.method, cell.seed])
    pairwise, markdown = _report(tmp_path)
    row = pairwise.iloc[0]
    y, probs = made["targets"], {(c.method, c.seed): p for c, _, p in made["runs"].values()}
    all_seeds = np.mean([_mean_auroc(y, probs["lora", s]) for s in range(4)]) - np.mean(
        [_mean_auroc(y, probs["full", s]) for s in range(2)])
    assert all_seeds > 0  # the old report's difference: the wrong sign
    paired = np.mean([_mean_auroc(y, probs["lora", s]) - _mean_auroc(y, probs["full", s]) for s in (0, 1)])
    assert row["difference"] == pytest.approx(100 * paired)
    assert row["ci_low"] <= row["difference"] <= row["ci_high"] < 0
    assert row["compared_seeds"] == "0, 1" and row["missing_seeds"] == "full lacks seeds 2, 3"
    assert row["verdict"] == "loss" and row["p_adjusted"] < 0.05
    assert "chest_xray 100%: full lacks seeds 2, 3: compared on seeds 0, 1." in markdown
    assert "lora beats full in 0 of 1 tasks; it loses in 1: chest_xray 100%; no significant difference in 0." \
        in markdown


def test_p_values_are_adjusted_across_the_table_and_only_significant_wins_count(tmp_path):
    """Three tasks: lora far better (1%), no better (10%), far worse (100%), and a second method; the
    adjustment covers all six comparisons, Holm by default, Benjamini-Hochberg when the study says so."""
    strength = {0.01: (3.0, 1.0), 0.1: (1.0, 1.0), 1.0: (0.6, 3.0)}  # (lora, full)
    make_study(tmp_path, LABELS, seeds=(0, 1), fractions=tuple(strength),
               signal=lambda cell: strength[cell.fraction][cell.method == "full"])
    pairwise, markdown = _report(tmp_path)
    assert len(pairwise) == 3 and pairwise["p_value"].between(0, 1).all()
    assert list(pairwise["p_adjusted"]) == pytest.approx(list(_holm(pairwise["p_value"].to_numpy())))
    assert list(pairwise["verdict"]) == ["win", "no significant difference", "loss"]
    assert (np.sign(pairwise["difference"][[0, 2]]) == [1, -1]).all()
    assert re.search(r"lora beats full in 1 of 3 tasks, by at most \d+\.\d points; it loses in 1: chest_xray 100%; "
                     r"no significant difference in 1: chest_xray 10%\.", markdown)
    assert "adjusted across the 3 comparisons of this report with Holm (family-wise error)" in markdown

    (tmp_path / "study.yaml").write_text("name: toy-study\nreport: {correction: bh, alpha: 0.1}\n")
    pairwise, markdown = _report(tmp_path)
    assert list(pairwise["p_adjusted"]) == pytest.approx(list(_bh(pairwise["p_value"].to_numpy())))
    assert "with Benjamini-Hochberg (false discovery rate)" in markdown and "adjusted p < 0.1" in markdown
    assert "| task | difference (points) | 90% CI (points) |" in markdown


def test_unstratified_p_value_and_interval_equal_a_plain_paired_bootstrap(tmp_path):
    """With report.stratify false the bootstrap draws rows as rng.integers(0, n, n) per resample (seed 0):
    the report's CI and p-value equal that bootstrap written out with sklearn's AUROC, for one seed."""
    make_study(tmp_path, ["pneumonia"], seeds=(0,), fractions=(1.0,))
    (tmp_path / "study.yaml").write_text("name: toy-study\nreport: {stratify: false}\n")
    pairwise, markdown = _report(tmp_path)
    row = pairwise.iloc[0]
    runs = {path.name.split("__")[2]: pd.read_csv(path / "predictions.csv") for path in (tmp_path / "runs").iterdir()}
    test = {m: t[t["split"] == "test"].sort_values("image_id") for m, t in runs.items()}
    known = test["lora"]["target:pneumonia"].notna().to_numpy()
    y = test["lora"]["target:pneumonia"].to_numpy()[known]
    a, b = (test[m]["prob:pneumonia"].to_numpy()[known] for m in ("lora", "full"))
    rows_known = np.flatnonzero(known)
    rng, differences = np.random.default_rng(0), []
    for _ in range(2000):
        rows = rng.integers(0, len(known), len(known))
        kept = np.searchsorted(rows_known, rows[known[rows]])  # the drawn rows whose target is known
        differences.append(roc_auc_score(y[kept], a[kept]) - roc_auc_score(y[kept], b[kept]))
    differences = np.array(differences)
    low, high = np.quantile(differences, [0.025, 0.975])
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((100 * low, 100 * high))
    share = min((differences <= 0).sum(), (differences >= 0).sum())
    assert row["p_value"] == pytest.approx(min(1.0, 2 * (share + 1) / 2001))
    assert "within strata" not in markdown


def test_delong_seeds_significant_in_opposite_directions_are_not_called_consistent(tmp_path):
    """Seed 0: lora far ahead; seed 1: full far ahead. Each seed's DeLong p is tiny, in opposite directions."""
    signal = {("lora", 0): 5.0, ("full", 0): 0.3, ("lora", 1): 0.3, ("full", 1): 5.0}
    made = make_study(tmp_path, ["pneumonia"], seeds=(0, 1), fractions=(1.0,),
                      signal=lambda cell: signal[cell.method, cell.seed])
    pairwise, markdown = _report(tmp_path)
    row = pairwise.iloc[0]
    y, probs = made["targets"][:, 0], {(c.method, c.seed): p[:, 0] for c, _, p in made["runs"].values()}
    known = ~np.isnan(y)
    ahead = [roc_auc_score(y[known], probs["lora", s][known]) - roc_auc_score(y[known], probs["full", s][known])
             for s in (0, 1)]
    assert ahead[0] > 0.2 and ahead[1] < -0.2 and row["delong_max_p"] < 1e-6
    assert (row["delong_favour_method"], row["delong_favour_reference"], row["delong_opposite"]) == (0, 0, 1)
    assert "in every seed" not in markdown
    assert "p < 0.05 in opposite directions in different seeds" in markdown


def test_delong_names_the_method_every_seed_favours(tmp_path):
    make_study(tmp_path, LABELS + ["gray"], seeds=(0, 1), fractions=(1.0,),
               signal=lambda cell: {"lora": 0.5, "full": 4.0}[cell.method])
    pairwise, markdown = _report(tmp_path)
    row = pairwise.iloc[0]
    assert (row["delong_favour_method"], row["delong_favour_reference"], row["delong_opposite"]) == (0, 3, 0)
    assert "of 3 labels, p < 0.05 in every seed: 0 favouring lora, 3 favouring full" in markdown
    assert row["verdict"] == "loss"


@pytest.mark.parametrize("report, message", [
    ("{correction: bonferroni}", r"study.yaml: report.correction must be one of \['holm', 'bh'\]"),
    ("{alpha: 0.5}", r"study.yaml: report.alpha must be in \(0, 0.5\), got 0.5"),
    ("{stratified: true}", "study.yaml: config key 'report.stratified' does not exist"),
    ("[holm]", "study.yaml: report must be a mapping"),
])
def test_bad_report_options_fail_in_one_line(tmp_path, report, message):
    make_study(tmp_path, ["pneumonia"], seeds=(0,), fractions=(1.0,))
    (tmp_path / "study.yaml").write_text(f"name: toy-study\nreport: {report}\n")
    with pytest.raises(ConfigError, match=message):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_a_task_without_a_seed_both_finished_is_named_not_tested(tmp_path):
    make_study(tmp_path, ["pneumonia"], seeds={"lora": (0,), "full": (1,)}, fractions=(1.0,))
    pairwise, markdown = _report(tmp_path)
    row = pairwise.iloc[0]
    assert row["verdict"] == "not compared" and np.isnan(row["p_adjusted"]) and np.isnan(row["difference"])
    assert row["missing_seeds"] == "lora lacks seed 1; full lacks seed 0"
    assert "lora and full have no task with a seed both finished." in markdown
    assert "| chest_xray 100% | – | – | – | not compared | none | – |" in markdown
    assert "chest_xray 100%: lora lacks seed 1; full lacks seed 0: no seed to compare." in markdown
