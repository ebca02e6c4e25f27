"""The study report on a fake study: a real store, generated predictions and metrics computed from them."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medpeft.errors import DataError, RunDirError
from medpeft.files import write_json_atomic
from medpeft.metrics import classification_metrics
from medpeft.metrics.calibration import apply_temperature, calibration_metrics, fit_temperature
from medpeft.metrics.compare import bootstrap_auroc_difference, delong_test
from medpeft.metrics.subgroups import subgroup_metrics
from medpeft.study.report import write_report
from medpeft.study.spec import Cell
from medpeft.study.store import Store

N_VAL, N_TEST = 60, 150
SIGNAL = {"full": 0.7, "lora": 2.0}  # lora's probabilities separate the classes far better
TRAINABLE = {"full": 100.0, "lora": 1.5}
LABELS = ["bright", "dark"]
FAILED = "vit__chest_xray__full__f1__s2"
EXTERNAL = "other.csv"  # the external data of the evidence fixture, which has the first label only


def _groups(n: int) -> dict[str, np.ndarray]:
    """Subgroup columns of the test images: sex F / M with a few unknown, site A with a small site B."""
    rng = np.random.default_rng(1)
    sex = rng.choice(["F", "M"], n)
    sex[rng.random(n) < 0.05] = ""
    return {"sex": sex, "site": np.where(np.arange(n) < 8, "B", "A")}


def _evidence(index: int, run_dir, metrics: dict, y: np.ndarray, probs: np.ndarray, split: np.ndarray, strength: float):
    """What a run of this medpeft adds: test calibration (raw, and temperature-scaled with temperatures fitted
    on val), test subgroups, and an external evaluation on data with the first label only (weaker signal)."""
    names = metrics["labels"]
    logits = np.log(probs) - np.log1p(-probs)
    temperatures = fit_temperature(logits[split == "val"], y[split == "val"], "multilabel")
    test_y, test_p = y[split == "test"], probs[split == "test"]
    metrics["test"]["calibration"] = {
        "binning": "equal-mass", "n_bins": 10, "raw": calibration_metrics(test_y, test_p, names),
        "calibrated": calibration_metrics(test_y, apply_temperature(logits[split == "test"], temperatures,
                                                                    "multilabel"), names),
        "temperatures": dict(zip(names, temperatures))}
    metrics["test"]["subgroups"] = subgroup_metrics(test_y, test_p, names, _groups(len(test_y)), n_resamples=100)
    rng = np.random.default_rng(1000 + index)
    external_y = rng.integers(0, 2, (200, 1)).astype(float)
    external_p = 1 / (1 + np.exp(-(strength / 2 * external_y + rng.normal(size=external_y.shape))))
    evaluation = classification_metrics(external_y, external_p, names[:1], "multilabel")
    evaluation["evaluation"] = {"name": "external", "data": {"format": "csv", "csv": EXTERNAL}, "split": "all",
                                "calibrated": False, "label_map": {n: n if n == names[0] else None for n in names},
                                "absent": names[1:]}
    (run_dir / "evaluations" / "external").mkdir(parents=True)
    write_json_atomic(run_dir / "evaluations" / "external" / "metrics.json", evaluation)


def make_study(root, labels, seeds=(0, 1, 2), fractions=(0.1, 1.0), failed=None, backbones=("vit",),
               datasets=("chest_xray",), signal=None, evidence=False) -> dict:
    """A study directory with every cell done (but `failed`); returns the test targets of the first dataset
    and, per key, (cell, metrics, test probabilities). Each dataset's labels: `labels` or a dict of them;
    `seeds`: the seeds of every method or a dict of them per method; `signal(cell)`: how far the cell's
    probabilities separate the classes (default: by method and fraction); `evidence`: the test metrics hold
    calibration and subgroups, and each run has an external evaluation (`_evidence`)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.yaml").write_text("name: toy-study\n")
    labels = labels if isinstance(labels, dict) else {d: labels for d in datasets}
    ids = np.array([f"img{i:03d}" for i in range(N_VAL + N_TEST)])
    split = np.array(["val"] * N_VAL + ["test"] * N_TEST)
    rng = np.random.default_rng(0)
    targets = {d: rng.integers(0, 2, (len(ids), len(labels[d]))).astype(float) for d in datasets}
    for y in targets.values():
        y[rng.random(y.shape) < 0.05] = np.nan
    seeds = seeds if isinstance(seeds, dict) else {m: seeds for m in SIGNAL}
    signal = signal or (lambda cell: SIGNAL[cell.method] * cell.fraction ** 0.2)
    cells = [Cell(b, d, m, f, s, config={})
             for b in backbones for d in datasets for m in SIGNAL for f in fractions for s in seeds[m]]
    store = Store(root / "study.sqlite")
    store.sync(cells, root / "runs")
    runs = {}
    for i, cell in enumerate(cells):
        if cell.key == failed:
            store.mark_failed(cell.key, "CUDA out of memory")
            continue
        y, names = targets[cell.dataset], labels[cell.dataset]
        noise = np.random.default_rng(100 + i).normal(size=y.shape)
        probs = 1 / (1 + np.exp(-(signal(cell) * np.nan_to_num(y) + noise)))
        metrics = {"method": cell.method, "model": cell.backbone, "labels": names, "task": "multilabel",
                   "parameters": {"trainable": int(TRAINABLE[cell.method] * 1e4), "backbone": 1_000_000,
                                  "trainable_percent": TRAINABLE[cell.method]},
                   "wall_time_s": 10.0 + i,
                   **{s: classification_metrics(y[split == s], probs[split == s], names, "multilabel")
                      for s in ("val", "test")}}
        predictions = pd.concat([pd.DataFrame({"image_id": ids, "split": split}),
                                 pd.DataFrame(probs, columns=[f"prob:{label}" for label in names]),
                                 pd.DataFrame(y, columns=[f"target:{label}" for label in names])], axis=1)
        run_dir = root / "runs" / cell.key
        run_dir.mkdir(parents=True)
        if evidence:
            _evidence(i, run_dir, metrics, y, probs, split, signal(cell))
        predictions.sample(frac=1, random_state=i).to_csv(run_dir / "predictions.csv", index=False)  # any row order
        store.mark_done(cell.key, metrics, 512.0)
        runs[cell.key] = (cell, metrics, probs[split == "test"])
    store.close()
    return {"runs": runs, "targets": targets[datasets[0]][split == "test"]}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    made = make_study(root, LABELS, failed=FAILED)
    return root, made, write_report(root)


def _seed_values(runs: dict, method: str, fraction: float) -> np.ndarray:
    return np.array([100 * m["test"]["mean_auroc"] for c, m, _ in runs.values()
                     if c.method == method and c.fraction == fraction])


def test_writes_every_file(study):
    root, _, html_path = study
    out = root / "report"
    assert html_path == out / "report.html"
    for name in ("results.csv", "comparison.csv", "comparison.tex", "pairwise.csv", "report.md", "report.html"):
        assert (out / name).is_file(), name
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pngs) == 3 and len(list((out / "figures").glob("*.svg"))) == 3
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 200
        assert png.stat().st_size > 10_000
    assert not list(out.rglob("*.tmp"))


def test_results_have_one_row_per_cell(study):
    root, made, _ = study
    results = pd.read_csv(root / "report" / "results.csv")
    assert len(results) == 12
    failed = results[results["key"] == FAILED].iloc[0]
    assert failed["status"] == "failed" and failed["error"] == "CUDA out of memory"
    assert np.isnan(failed["test_mean_auroc"])
    cell, metrics, _ = next(iter(made["runs"].values()))
    row = results[results["key"] == cell.key].iloc[0]
    for label in LABELS:
        assert row[f"test_auroc:{label}"] == pytest.approx(metrics["test"]["per_label"][label]["auroc"])
    assert row["trainable_percent"] == TRAINABLE[cell.method] and row["peak_memory_mb"] == 512.0


def test_comparison_numbers_and_best_mark(study):
    root, made, _ = study
    comparison = pd.read_csv(root / "report" / "comparison.csv").set_index("method")
    for method in SIGNAL:
        assert comparison.loc[method, "trainable_percent"] == TRAINABLE[method]
        for fraction in (0.1, 1.0):
            values = _seed_values(made["runs"], method, fraction)
            column = f"chest_xray {100 * fraction:g}%"
            assert comparison.loc[method, f"{column}:mean"] == pytest.approx(values.mean())
            assert comparison.loc[method, f"{column}:sd"] == pytest.approx(values.std(ddof=1))
            assert comparison.loc[method, f"{column}:n"] == len(values)
    assert comparison.loc["full", "chest_xray 100%:n"] == 2  # the failed seed

    markdown = (root / "report" / "report.md").read_text()
    lora_row = next(line for line in markdown.splitlines() if line.startswith("| lora |"))
    full_row = next(line for line in markdown.splitlines() if line.startswith("| full |"))
    assert lora_row.count("**") == 4 and "**" not in full_row
    assert "(n=2)" in full_row  # seeds differ between cells, so n is shown
    lora_mean = _seed_values(made["runs"], "lora", 0.1).mean()
    assert f"**{lora_mean:.1f} ± " in lora_row

    tex = (root / "report" / "comparison.tex").read_text()
    assert tex.startswith(r"\begin{tabular}{lrrr}") and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"vit / chest\_xray 10\%" in tex and r"trainable \%" in tex
    lora_tex = next(line for line in tex.splitlines() if line.startswith("lora"))
    assert lora_tex.count(r"\textbf{") == 2 and r"$\pm$" in lora_tex


def test_verdict_bootstrap_and_delong(study):
    root, made, _ = study
    markdown = (root / "report" / "report.md").read_text()
    assert re.search(r"lora beats full in 2 of 2 tasks, by at most \d+\.\d points; it loses in 0; "
                     r"no significant difference in 0\.", markdown)
    pairwise = pd.read_csv(root / "report" / "pairwise.csv")
    assert list(pairwise["fraction"]) == [0.1, 1.0] and list(pairwise["compared_seeds"]) == ["0, 1, 2", "0, 1"]
    assert list(pairwise["missing_seeds"].fillna("")) == ["", "full lacks seed 2"] and list(pairwise["verdict"]) == ["win"] * 2
    assert (pairwise["ci_low"] > 0).all() and (pairwise["ci_low"] < pairwise["difference"]).all()
    assert (pairwise["difference"] < pairwise["ci_high"]).all()

    runs, y = made["runs"], made["targets"]
    for _, row in pairwise.iterrows():
        probs = {(c.method, c.seed): p for c, _, p in runs.values() if c.fraction == row["fraction"]}
        seeds = sorted({s for m, s in probs if m == "full"})
        lora, full = (np.mean([100 * m["test"]["mean_auroc"] for c, m, _ in runs.values()
                               if c.method == method and c.fraction == row["fraction"] and c.seed in seeds])
                      for method in ("lora", "full"))
        assert row["difference"] == pytest.approx(lora - full)  # the seeds both finished
        tests = [[delong_test(y[:, j], probs["lora", s][:, j], probs["full", s][:, j]) for s in seeds]
                 for j in range(len(LABELS))]
        favour = sum(all(t.p_value < 0.05 and t.difference > 0 for t in label) for label in tests)
        assert row["delong_favour_method"] == favour and row["n_labels"] == 2
        assert row["delong_favour_reference"] == 0 and row["delong_opposite"] == 0
    assert "of 2 labels, p < 0.05 in every seed: " in markdown
    assert "chest_xray 100%: full lacks seed 2: compared on seeds 0, 1." in markdown


def test_single_label_task_matches_direct_calls(tmp_path):
    made = make_study(tmp_path, ["pneumonia"], seeds=(0,), fractions=(1.0,))
    write_report(tmp_path)
    row = pd.read_csv(tmp_path / "report" / "pairwise.csv").iloc[0]
    probs = {c.method: p for c, _, p in made["runs"].values()}
    y = made["targets"]
    assert row["delong_max_p"] == pytest.approx(delong_test(y[:, 0], probs["lora"][:, 0], probs["full"][:, 0]).p_value)
    direct = bootstrap_auroc_difference(y, probs["lora"], probs["full"], n_resamples=2000, seed=0)
    assert row["ci_low"] == pytest.approx(100 * direct.ci_low) and row["ci_high"] == pytest.approx(100 * direct.ci_high)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "lora beats full in 1 of 1 tasks" in markdown
    assert "Test mean AUROC (points, one seed)" in markdown and "mean ± sd over seeds" not in markdown


def test_html_is_self_contained(study):
    root, _, html_path = study
    page = html_path.read_text()
    images = re.findall(r"<img [^>]*>", page)
    assert len(images) == 3
    assert all('src="data:image/png;base64,' in image and 'alt="' in image for image in images)
    assert page.count("<table") == 2  # the comparison and one pairwise table
    assert "http://" not in page and "https://" not in page
    assert "<h1>Study report: toy-study</h1>" in page and "CUDA out of memory" in page
    markdown = (root / "report" / "report.md").read_text()
    assert markdown.count("](figures/") == 3 and "11 done, 1 failed, 0 pending or running" in markdown
    assert "Test mean AUROC (points, mean ± sd over seeds)" in markdown


def test_backbones_become_a_row_level(tmp_path):
    make_study(tmp_path, {"chest_xray": LABELS, "pneumonia": ["pneumonia"]}, seeds=(0,), fractions=(0.5, 1.0),
               backbones=("vit", "resnet"), datasets=("chest_xray", "pneumonia"))
    write_report(tmp_path)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| backbone | method | trainable % | chest_xray 50% | chest_xray 100% | pneumonia 50% | pneumonia 100% |" \
        in markdown
    assert "lora beats full in 8 of 8 tasks" in markdown and "| resnet / pneumonia 50% |" in markdown
    assert len(list((tmp_path / "report" / "figures").glob("heatmap_*.png"))) == 2
    comparison = pd.read_csv(tmp_path / "report" / "comparison.csv")
    assert list(zip(comparison["backbone"], comparison["method"])) == [
        ("vit", "full"), ("vit", "lora"), ("resnet", "full"), ("resnet", "lora")]
    pairwise = pd.read_csv(tmp_path / "report" / "pairwise.csv")
    assert pairwise["delong_max_p"].notna().tolist() == [False, False, True, True] * 2  # single-label: max p


def test_mismatched_test_images_are_refused(tmp_path):
    made = make_study(tmp_path, LABELS, seeds=(0,), fractions=(1.0,))
    run_dir = next(tmp_path / "runs" / c.key for c, _, _ in made["runs"].values() if c.method == "lora")
    predictions = pd.read_csv(run_dir / "predictions.csv")
    predictions = predictions.drop(predictions.index[predictions["split"] == "test"][:5])
    predictions.to_csv(run_dir / "predictions.csv", index=False)
    with pytest.raises(DataError, match="test image sets differ"):
        write_report(tmp_path)


def test_refuses_a_folder_without_a_store_or_done_cells(tmp_path):
    with pytest.raises(RunDirError, match="study.sqlite"):
        write_report(tmp_path)
    store = Store(tmp_path / "study.sqlite")
    store.sync([Cell("vit", "chest_xray", "lora", 1.0, 0, config={})], tmp_path / "runs")
    store.close()
    with pytest.raises(RunDirError, match="no cell is done"):
        write_report(tmp_path)
