"""medpeft predict and the Python API behind it: thresholds, image kinds, bad input, several runs on one backbone."""

import json
import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
import yaml
from PIL import Image
from scipy.special import expit, logit
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from typer.testing import CliRunner

import medpeft
from medpeft.cli import app
from medpeft.config import config_from_dict
from medpeft.data.readers import read_dataset
from medpeft.errors import ConfigError, DataError, RunDirError
from medpeft.inference import predict
from medpeft.inference import UnreadableInputWarning
from medpeft.metrics.thresholds import select_threshold

PROBS = ["prob:bright", "prob:dark"]


def test_youden_threshold_is_the_hand_computed_roc_point():
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.3, 0.35, 0.6, 0.7, 0.9])
    # s >= 0.9: tpr 1/3 fpr 0 (J .33); >= 0.7: 2/3, 0 (J .67); >= 0.6: 2/3, 1/3 (.33); >= 0.35: 1, 1/3 (.67);
    # >= 0.3: 1, 2/3 (.33). J ties at 0.7 and 0.35: the higher threshold (more specific) is chosen.
    assert select_threshold(y, s) == 0.7
    assert select_threshold(y, s, "sensitivity:1.0") == 0.35
    assert select_threshold(y, s, "sensitivity:0.5") == 0.7
    assert select_threshold(np.append(y, np.nan), np.append(s, 0.95)) == 0.7  # unknown target left out
    assert select_threshold(np.zeros(4), np.arange(4.0)) is None
    with pytest.raises(ConfigError, match="sensitivity:X"):
        select_threshold(y, s, "specificity:0.9")


def _train(base: dict, name: str, method: dict, tmp_path_factory) -> str:
    config = json.loads(json.dumps(base))
    config["method"] = method
    config["output_dir"] = str(tmp_path_factory.mktemp("runs") / name)
    medpeft.train(config_from_dict(config), quiet=True)
    return config["output_dir"]


@pytest.fixture(scope="module")
def runs(squares_csv, tmp_path_factory):
    """Three finished runs on one random-init backbone (same seed): LoRA on q+v, linear probe, full."""
    from conftest import TINY_VIT

    base = {"model": dict(TINY_VIT),
            "data": {"csv": str(squares_csv), "patient_column": "patient", "labels": ["bright", "dark"],
                     "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
            "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0.5}}
    torch.manual_seed(0)
    return {name: _train(base, name, method, tmp_path_factory) for name, method in (
        ("lora", {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}),
        ("probe", {"name": "linear_probe"}),
        ("full", {"name": "full"}))}


def _test_images(run_dir: str) -> tuple[list[str], pd.DataFrame]:
    run = medpeft.load_run(run_dir)
    saved = pd.read_csv(f"{run_dir}/predictions.csv").query("split == 'test'")
    paths = read_dataset(run.config.data).set_index("image_id").loc[saved["image_id"], "path"].tolist()
    return paths, saved


def test_predict_on_png_reproduces_the_run_test_predictions_and_thresholds(runs):
    paths, saved = _test_images(runs["lora"])
    run = medpeft.load_run(runs["lora"])
    out = run.predict(paths)
    assert out["input"].tolist() == paths and (out["error"] == "").all()
    # predict gives the temperature-scaled probabilities; predictions.csv and thresholds.json the raw ones
    np.testing.assert_allclose(out[PROBS].to_numpy(), _scaled(run, saved[PROBS].to_numpy()), atol=1e-5)
    stored = json.loads(open(f"{runs['lora']}/thresholds.json").read())
    assert stored["rule"] == "youden"
    val = pd.read_csv(f"{runs['lora']}/predictions.csv").query("split == 'val'")
    for k, label in enumerate(("bright", "dark")):
        recomputed = select_threshold(val[f"target:{label}"].to_numpy(), val[f"prob:{label}"].to_numpy())
        assert stored["thresholds"][label] == pytest.approx(recomputed, rel=1e-7)  # the CSV holds float32 digits
        assert run.thresholds[label] == pytest.approx(_scaled(run, recomputed, k), rel=1e-6)
        assert (out[f"pred:{label}"] == (out[f"prob:{label}"] >= run.thresholds[label]).astype(int)).all()


def test_sensitivity_rule_calls_every_val_positive_positive(runs):
    run = medpeft.load_run(runs["lora"], threshold="sensitivity:1.0")
    val = pd.read_csv(f"{runs['lora']}/predictions.csv").query("split == 'val'")
    youden = medpeft.load_run(runs["lora"])
    for k, label in enumerate(("bright", "dark")):
        positives = val.loc[val[f"target:{label}"] == 1, f"prob:{label}"]
        assert _scaled(run, positives.min(), k) == pytest.approx(run.thresholds[label], rel=1e-6)
        assert run.thresholds[label] <= youden.thresholds[label]


def _scaled(run, probs, k=slice(None)):
    """Raw probabilities (predictions.csv) temperature-scaled by the run's calibration.json."""
    return expit(logit(probs) / np.asarray(run.temperatures)[k])


def _dicom(pixels: np.ndarray, path, pixel_data: bool = True) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    if pixel_data:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_jpeg_and_dicom_inputs_give_the_outputs_of_the_same_pixels(runs, tmp_path):
    paths, _ = _test_images(runs["lora"])
    pixels = np.asarray(Image.open(paths[0]).convert("L"))
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(np.asarray(Image.open(tmp_path / "a.jpg"))).save(tmp_path / "a_decoded.png")
    # 16-bit DICOM without a window: read_dicom scales min..max to 0..255.
    _dicom(pixels.astype(np.uint16) * 16 + 1000, tmp_path / "b.dcm")
    scaled = np.rint((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255).astype(np.uint8)
    Image.fromarray(scaled).save(tmp_path / "b_scaled.png")
    shutil.copy(tmp_path / "b.dcm", tmp_path / "c_no_suffix")  # PACS exports often lack the suffix

    out = medpeft.load_run(runs["lora"]).predict(tmp_path).set_index("input")
    assert (out["error"] == "").all() and len(out) == 5
    row = lambda name: out.loc[str(tmp_path / name), PROBS].to_numpy(dtype=float)  # noqa: E731
    np.testing.assert_allclose(row("a.jpg"), row("a_decoded.png"), atol=1e-6)
    np.testing.assert_allclose(row("b.dcm"), row("b_scaled.png"), atol=1e-6)
    np.testing.assert_allclose(row("c_no_suffix"), row("b.dcm"), atol=0)
    assert not np.allclose(row("a.jpg"), row("b.dcm"), atol=1e-4)  # the inputs do differ


def _bad_inputs(folder, good_png) -> dict:
    folder.mkdir()
    shutil.copy(good_png, folder / "good.png")
    Image.new("L", (1, 1)).save(folder / "one_pixel.png")
    rgba = Image.new("RGBA", (32, 32), (90, 90, 90, 255))
    rgba.putpixel((3, 3), (90, 90, 90, 0))
    rgba.save(folder / "transparent.png")
    Image.new("L", (32, 32)).save(folder / "ct.tiff", save_all=True, append_images=[Image.new("L", (32, 32))] * 4)
    _dicom(np.zeros((32, 32)), folder / "no_pixels.dcm", pixel_data=False)
    (folder / "text.png").write_text("not an image")
    return {"one_pixel.png": "1x1 pixels", "transparent.png": "transparent pixels", "ct.tiff": "5 frames",
            "no_pixels.dcm": "no pixel data", "text.png": "unreadable image"}


def test_unreadable_inputs_are_listed_with_the_reason(runs, tmp_path):
    paths, _ = _test_images(runs["lora"])
    expected = _bad_inputs(tmp_path / "in", paths[0])
    run = medpeft.load_run(runs["lora"])
    with pytest.warns(UnreadableInputWarning, match="5 of 6 inputs"):
        out = run.predict(tmp_path / "in").set_index("input")
    for name, reason in expected.items():
        row = out.loc[str(tmp_path / "in" / name)]
        assert reason in row["error"] and row[PROBS].isna().all() and row[["pred:bright", "pred:dark"]].isna().all()
    assert out.loc[str(tmp_path / "in" / "good.png"), "error"] == ""
    with pytest.raises(DataError, match="--strict"):
        run.predict(tmp_path / "in", strict=True)
    a_rgba_opaque = Image.open(paths[0]).convert("RGBA")
    assert (run.predict([a_rgba_opaque])[PROBS].to_numpy() == run.predict([paths[0]])[PROBS].to_numpy()).all()


def test_cli_predict_writes_the_table_and_strict_writes_nothing(runs, tmp_path):
    paths, _ = _test_images(runs["lora"])
    _bad_inputs(tmp_path / "in", paths[0])
    result = CliRunner().invoke(app, ["predict", runs["lora"], str(tmp_path / "in"), paths[1],
                                      "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(table) == 7 and (table["error"] != "").sum() == 5 and "2 of 7 images" in result.output
    strict = CliRunner().invoke(app, ["predict", runs["lora"], str(tmp_path / "in"), "--strict",
                                      "--out", str(tmp_path / "q.csv")])
    assert strict.exit_code != 0 and not (tmp_path / "q.csv").exists()
    both = CliRunner().invoke(app, ["predict", "--runs", f"{runs['lora']},{runs['probe']}", paths[1],
                                    "--out", str(tmp_path / "r.csv")])
    assert both.exit_code == 0, both.output
    columns = pd.read_csv(tmp_path / "r.csv").columns.tolist()
    assert columns[:2] == ["input", "error"] and "lora/pred:dark" in columns and "probe/prob:bright" in columns


def test_runs_on_one_backbone_equal_each_run_alone_and_share_its_weights(runs):
    paths, _ = _test_images(runs["lora"])
    names = ["lora", "probe", "full"]
    together = medpeft.load_runs([runs[n] for n in names])
    table = predict(together, paths)
    for name in names:
        alone = medpeft.load_run(runs[name]).predict(paths)
        for column in [*PROBS, "pred:bright", "pred:dark"]:
            assert (table[f"{name}/{column}"].to_numpy() == alone[column].to_numpy()).all(), (name, column)
    storage = [{p.untyped_storage().data_ptr() for p in run.model.parameters()} for run in together]
    lora, probe, full = storage
    fc1 = together[1].model.blocks[0].mlp.fc1.weight.untyped_storage().data_ptr()
    assert fc1 in lora and fc1 in probe and fc1 not in full  # full fine-tuning owns all its weights
    # The split q/v of LoRA are views of the shared fused qkv weights.
    qkv = together[1].model.blocks[0].attn.qkv.weight.untyped_storage().data_ptr()
    assert qkv in lora


def test_runs_of_another_backbone_or_bad_run_dirs_are_refused(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["probe"], other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["train"]["seed"] = 5  # random init from another seed: another backbone
    (other / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ConfigError, match="another backbone"):
        medpeft.load_runs([runs["lora"], other])
    twin = tmp_path / "x" / "lora"
    shutil.copytree(runs["lora"], twin)
    with pytest.raises(ConfigError, match="same folder name"):
        medpeft.load_runs([runs["lora"], twin])

    relabelled = tmp_path / "relabelled"
    shutil.copytree(runs["lora"], relabelled)
    config = yaml.safe_load((relabelled / "config.yaml").read_text())
    config["data"]["labels"] = ["bright", "dark", "extra"]
    (relabelled / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(RunDirError, match=r"names the labels \['bright', 'dark', 'extra'\], but the run was trained"):
        medpeft.load_runs([runs["lora"], relabelled])

    newer = tmp_path / "newer"
    shutil.copytree(runs["lora"], newer)
    metrics = json.loads((newer / "metrics.json").read_text())
    (newer / "metrics.json").write_text(json.dumps({**metrics, "medpeft_version": "99.0"}))
    with pytest.raises(RunDirError, match="newer than this medpeft"):
        medpeft.load_run(newer)
    (newer / "metrics.json").unlink()
    with pytest.raises(RunDirError, match="incomplete"):
        medpeft.load_run(newer)
    with pytest.raises(RunDirError, match="not a medpeft run"):
        medpeft.load_run(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        medpeft.load_run(runs["lora"]).predict([tmp_path / "missing.png"])


def test_cli_saliency_and_export(runs, tmp_path):
    paths, _ = _test_images(runs["lora"])
    result = CliRunner().invoke(app, ["predict", runs["lora"], *paths[:3], "--out", str(tmp_path / "p.csv"),
                                      "--saliency", str(tmp_path / "maps")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "p.csv")
    positives = int(table[["pred:bright", "pred:dark"]].to_numpy().sum())
    assert len(list((tmp_path / "maps").glob("*.png"))) == positives
    exported = CliRunner().invoke(app, ["export", runs["lora"], "--out", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert f"exported {manifest['parameters']:,} parameters" in exported.output and manifest["merged"] is True
