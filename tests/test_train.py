import json
import os
import platform
import resource
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from peft import PeftModel

import medpeft
from medpeft.config import config_from_dict
from medpeft.engine import rundir, runtime
from medpeft.engine.assemble import build_model
from medpeft.errors import CheckpointError, ConfigError, DataError, RunDirError
from medpeft.metrics import classification_metrics
from medpeft.train import recipe

from conftest import interrupted_at_call, split_scores


def run(config: dict) -> dict:
    return medpeft.train(config_from_dict(config), quiet=True)


def scores(metrics: dict) -> tuple:
    return metrics["best_epoch"], metrics["val"], metrics["test"]


def test_lora_run_writes_a_complete_run_directory(run_config, tmp_path):
    metrics = run(run_config)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "config.yaml", "log.jsonl", "metrics.json",
                                                     "predictions.csv",
                                                     "split.csv", "thresholds.json", "weights"]
    assert json.loads((out / "metrics.json").read_text())["val"] == metrics["val"]
    predictions = pd.read_csv(out / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    assert len(test) == metrics["split_sizes"]["test"] and set(predictions["split"]) == {"val", "test"}
    recomputed = classification_metrics(test[["target:bright", "target:dark"]].to_numpy(),
                                        test[["prob:bright", "prob:dark"]].to_numpy(), ["bright", "dark"], "multilabel")
    assert recomputed["mean_auroc"] == pytest.approx(metrics["test"]["mean_auroc"], abs=1e-12)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["qkv"]}
    assert saved["train"]["lr"] == 0.003 and saved["model"]["weights"] == "random"
    split = (out / "split.csv").read_text().splitlines()
    assert split[0] == "image_id,patient_id,split" and len(split) == 65
    assert metrics["split_sizes"]["train"] + metrics["split_sizes"]["val"] + metrics["split_sizes"]["test"] == 64
    assert (out / "weights" / "adapter_model.safetensors").is_file()
    assert metrics["parameters"]["trainable"] == 2 * 4 * (32 + 96) + 2 * 33
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 2 and "step" in events
    assert set(metrics["val"]["per_label"]) == {"bright", "dark"}


def test_saved_weights_hold_only_the_trainable_parameters(run_config, tmp_path):
    run_config["method"] = {"name": "linear_probe"}
    run(run_config)
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "run" / "weights" / "adapter.safetensors"))) == ["head.bias", "head.weight"]


def test_evaluate_reproduces_the_run_test_metrics(run_config, tmp_path):
    metrics = run(run_config)
    assert split_scores(medpeft.evaluate(tmp_path / "run", "test")) == metrics["test"]


def test_run_adapter_loads_through_peft_from_pretrained(run_config, tmp_path):
    run(run_config)
    finished = medpeft.load_run(tmp_path / "run")
    model = finished.model
    torch.manual_seed(0)
    from medpeft.backbones import create_backbone

    base, _ = create_backbone(finished.config.model, 2)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "weights")).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded(x), model.eval()(x), rtol=1e-5, atol=1e-6)  # lean LoRA: x (W + s B A)^T in fp32


def test_same_seed_gives_identical_metrics_on_cpu(run_config, tmp_path):
    first = run(run_config)
    run_config["output_dir"] = str(tmp_path / "again")
    assert scores(run(run_config)) == scores(first)


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4, "targets": ["q", "v"]},
                                    {"name": "adalora", "init_r": 8, "target_r": 2, "final_fraction": 0.2}])
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(run_config, tmp_path, method):
    run_config["method"] = method
    run_config["train"]["epochs"] = 3
    run_config["augment"] = {"rand_augment_ops": 1}
    run_config["model"]["drop_path_rate"] = 0.2
    uninterrupted = run(run_config)

    run_config["output_dir"] = str(tmp_path / "interrupted")
    with interrupted_at_call(recipe, "evaluate_split", 2):  # in the second epoch, before its validation
        run(run_config)
    out = tmp_path / "interrupted"
    assert not rundir.is_complete(out) and (out / "checkpoint.pt").is_file()
    with pytest.raises(RunDirError, match="incomplete"):
        medpeft.evaluate(out)

    resumed = run(run_config)
    assert scores(resumed) == scores(uninterrupted)
    for file in (tmp_path / "run" / "weights").iterdir():
        assert (out / "weights" / file.name).read_bytes() == file.read_bytes(), file.name
    assert resumed["epochs_run"] == 3
    assert '"event": "resume", "epoch": 1' in (out / "log.jsonl").read_text()


def test_complete_run_is_not_overwritten_and_another_config_is_refused(run_config, tmp_path):
    run(run_config)
    with pytest.raises(RunDirError, match="complete already"):
        run(run_config)
    (tmp_path / "run" / "metrics.json").unlink()
    run_config["train"]["lr"] = 0.01
    with pytest.raises(RunDirError, match="another config"):
        run(run_config)


def test_early_stopping_stops_after_patience_epochs_without_improvement(run_config):
    run_config["train"].update(epochs=6, lr=1e-9, min_lr=1e-9, warmup_epochs=0, early_stopping_patience=1)
    run_config["augment"] = {"enabled": False}
    run_config["model"]["drop_path_rate"] = 0.0
    metrics = run(run_config)
    assert metrics["stopped_early"] and metrics["epochs_run"] == 2 and metrics["best_epoch"] == 1


def test_eval_every_validates_every_nth_and_the_last_epoch_and_patience_counts_validations(run_config, tmp_path):
    run_config["train"].update(epochs=5, eval_every=2)
    seen = []
    metrics = medpeft.train(config_from_dict(run_config), quiet=True, on_epoch=lambda e, s: seen.append((e, s)))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3, 4]
    validated = {r["epoch"]: r["val_mean_auroc"] for r in epochs if "val" in r}
    assert list(validated) == [1, 3, 4] and [e for e, _ in seen] == [1, 3, 4]
    assert [s for _, s in seen] == list(validated.values())
    best = max(validated, key=validated.get)
    assert metrics["best_epoch"] == min(e for e, s in validated.items() if s == validated[best]) + 1

    # Patience in validations: nothing improves after the first, so two more end the run at epoch 6.
    run_config["train"].update(epochs=12, eval_every=2, lr=1e-9, min_lr=1e-9, warmup_epochs=0,
                               early_stopping_patience=2)
    run_config.update(augment={"enabled": False}, output_dir=str(tmp_path / "patient"))
    run_config["model"]["drop_path_rate"] = 0.0
    metrics = run(run_config)
    assert metrics["stopped_early"] and metrics["epochs_run"] == 6 and metrics["best_epoch"] == 2
    with pytest.raises(ConfigError, match="train.eval_every must be > 0"):
        config_from_dict({**run_config, "train": {**run_config["train"], "eval_every": 0}})


def test_multiclass_task_trains_with_cross_entropy_and_reports_accuracy(tmp_path, squares_csv):
    import pandas as pd

    frame = pd.read_csv(squares_csv)
    frame["kind"] = ["both" if b and d else "bright" if b else "dark" if d else "none"
                     for b, d in zip(frame["bright"], frame["dark"])]
    csv = squares_csv.parent / "kinds.csv"
    frame.to_csv(csv, index=False)
    metrics = run({
        "model": {"name": "vit_tiny_patch16_224", "weights": "random", "img_size": 32,
                  "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}},
        "data": {"csv": str(csv), "patient_column": "patient", "label_column": "kind", "task": "multiclass",
                 "labels": ["none", "bright", "dark", "both"], "negative_names": []},
        "method": {"name": "full"},
        "train": {"epochs": 1, "batch_size": 16},
        "output_dir": str(tmp_path / "mc"),
    })
    assert 0.0 <= metrics["val"]["accuracy"] <= 1.0 and "macro_f1" in metrics["test"]


def test_bad_inputs_leave_no_run_directory(run_config, tmp_path):
    out = tmp_path / "run"
    bad = dict(run_config, model={**run_config["model"], "weights": str(tmp_path / "missing.pth")})
    with pytest.raises(CheckpointError, match="missing.pth: checkpoint file not found"):
        run(bad)
    bad = dict(run_config, data={**run_config["data"], "labels": ["bright", "nodule"]})
    with pytest.raises(DataError, match="column 'nodule' not found"):
        run(bad)
    with pytest.raises(ConfigError, match="config key 'train.learning_rate' does not exist"):
        config_from_dict(dict(run_config, train={"learning_rate": 1}))
    assert not out.exists()


def test_unreadable_image_fails_before_training_and_names_the_row(run_config, squares_csv, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(squares_csv.parent, data)
    (data / "img005.png").write_bytes(b"not a png")
    run_config["data"]["csv"] = str(data / "labels.csv")
    with pytest.raises(DataError, match=r"labels.csv: 1 of 64 images cannot be used .*img005.png: unreadable image"):
        run(run_config)
    assert not (tmp_path / "run").exists()


def test_truncated_image_during_training_leaves_an_incomplete_run(run_config, squares_csv, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(squares_csv.parent, data)
    image = data / "img010.png"
    image.write_bytes(image.read_bytes()[:60])  # header intact, pixel data cut off
    run_config["data"]["csv"] = str(data / "labels.csv")
    with pytest.raises(DataError, match="img010.png: unreadable image"):
        run(run_config)
    assert not rundir.is_complete(tmp_path / "run")


def test_phantoms_train_through_the_generic_csv_reader(tmp_path):
    from medpeft.data.phantoms import FINDINGS, generate_phantoms

    csv = generate_phantoms(tmp_path / "phantoms", n_patients=40, size=32, seed=3)
    metrics = run({
        "model": {"name": "vit_tiny_patch16_224", "weights": "random", "img_size": 32,
                  "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}},
        "data": {"csv": str(csv), "patient_column": "patient_id", "labels": list(FINDINGS),
                 "split": {"val_fraction": 0.3, "test_fraction": 0.2}},
        "method": {"name": "lora"}, "train": {"epochs": 1, "batch_size": 16},
        "output_dir": str(tmp_path / "run"),
    })
    assert set(metrics["val"]["per_label"]) == set(FINDINGS)
    assert sum(metrics["split_sizes"].values()) == len(open(csv).read().splitlines()) - 1


def test_diverged_training_is_an_error_not_a_metric(run_config, tmp_path):
    from medpeft.errors import TrainingError

    run_config["method"] = {"name": "full"}
    run_config["train"].update(lr=1e12, optimizer="sgd", warmup_epochs=0)
    with pytest.raises(TrainingError, match="training diverged"):
        run(run_config)
    assert not rundir.is_complete(tmp_path / "run")


def test_training_from_the_image_cache_decodes_each_image_once(run_config, tmp_path, monkeypatch):
    run_config["data"]["cache_dir"] = str(tmp_path / "cache")
    first = run(run_config)
    caches = [path for path in (tmp_path / "cache").iterdir() if path.is_dir()]  # and image-checks.sqlite
    assert len(caches) == 1 and (caches[0] / "images.u8").stat().st_size == 64 * 32 * 32

    import medpeft.data.cache
    import medpeft.data.dataset

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(medpeft.data.cache, "load_grayscale", no_decoding)
    monkeypatch.setattr(medpeft.data.dataset, "load_grayscale", no_decoding)
    run_config["output_dir"] = str(tmp_path / "again")
    assert scores(run(run_config)) == scores(first)
    assert split_scores(medpeft.evaluate(tmp_path / "again", "test")) == first["test"]


def test_adalora_run_resolves_its_step_count_and_evaluates_from_its_weights(run_config, tmp_path):
    run_config["method"] = {"name": "adalora", "init_r": 4, "target_r": 2}
    run_config["train"].update(epochs=3, grad_accum_steps=2)
    metrics = run(run_config)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    batches = -(-metrics["split_sizes"]["train"] // 8)
    assert saved["method"]["total_step"] == 3 * -(-batches // 2)
    assert split_scores(medpeft.evaluate(tmp_path / "run", "test")) == metrics["test"]


@pytest.mark.slow
def test_compiled_training_follows_the_eager_run(run_config, tmp_path):
    run_config["train"].update(epochs=1, log_every_steps=1)
    eager = run(run_config)
    run_config["train"]["compile"] = True
    run_config["output_dir"] = str(tmp_path / "compiled")
    compiled = run(run_config)

    def losses(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
                if '"event": "step"' in line]

    assert len(losses("compiled")) == compiled["split_sizes"]["train"] // 8 >= 3
    assert losses("compiled") == pytest.approx(losses("run"), rel=1e-4)
    assert compiled["test"]["mean_auroc"] == pytest.approx(eager["test"]["mean_auroc"], abs=0.02)


@pytest.mark.accel
def test_bf16_on_the_cpu_runs_timm_attention_without_the_fused_kernel(run_config):
    """torch's CPU flash attention is slow in bf16: with train.attention 'auto', bf16 CPU runs take timm's
    matmul + softmax path, which computes the same function; other precisions keep the fused kernel."""
    def built(precision, attention="auto"):
        train = {**run_config["train"], "precision": precision, "attention": attention}
        model = build_model(config_from_dict({**run_config, "train": train})).model.eval()
        attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
        assert len(attention) == run_config["model"]["kwargs"]["depth"]
        return model, {m.fused_attn for m in attention}

    (fp32, fused), (bf16, fused_bf16) = built("fp32"), built("bf16")
    assert fused == {True} and fused_bf16 == {False}
    assert built("bf16", "fused")[1] == {True} and built("fp32", "math")[1] == {False}
    with pytest.raises(ConfigError, match="train.attention"):
        built("bf16", "flash")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        math_out, fused_out = bf16(x).float(), fp32(x).float()
    assert (math_out - fused_out).norm() / fused_out.norm() < 0.02


def test_bf16_on_a_cpu_without_bf16_matmuls_warns_once(monkeypatch):
    """Emulated bf16 matmuls are ~90x slower than fp32 (AVX2): say so once per process, and only then."""
    import warnings

    cpu, calls = torch.device("cpu"), lambda precision: [runtime.autocast(cpu, precision) for _ in range(3)]
    for native in (True, False):
        monkeypatch.setattr(runtime, "cpu_bf16_matmul", lambda: native)
        runtime._warn_emulated_bf16.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            calls("bf16"), calls("fp32")
        assert len(caught) == (0 if native else 1)
        if not native:  # pointing at the caller of autocast
            assert "no bf16 matmul instructions" in str(caught[0].message) and caught[0].filename == __file__
    runtime._warn_emulated_bf16.cache_clear()


def test_the_cheaper_cpu_precision_is_bf16_only_with_bf16_matmul_instructions(monkeypatch):
    """The demos and benchmarks train in cpu_precision(): bf16 where the CPU multiplies it natively, else fp32."""
    for native, precision in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "cpu_bf16_matmul", lambda: native)
        assert runtime.cpu_precision() == precision
    here = runtime.numerics()
    assert here["cpus"] == os.cpu_count() and here["packages"]["torch"] == torch.__version__.split("+")[0]
    assert here["cpu"].endswith(")") and here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


FAULTS = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from medpeft.accel.memory import reuse_freed_memory
    reuse_freed_memory()
counts = []
for _ in range(5):  # a "step" that allocates and frees 4 tensors of 16 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(4 * 2**20) for _ in range(4)]
    del tensors
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*counts)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="reuse_freed_memory tunes glibc's malloc")
def test_reused_memory_serves_the_next_steps_tensors_without_page_faults():
    def faults(mode):  # page faults of each step
        done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return [int(n) for n in done.stdout.split()]

    pages = 4 * 16 * 2**20 // resource.getpagesize()
    stock, reused = faults("stock"), faults("reuse")
    assert sum(stock[1:]) >= pages  # glibc gave the memory back after a step at least once: faulted in again
    assert sum(reused[3:]) < pages / 100  # (the heap settles within three steps)
