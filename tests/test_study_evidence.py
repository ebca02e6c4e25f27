"""The report's evidence sections (calibration, subgroups, external validation) on a fake study whose runs
carry the metrics of this medpeft; the references (equal-mass ECE, Brier, sklearn's AUROC per group) are
written out here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medpeft.errors import RunDirError
from medpeft.study.report import write_report
from medpeft.study.store import Store

from test_study_report import EXTERNAL, FAILED, LABELS, _groups, make_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    made = make_study(root, LABELS, failed=FAILED, evidence=True)
    write_report(root)
    return root, made, (root / "report" / "report.md").read_text()


def _ece(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Equal-mass ECE as written: sort by p, split into n_bins near-equal groups, weighted |rate - mean p|."""
    order = np.argsort(p, kind="stable")
    return sum(len(b) / len(y) * abs(y[b].mean() - p[b].mean()) for b in np.array_split(order, n_bins))


def _per_seed(made: dict, fraction: float, method: str):
    return [(c, m, p) for c, m, p in made["runs"].values() if c.fraction == fraction and c.method == method]


def _row(markdown: str, section: str, *cells: str) -> list[str]:
    """The cells of the Markdown table row of `section` that starts with `cells`."""
    start = "| " + " | ".join(cells) + " |"
    text = markdown.split(f"\n## {section}\n")[1].split("\n## ")[0]
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_calibration_table_is_the_seed_mean_of_ece_and_brier(study):
    root, made, markdown = study
    y = made["targets"]
    frame = pd.read_csv(root / "report" / "calibration.csv")
    assert len(frame) == 4 and set(frame["binning"]) == {"equal-mass"} and set(frame["n_bins"]) == {10}
    for _, row in frame.iterrows():
        cells = _per_seed(made, row["fraction"], row["method"])
        known = [~np.isnan(y[:, j]) for j in range(len(LABELS))]
        ece = np.mean([np.mean([_ece(y[k, j], p[k, j]) for j, k in enumerate(known)]) for _, _, p in cells])
        brier = np.mean([np.mean([np.mean((p[k, j] - y[k, j]) ** 2) for j, k in enumerate(known)])
                         for _, _, p in cells])
        assert row["seeds"] == len(cells)
        assert (row["ece_raw"], row["brier_raw"]) == pytest.approx((ece, brier))
        stored = np.mean([m["test"]["calibration"]["calibrated"]["mean_ece"] for _, m, _ in cells])
        assert row["ece_calibrated"] == pytest.approx(stored) and row["ece_calibrated"] != row["ece_raw"]
        shown = _row(markdown, "Calibration", f"chest_xray {100 * row['fraction']:g}%", row["method"])
        assert shown[3:5] == [f"{ece:.3f}", f"{row['ece_calibrated']:.3f}"] and shown[5] == f"{brier:.3f}"
    assert "ECE over 10 equal-mass bins" in markdown
    assert "](figures/reliability_0.png)" in markdown and (root / "report" / "figures" / "reliability_0.svg").is_file()
    tex = (root / "report" / "calibration.tex").read_text()
    assert tex.startswith(r"\begin{tabular}{llrrrrr}") and r"chest\_xray 100\%" in tex


def test_subgroup_table_has_the_worst_group_gap_sizes_and_small_groups(study):
    root, made, markdown = study
    y = made["targets"]
    groups = _groups(len(y))
    for fraction in (0.1, 1.0):
        for method in ("full", "lora"):
            cells = _per_seed(made, fraction, method)
            means, small = {}, {}
            for value in ("F", "M"):
                rows = groups["sex"] == value
                aurocs = []
                for _, _, p in cells:
                    per_label = []
                    for j in range(len(LABELS)):
                        known = rows & ~np.isnan(y[:, j])
                        per_label.append(roc_auc_score(y[known, j], p[known, j]))
                        small[value] = small.get(value, False) or min((y[known, j] == 1).sum(),
                                                                      (y[known, j] == 0).sum()) < 10
                    aurocs.append(np.mean(per_label))
                means[value] = 100 * np.mean(aurocs)
            assert not any(small.values())
            worst = min(means, key=means.get)
            shown = _row(markdown, "Subgroups", f"chest_xray {100 * fraction:g}%", method, "sex")
            n = {v: int((groups["sex"] == v).sum()) for v in ("F", "M")}
            assert shown[3:] == [worst, f"{means[worst]:.1f}", f"{max(means.values()) - means[worst]:.1f}",
                                 f"F {n['F']}, M {n['M']} (unknown {int((groups['sex'] == '').sum())})", "none"]
            site = _row(markdown, "Subgroups", f"chest_xray {100 * fraction:g}%", method, "site")
            assert site[3:] == ["A", site[4], "–", "A 142, B 8", "B (n=8)"]  # B is small: flagged, not ranked
    frame = pd.read_csv(root / "report" / "subgroups.csv", keep_default_na=False)
    assert list(frame.columns) == ["backbone", "dataset", "fraction", "method", "column", "group", "n", "n_unknown",
                                   "seeds", "mean_auroc", "small"]
    assert frame.loc[frame["group"] == "B", "small"].all() and not frame.loc[frame["group"] != "B", "small"].any()


def test_external_table_compares_internal_and_external_on_the_same_labels(study):
    root, made, markdown = study
    frame = pd.read_csv(root / "report" / "external.csv")
    assert len(frame) == 4 and set(frame["absent"]) == {"dark"} and set(frame["labels"]) == {"bright"}
    for _, row in frame.iterrows():
        cells = _per_seed(made, row["fraction"], row["method"])
        internal = np.array([100 * m["test"]["per_label"]["bright"]["auroc"] for _, m, _ in cells])
        external = np.array([100 * json.loads((root / "runs" / c.key / "evaluations" / "external" / "metrics.json")
                                              .read_text())["per_label"]["bright"]["auroc"] for c, _, _ in cells])
        assert row["seeds"] == len(cells) and row["data"] == EXTERNAL
        assert (row["internal_mean"], row["internal_std"]) == pytest.approx((internal.mean(), internal.std(ddof=1)))
        assert (row["external_mean"], row["external_std"]) == pytest.approx((external.mean(), external.std(ddof=1)))
        assert row["drop"] == pytest.approx(np.mean(internal - external))
        shown = _row(markdown, "External validation", f"chest_xray {100 * row['fraction']:g}%", row["method"])
        assert shown[2:] == [EXTERNAL, str(len(cells)), f"{internal.mean():.1f} ± {internal.std(ddof=1):.1f}",
                             f"{external.mean():.1f} ± {external.std(ddof=1):.1f}",
                             f"{np.mean(internal - external):+.1f}", "dark"]


def test_runs_without_temperatures_show_no_calibrated_numbers(tmp_path):
    make_study(tmp_path, ["pneumonia"], seeds=(0,), fractions=(1.0,), evidence=True)
    store = Store(tmp_path / "study.sqlite")
    for row in store.frame().itertuples():
        row.metrics["test"]["calibration"] |= {"calibrated": None, "temperatures": None}
        store.mark_done(row.key, row.metrics, 512.0)
    store.close()
    write_report(tmp_path)
    frame = pd.read_csv(tmp_path / "report" / "calibration.csv")
    assert frame["ece_calibrated"].isna().all() and frame["ece_raw"].notna().all()
    shown = _row((tmp_path / "report" / "report.md").read_text(), "Calibration", "chest_xray 100%", "lora")
    assert shown[4] == "–" and shown[6] == "–"


def test_sections_without_data_are_one_line_not_an_empty_table(tmp_path):
    make_study(tmp_path, ["pneumonia"], seeds=(0,), fractions=(1.0,))
    html = write_report(tmp_path).read_text()
    markdown = (tmp_path / "report" / "report.md").read_text()
    for line in ("Calibration: no done cell has calibration metrics",
                 "Subgroups: no done cell has subgroup columns in its test data",
                 "External validation: no done cell has an external evaluation"):
        assert line in markdown
    assert html.count("<table") == 2  # the comparison and the pairwise table only
    assert not list((tmp_path / "report").glob("calibration.*")) and not list((tmp_path / "report").glob("external.*"))


def test_a_broken_external_evaluation_is_one_error_naming_its_file(tmp_path):
    made = make_study(tmp_path, ["pneumonia"], seeds=(0,), fractions=(1.0,), evidence=True)
    key = next(iter(made["runs"]))
    (tmp_path / "runs" / key / "evaluations" / "external" / "metrics.json").write_text('{"n": 3}')
    with pytest.raises(RunDirError, match=rf"{key}/evaluations/external/metrics.json: not the metrics of an "
                                          rf"evaluation"):
        write_report(tmp_path)
