"""A generative study: the grid crosses generative methods (x fractions x seeds) over a generate config, each
cell is trained and measured with the study's extractor, and the report compares FID and the rest against
the share of parameters trained."""

import math

import pandas as pd
import pytest
import yaml

pytest.importorskip("diffusers")

from medpeft.data.phantoms import generate_phantoms  # noqa: E402
from medpeft.errors import ConfigError  # noqa: E402
from medpeft.study.report import write_report  # noqa: E402
from medpeft.study.runner import STORE, run_study  # noqa: E402
from medpeft.study.spec import load_study  # noqa: E402
from medpeft.study.store import Store  # noqa: E402

from conftest import TINY_VIT  # noqa: E402
from test_generate import tiny_model  # noqa: E402

LABELS = ["cardiomegaly", "pleural_effusion"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """Phantoms, a tiny pixel-space diffusion model in the diffusers layout and a classifier (the extractor)."""
    from medpeft import load_config, train

    folder = tmp_path_factory.mktemp("generative-study")
    generate_phantoms(folder / "phantoms", n_patients=60, size=32, seed=0)
    tiny_model(vae=False).save(folder / "base")
    data = {"csv": str(folder / "phantoms" / "labels.csv"), "labels": LABELS, "patient_column": "patient_id",
            "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}}
    train(load_config(base={"model": dict(TINY_VIT), "method": {"name": "full"}, "data": data,
                            "output_dir": str(folder / "judge"), "train": {"epochs": 1, "batch_size": 16}}), quiet=True)
    return folder, data


def study_file(path, setting, **sections):
    folder, data = setting
    spec = {"name": "gen", "base": {"model": {"source": str(folder / "base")}, "data": data,
                                    "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "device": "cpu"}},
            "axes": {"method": {"full": {}, "bias": {}, "lora": {"method": {"r": 2}}}},
            "generate": {"extractor": str(folder / "judge"), "n": 8, "steps": 2, "guidance": 2.0}, **sections}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_generative_study_trains_measures_and_reports_each_method(tmp_path, setting):
    methods = ("full", "bias")
    study = study_file(tmp_path / "study.yaml", setting, axes={"method": {m: {} for m in methods}})
    out = tmp_path / "out"
    assert run_study(study, out, quiet=True) == {"done": 2}
    store = Store(out / STORE)
    frame = store.frame().set_index("method")
    store.close()
    assert 0 < frame.loc["bias", "trainable_percent"] < frame.loc["full", "trainable_percent"]
    for method in methods:
        generated = frame.loc[method, "metrics"]["generated"]
        assert generated["images"] == 8 and generated["fid"] > 0
        assert (out / "runs" / frame.loc[method, "key"] / "evaluations" / "generated" / "metrics.json").is_file()
    assert run_study(study, out, quiet=True) == {"done": 2}  # nothing left: nothing runs again

    report = write_report(out).parent
    summary = pd.read_csv(report / "generated.csv").set_index("method")
    for method in methods:
        assert summary.loc[method, "fid:mean"] == pytest.approx(frame.loc[method, "metrics"]["generated"]["fid"])
        assert summary.loc[method, "label_fidelity:n"] == 1  # the judge scores the generated images' findings
    text = (report / "report.md").read_text()
    best = summary["fid:mean"].idxmin()
    assert f"lowest FID {summary.loc[best, 'fid:mean']:.4g} with {best}" in text
    below = int(summary.loc["bias", "fid:mean"] < summary.loc["full", "fid:mean"])
    assert f"{below} of 1 other methods below full fine-tuning's" in text
    assert (report / "figures" / "fid_vs_trainable.png").is_file()

    # How the cells are measured is part of them: a changed evaluation is refused for the same directory.
    spec = yaml.safe_load(study.read_text())
    spec["generate"]["n"] = 6
    study.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ConfigError, match="changed since they were added"):
        run_study(study, out, quiet=True)


def test_a_generative_study_cell_is_a_generate_config(tmp_path, setting):
    study = load_study(study_file(tmp_path / "study.yaml", setting))
    assert [c.method for c in study.cells] == ["full", "bias", "lora"]
    assert study.generate.n == 8 and study.generate.steps == 2
    lora = study.cells[2].config
    assert lora["method"] == {**lora["method"], "name": "lora", "r": 2} and "diffusion" in lora
    assert lora["data"]["mean"] == [0.5] * 3  # the generate defaults, not a classifier's
    hashes = {c.config_hash for c in study.cells}
    other = load_study(study_file(tmp_path / "other.yaml", setting, generate={
        "extractor": str(setting[0] / "judge"), "n": 8, "steps": 3, "guidance": 2.0}))
    assert hashes.isdisjoint(c.config_hash for c in other.cells)  # the evaluation settings are hashed
    grid = load_study(study_file(tmp_path / "grid.yaml", setting, axes={"method": {"bias": {}}, "fraction": [0.5, 1],
                                                                         "seed": [0, 1]}))
    assert [(c.fraction, c.config["data"]["split"]["label_fraction"], c.config["train"]["seed"])
            for c in grid.cells] == [(0.5, 0.5, 0), (0.5, 0.5, 1), (1.0, 1.0, 0), (1.0, 1.0, 1)]


@pytest.mark.parametrize("change, message", [
    ({"generate": {"extractor": "no-such-run"}}, "generate.extractor 'no-such-run': no such run directory"),
    ({"generate": {"extractor": "JUDGE", "steps": 0}}, "generate.steps"),
    ({"generate": {"extractor": "JUDGE", "sampler": "ddim"}}, "generate.sampler"),
    ({"tune": {"trials": 2}}, "tune does not apply to a generative study"),
    ({"axes": {"method": {"vpt": {}}}}, r"cell \(backbone=default, dataset=default, method=vpt"),
    ({"axes": {"method": {"lora": {"train": {"layer_decay": 0.75}}}}}, "train.layer_decay does not apply"),
])
def test_a_wrong_generative_study_is_one_error_naming_the_key(tmp_path, setting, change, message):
    if "generate" in change and change["generate"]["extractor"] == "JUDGE":
        change["generate"]["extractor"] = str(setting[0] / "judge")
    with pytest.raises(ConfigError, match=message) as error:
        load_study(study_file(tmp_path / "study.yaml", setting, **change))
    assert "\n" not in str(error.value) and "study.yaml" in str(error.value)


def test_the_summary_marks_the_best_mean_and_the_verdict_counts_methods_below_full():
    from medpeft.study.generative import MEASURES, summary_frame, summary_table, verdicts

    rows = []
    for method, share, fids in (("full", 100.0, [50.0, 54.0]), ("bias", 0.1, [40.0, 42.0]), ("lora", 1.0, [60.0])):
        for seed, value in enumerate(fids):
            rows.append({"backbone": "b", "dataset": "d", "fraction": 1.0, "method": method, "seed": seed,
                         "trainable_percent": share, **{k: 0.5 for k in MEASURES}, "fid": value})
    summary = summary_frame(pd.DataFrame(rows))
    assert summary.set_index("method").loc["full", "fid:mean"] == 52.0
    assert math.isnan(summary.set_index("method").loc["lora", "fid:sd"])
    assert verdicts(summary, multi_backbone=False) == [
        "d 100%: lowest FID 41 with bias (0.1% trainable); 1 of 2 other methods below full fine-tuning's 52 (bias)."]
    table = summary_table(summary, multi_backbone=False)
    assert (1, 3) in table.bold and (0, 3) not in table.bold  # bias has the lowest FID
    assert table.rows[2][3] == "60 (n=1)"  # seeds differ between methods: n is shown
