"""medpeft generate train: a run directory like a fine-tuning run's, prompts from labels or a text column,
the configured objective, resume equal to an uninterrupted run, a run as the foundation of another."""

import json

import pandas as pd
import pytest
import torch

pytest.importorskip("diffusers")

from medpeft.data.phantoms import generate_phantoms  # noqa: E402
from medpeft.engine import rundir  # noqa: E402
from medpeft.errors import ConfigError  # noqa: E402
from medpeft.generate import train as recipe  # noqa: E402
from medpeft.generate.config import load_generate_config  # noqa: E402
from medpeft.generate.methods import trainable_state_dict  # noqa: E402
from medpeft.generate.runs import load_run, load_source  # noqa: E402
from medpeft.generate.sample import sample  # noqa: E402
from medpeft.generate.train import generate_train, prompts_of  # noqa: E402

from conftest import interrupted_at_call  # noqa: E402
from test_generate import denoise, tiny_model  # noqa: E402

LABELS = ["cardiomegaly", "pleural_effusion"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(folder, n_patients=60, size=32, seed=0)
    return folder / "labels.csv"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "pixel"
    tiny_model(vae=False).save(folder)
    return folder


def config(phantoms, base, out, **sections):
    spec = {"model": {"source": str(base)},
            "data": {"csv": str(phantoms), "labels": LABELS, "patient_column": "patient_id",
                     "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
            "method": {"name": "lora", "r": 2}, "diffusion": {"snr_gamma": 5.0, "ema_decay": 0.9},
            "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "device": "cpu"}, "output_dir": str(out)}
    for key, value in sections.items():  # a method replaces the default one; other sections are merged
        spec[key] = value if key == "method" else {**spec.get(key, {}), **value}
    return load_generate_config(base=spec)


def test_prompts_are_made_from_the_labels_or_a_text_column():
    table = pd.DataFrame({"cardiomegaly": [1, 0, 1], "pleural_effusion": [1, 0, 0], "meta:report": ["a", None, "c"]})
    cfg = load_generate_config(base={"model": {"source": "random:pixel-64"}, "output_dir": "-",
                                     "data": {"csv": "x.csv", "labels": LABELS}, "method": {"name": "bias"}})
    assert prompts_of(table, cfg) == ["chest x-ray, cardiomegaly, pleural effusion", "chest x-ray, no finding",
                                      "chest x-ray, cardiomegaly"]
    cfg = load_generate_config(base={"model": {"source": "random:pixel-64"}, "output_dir": "-",
                                     "method": {"name": "bias"},
                                     "data": {"csv": "x.csv", "labels": LABELS, "metadata_columns": ["report"]},
                                     "prompt": {"column": "report"}})
    assert prompts_of(table, cfg) == ["a", "", "c"]


@pytest.mark.parametrize("section, message", [
    ({"prompt": {"column": "report"}}, "prompt.column 'report' must be one of data.metadata_columns"),
    ({"prompt": {"template": "x-ray of {organ}"}}, r"prompt.template .* not \{organ\}"),
    ({"train": {"layer_decay": 0.75}}, "train.layer_decay does not apply to diffusion training"),
    ({"data": {"mean": [0.4, 0.4, 0.4]}}, "data.mean and data.std must be 0.5"),
    ({"diffusion": {"prediction": "sample"}}, "diffusion.prediction"),
    ({"train": {"precision": "fp16"}}, "train.precision 'fp16' is not supported for diffusion training"),
])
def test_a_config_that_cannot_train_is_one_error(tmp_path, phantoms, base, section, message):
    with pytest.raises(ConfigError, match=message):
        config(phantoms, base, tmp_path / "run", **section)


def test_a_run_trains_only_its_method_and_resumes_as_if_uninterrupted(tmp_path, phantoms, base):
    metrics = generate_train(config(phantoms, base, tmp_path / "whole"), quiet=True)
    run = tmp_path / "whole"
    assert {"config.yaml", "split.csv", "log.jsonl", "metrics.json", "adapter"} <= {p.name for p in run.iterdir()}
    assert not (run / rundir.CHECKPOINT).exists()
    assert metrics["epochs_run"] == 2 and len(metrics["history"]) == 2
    assert all(h["val_loss"] is not None for h in metrics["history"])
    assert 0 < metrics["parameters"]["trainable_percent"] < 10

    _, model = load_run(run)
    untouched = tiny_model(vae=False)
    assert all(torch.equal(p, q) for (n, p), q in zip(model.text_encoder.named_parameters(),
                                                      untouched.text_encoder.parameters()))
    assert not torch.allclose(denoise(model), denoise(untouched), atol=1e-4)  # LoRA B moved from zero

    with interrupted_at_call(recipe.DiffusionTrain, "validation_loss", 2):
        generate_train(config(phantoms, base, tmp_path / "cut"), quiet=True)
    assert (tmp_path / "cut" / rundir.CHECKPOINT).is_file()
    resumed = generate_train(config(phantoms, base, tmp_path / "cut"), quiet=True)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in metrics["history"]]
    a, b = trainable_state_dict(load_run(tmp_path / "cut")[1]), trainable_state_dict(model)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2]


def test_a_run_is_the_foundation_of_another(tmp_path, phantoms, base):
    generate_train(config(phantoms, base, tmp_path / "full",
                          method={"name": "full", "components": ["unet", "text_encoder"]}, train={"epochs": 1},
                          diffusion={"ema_decay": None, "prediction": "v_prediction"}), quiet=True)
    foundation = load_source(str(tmp_path / "full"))
    assert foundation.scheduler.config.prediction_type == "v_prediction"
    assert not torch.equal(denoise(foundation), denoise(tiny_model(vae=False)))
    metrics = generate_train(config(phantoms, base, tmp_path / "svdiff", model={"source": str(tmp_path / "full")},
                                    method={"name": "svdiff"}, train={"epochs": 1}), quiet=True)
    assert metrics["source"] == str(tmp_path / "full")
    _, adapted = load_run(tmp_path / "svdiff")
    images = sample(adapted, ["chest x-ray, cardiomegaly"], steps=3, guidance=2.0, seed=0)
    assert images.shape == (1, 1, 16, 16) and 0 <= images.min() and images.max() <= 1


@pytest.mark.slow
def test_the_command_line_trains_samples_and_says_what_is_wrong_in_one_line(tmp_path, phantoms, base):
    import subprocess
    import sys

    import yaml
    from PIL import Image

    def medpeft(*args):
        return subprocess.run([sys.executable, "-m", "medpeft", *args], capture_output=True, text=True)

    help_text = medpeft("generate", "--help").stdout
    assert all(command in help_text for command in ("train", "sample", "evaluate", "methods"))
    listed = json.loads(medpeft("generate", "methods", "--json").stdout)
    assert {row["name"] for row in listed} == {"full", "attention", "bias", "norm", "norm_bias_attention", "lora",
                                               "svdiff", "difffit"}
    spec = config(phantoms, base, tmp_path / "run", train={"epochs": 1}).to_dict()
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(spec))
    trained = medpeft("generate", "train", str(tmp_path / "gen.yaml"))
    assert trained.returncode == 0, trained.stderr
    assert "done: 1 epochs" in trained.stdout

    prompts = ["chest x-ray, cardiomegaly", "chest x-ray, no finding"]
    sampled = medpeft("generate", "sample", str(tmp_path / "run"), "--prompt", prompts[0], "--prompt", prompts[1],
                      "--n", "2", "--steps", "3", "--out", str(tmp_path / "samples"))
    assert sampled.returncode == 0, sampled.stderr
    table = pd.read_csv(tmp_path / "samples" / "prompts.csv")
    assert table["prompt"].tolist() == [prompts[0]] * 2 + [prompts[1]] * 2 and table["seed"].tolist() == [0, 0, 1, 1]
    assert Image.open(tmp_path / "samples" / table["path"][0]).size == (16, 16)

    synthetic = medpeft("generate", "sample", str(tmp_path / "run"), "--like", "val", "--n", "2", "--steps", "2",
                        "--out", str(tmp_path / "synthetic"))
    assert synthetic.returncode == 0, synthetic.stderr
    from medpeft.config import load_data_config
    from medpeft.data import read_dataset

    read = read_dataset(load_data_config(base={"data": {"csv": str(tmp_path / "synthetic" / "prompts.csv"),
                                                        "labels": LABELS, "patient_column": "patient_id"}}))
    from medpeft.data import read_split_dataset
    from medpeft.generate.runs import load_run_config

    table = read_split_dataset(load_run_config(tmp_path / "run").data)
    val = table[table["split"] == "val"]
    assert len(read) == 2 * len(val) and read["patient_id"].nunique() == len(read)
    assert read[LABELS].sum().tolist() == (2 * val[LABELS].sum()).tolist()

    again = medpeft("generate", "sample", str(tmp_path / "run"), "--prompt", "x", "--out", str(tmp_path / "samples"))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "exists" in again.stderr
    wrong = medpeft("generate", "train", str(tmp_path / "gen.yaml"), "--set", "method.r=0")
    assert wrong.returncode == 2 and "method.r" in wrong.stderr and wrong.stderr.strip().count("\n") == 0


def test_evaluate_scores_generated_images_with_a_classification_run(tmp_path, phantoms, base):
    from medpeft import load_config, train

    from conftest import TINY_VIT
    from medpeft.generate.evaluate import generate_evaluate

    classifier = tmp_path / "classifier"
    train(load_config(base={"model": dict(TINY_VIT), "method": {"name": "full"}, "output_dir": str(classifier),
                            "data": {"csv": str(phantoms), "labels": LABELS, "patient_column": "patient_id",
                                     "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
                            "train": {"epochs": 1, "batch_size": 16}}), quiet=True)
    generate_train(config(phantoms, base, tmp_path / "gen", train={"epochs": 1}), quiet=True)
    result = generate_evaluate(tmp_path / "gen", classifier, n=12, steps=2, guidance=2.0, batch_size=8)
    assert result["images"] == 12
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert 0 <= result["copied_share"] <= 1 and result["mifid"] >= result["fid"]
    assert set(result["label_fidelity"]["labels"]) == set(LABELS)
    saved = json.loads((tmp_path / "gen" / "evaluations" / "generated" / "metrics.json").read_text())
    assert saved["fid"] == pytest.approx(result["fid"])


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path, phantoms, base):
    """--devices 2 (torch DDP over gloo): each process trains its part of each global batch; the weights
    and losses are the single process's (the draws are per image, the gradients averaged)."""
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    settings = {"train": {"epochs": 2, "batch_size": 8}, "diffusion": {"ema_decay": None}}
    one = generate_train(config(phantoms, base, tmp_path / "one", **settings), quiet=True)
    spec = config(phantoms, base, tmp_path / "two", **settings).to_dict()
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "medpeft", "generate", "train", str(tmp_path / "two.yaml"),
                           "--devices", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2
    for a, b in zip(one["history"], two["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    a, b = (load_file(str(tmp_path / run / "adapter" / "pytorch_lora_weights.safetensors")) for run in ("one", "two"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_an_mae_pretraining_run_is_an_extractor_without_label_scores(tmp_path, phantoms, base):
    from medpeft.config import load_pretrain_config
    from medpeft.generate.evaluate import generate_evaluate
    from medpeft.pretrain import pretrain

    from conftest import TINY_VIT

    mae = tmp_path / "mae"
    pretrain(load_pretrain_config(base={
        "model": {k: v for k, v in TINY_VIT.items() if k != "drop_path_rate"}, "output_dir": str(mae),
        "data": {"csv": str(phantoms), "patient_column": "patient_id"},
        "mae": {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "preview_every": 0},
        "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0}}), quiet=True)
    generate_train(config(phantoms, base, tmp_path / "gen", train={"epochs": 1}), quiet=True)
    result = generate_evaluate(tmp_path / "gen", mae, n=8, steps=2, guidance=2.0)
    assert result["fid"] > 0 and result["label_fidelity"] is None and 0 <= result["copied_share"] <= 1
