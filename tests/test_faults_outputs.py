"""Bad outputs of a finished run: weights that hold NaN are refused when the run is loaded, a model whose
outputs are not finite is refused when it predicts or evaluates (both in one line, no CSV written), one
image over PIL's decompression-bomb limit is its own row's error, and messages name the run folder given,
wherever the run was trained."""

import io
import shutil
import sys
from contextlib import redirect_stderr

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import medpeft
from medpeft.cli import main
from medpeft.config import config_from_dict
from medpeft.errors import CheckpointError, TrainingError

ADAPTER = "weights/adapter_model.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, squares_csv):
    from conftest import TINY_VIT

    config = {"model": dict(TINY_VIT),
              "data": {"csv": str(squares_csv), "patient_column": "patient", "labels": ["bright", "dark"],
                       "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
              "method": {"name": "lora", "r": 4, "alpha": 8},
              "train": {"epochs": 1, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0.5},
              "output_dir": str(tmp_path_factory.mktemp("trained") / "run")}
    medpeft.train(config_from_dict(config), quiet=True)
    return config["output_dir"]


def moved_with_weights(trained, tmp_path, change) -> str:
    """A copy of the run in another folder (its config.yaml still names the first), one weight changed."""
    run_dir = tmp_path / "moved"
    shutil.copytree(trained, run_dir)
    weights = load_file(run_dir / ADAPTER)
    name = min(k for k in weights if "lora_B" in k)
    weights[name] = change(weights[name])
    save_file(weights, run_dir / ADAPTER)
    return str(run_dir)


def invoke(*args) -> tuple[int, str]:
    """`medpeft ARGS` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exited, redirect_stderr(err):
        patch.setattr(sys, "argv", ["medpeft", *args])
        main()
    return exited.value.code, err.getvalue().strip()


def test_weights_holding_nan_are_refused_when_the_run_is_loaded(trained, tmp_path, squares_csv):
    run_dir = moved_with_weights(trained, tmp_path, lambda w: w.index_fill(0, torch.tensor([0]), float("nan")))
    with pytest.raises(CheckpointError, match=rf"^{run_dir}/{ADAPTER}: .*lora_B.* holds NaN or infinite values"):
        medpeft.load_run(run_dir)
    out = tmp_path / "p.csv"
    code, output = invoke("predict", run_dir, str(squares_csv.parent / "img000.png"), "--out", str(out))
    assert code == 2 and output.startswith(f"error: {run_dir}/{ADAPTER}: ") and len(output.splitlines()) == 1
    assert not out.exists()
    code, output = invoke("evaluate", run_dir)
    assert code == 2 and output.startswith(f"error: {run_dir}/{ADAPTER}: ") and len(output.splitlines()) == 1


def test_non_finite_outputs_are_refused_at_prediction_and_evaluation_naming_the_folder_given(
        trained, tmp_path, squares_csv):
    # Finite weights whose products overflow float32: the attention's scores become inf - inf = NaN.
    run_dir = moved_with_weights(trained, tmp_path, lambda w: torch.full_like(w, 3e38))
    run = medpeft.load_run(run_dir)
    image = str(squares_csv.parent / "img000.png")
    with pytest.raises(TrainingError, match=rf"^{run_dir}: the model gives non-finite outputs for {image} "):
        run.predict([image])
    out = tmp_path / "p.csv"
    code, output = invoke("predict", run_dir, image, "--out", str(out))
    assert code == 2 and output.startswith(f"error: {run_dir}: the model gives non-finite outputs")
    assert not out.exists()
    with pytest.raises(TrainingError, match=rf"^{run_dir}: the model gives non-finite outputs on the test split"):
        medpeft.evaluate(run_dir)
    code, output = invoke("evaluate", run_dir)
    assert code == 2 and output.startswith(f"error: {run_dir}: ") and trained not in output


def test_an_image_over_the_decompression_bomb_limit_is_its_rows_error_and_the_csv_is_written(
        trained, tmp_path, squares_csv):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)  # 4e8 pixels, over twice PIL's default limit; ~50 KB on disk
    assert bomb.stat().st_size < 1_000_000 and 20_000 ** 2 > 2 * Image.MAX_IMAGE_PIXELS
    good = str(squares_csv.parent / "img000.png")
    out = tmp_path / "p.csv"
    code, output = invoke("predict", trained, str(bomb), good, "--out", str(out))
    assert not code, output  # sys.exit(None)
    table = pd.read_csv(out, keep_default_na=False).set_index("input")
    assert "unreadable image" in table.loc[str(bomb), "error"] and "decompression bomb" in table.loc[str(bomb), "error"]
    assert table.loc[str(bomb), "prob:bright"] == "" and table.loc[good, "error"] == ""
    assert 0 <= float(table.loc[good, "prob:bright"]) <= 1
