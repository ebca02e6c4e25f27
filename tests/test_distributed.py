"""Data-parallel training and evaluation in 2 CPU processes (gloo), against one process.

The data make every edge case happen: 69 images (one per patient) give 35 train / 17 val / 17 test;
the global batch of 17 splits 9 + 8 between the processes and leaves a last batch of 1 (one process
gets nothing of it); 2-step gradient accumulation; evaluation batches of 5 give the processes 10 and 7
images.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, RandomSampler

import medpeft
from medpeft.config import config_from_dict
from medpeft.errors import RunDirError
from medpeft.methods import list_methods
from medpeft.engine import rundir
from medpeft.engine.assemble import build_model, load_model
from medpeft.engine.evaluation import evaluate_split
from medpeft.files import read_json
from medpeft.engine.distributed import BatchPlan, Processes

from conftest import TINY_VIT, accel_flag, assert_metrics_close, split_scores, write_squares_dataset
from test_cnn_methods import CNNS
from test_method_contract import SETTINGS

pytestmark = pytest.mark.slow  # every test starts process groups

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
WORKER = str(Path(__file__).with_name("ddp_worker.py"))


def launch(command: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def odd_csv(tmp_path_factory):
    csv = write_squares_dataset(tmp_path_factory.mktemp("odd"), n_images=69)
    return csv


def config(odd_csv, out: Path, **method) -> dict:
    return {
        "model": {**TINY_VIT, "drop_path_rate": 0.0},
        "data": {"csv": str(odd_csv), "labels": ["bright", "dark"],
                 "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
        "method": method or {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]},
        "train": {"epochs": 2, "batch_size": 17, "eval_batch_size": 5, "grad_accum_steps": 2, "lr": 0.003,
                  "warmup_epochs": 0.5, "log_every_steps": 1, "accel": accel_flag()},
        "output_dir": str(out),
    }


@pytest.fixture(scope="module")
def lora_runs(odd_csv, tmp_path_factory):
    """The same LoRA run in one process and, through ``medpeft train --devices 2``, in two."""
    root = tmp_path_factory.mktemp("lora")
    single = medpeft.train(config_from_dict(config(odd_csv, root / "single")), quiet=True)
    yaml.safe_dump(config(odd_csv, root / "ddp"), open(root / "ddp.yaml", "w"))
    done = launch([sys.executable, "-m", "medpeft", "train", str(root / "ddp.yaml"), "--devices", "2"])
    return root, single, read_json(root / "ddp" / rundir.METRICS), done


def single_process_predictions(run_dir) -> str:
    """predictions.csv as this process computes it from the run's saved weights, on one thread as each
    launched process (oneDNN's CPU convolutions round differently on another number of threads)."""
    config = rundir.finished_config(Path(run_dir))
    built = load_model(run_dir, config)
    table = rundir.run_table(Path(run_dir), config)
    frames, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for split in ("val", "test"):
            evaluate_split(built.model, table, split, config, torch.device("cpu"), predictions=frames)
    finally:
        torch.set_num_threads(threads)
    return pd.concat(frames).to_csv(index=False)


@pytest.mark.parametrize("n, batch, world", [(35, 17, 2), (35, 8, 3), (7, 16, 2), (64, 16, 4), (10, 3, 1)])
def test_the_parts_of_the_processes_make_the_single_process_batches(n, batch, world):
    def plans(split):
        generators = [torch.Generator().manual_seed(5) for _ in range(world)]
        return [BatchPlan(n, batch, True, generators[r], Processes(r, world), split=split) for r in range(world)]

    single = list(BatchPlan(n, batch, True, torch.Generator().manual_seed(5)))
    assert single == list(BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(5)),
                                       batch, drop_last=False))  # the order of a plain shuffled DataLoader
    train_plans = plans(split=True)
    per_rank = [list(plan) for plan in train_plans]
    assert {len(plan) for plan in train_plans} == {len(single)} == {len(parts) for parts in per_rank}
    for step, batch_indices in enumerate(single):
        shares = [plan.share(step) for plan in train_plans]
        assert sum(mine for mine, _ in shares) == len(batch_indices) and {t for _, t in shares} == {len(batch_indices)}
        taken = [parts[step] for parts, (mine, _) in zip(per_rank, shares) if mine]
        assert sum(taken, []) == batch_indices  # contiguous parts in rank order
        for parts, (mine, _) in zip(per_rank, shares):
            assert len(parts[step]) == max(mine, 1)  # an empty part is one image with a share of 0
    eval_plans = plans(split=False)
    dealt = sorted((i for plan in eval_plans for b in plan for i in b))
    assert dealt == list(range(n)) and sum(len(plan) for plan in eval_plans) == -(-n // batch)


def test_ddp_evaluation_equals_single_process_evaluation_exactly(lora_runs):
    root, _, ddp, _ = lora_runs
    assert ddp["processes"] == 2 and ddp["split_sizes"] == {"train": 35, "val": 17, "test": 17}
    # metrics.json was computed by the two processes; evaluate() computes in this one.
    assert split_scores(medpeft.evaluate(root / "ddp", "val")) == ddp["val"]
    assert split_scores(medpeft.evaluate(root / "ddp", "test")) == ddp["test"]
    written = (root / "ddp" / rundir.PREDICTIONS).read_text()
    assert written == single_process_predictions(root / "ddp")  # every probability, bit for bit
    predictions = pd.read_csv(root / "ddp" / rundir.PREDICTIONS)
    assert len(predictions) == 34 and predictions["image_id"].is_unique  # no padding, nothing repeated


def test_ddp_training_equals_single_process_training(lora_runs):
    root, single, ddp, _ = lora_runs
    a, b = (load_file(root / name / "weights" / "adapter_model.safetensors") for name in ("single", "ddp"))
    assert a.keys() == b.keys() and len(a) > 4
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert moved > 1e-3  # the adapters trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert ddp["best_epoch"] == single["best_epoch"]
    logged = [json.loads(line) for line in (root / "ddp" / rundir.LOG).read_text().splitlines()]
    steps = [r for r in logged if r["event"] == "step"]
    single_steps = [json.loads(line) for line in (root / "single" / rundir.LOG).read_text().splitlines()
                    if '"step"' in line and '"event": "step"' in line]
    # Written once (rank 0): 2 epochs of 2 optimiser steps; the logged loss is the global batch's.
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert sum(r["event"] == "epoch" for r in logged) == 2
    for mine, theirs in zip(steps, single_steps):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)


def test_a_ddp_lora_adapter_reloads_in_one_process_through_peft(lora_runs):
    from peft import PeftModel

    from medpeft.backbones import create_backbone
    from medpeft.backbones.layers import split_qkv

    root, *_ = lora_runs
    finished = medpeft.load_run(root / "ddp")
    torch.manual_seed(finished.config.train.seed)  # the random-init backbone the run started from
    base, _ = create_backbone(finished.config.model, 2)
    reloaded = PeftModel.from_pretrained(split_qkv(base), str(root / "ddp" / "weights")).eval()  # q, v targets
    x = torch.randn(3, 3, 32, 32)
    # lean LoRA computes x (W + s B A)^T in fp32, peft x W^T + s (x A^T) B^T: equal up to rounding
    torch.testing.assert_close(reloaded(x), finished.model.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_ddp_run_resumes_under_a_launcher_and_ends_as_an_uninterrupted_one(lora_runs, odd_csv):
    root, _, uninterrupted, _ = lora_runs
    out = root / "resumed"
    (root / "configs.json").write_text(json.dumps([config(odd_csv, out)]))
    crashed = launch([*TORCHRUN, WORKER, str(root / "configs.json"), "--crash-in-epoch", "2"], expect_ok=False)
    assert crashed.returncode != 0 and (out / rundir.CHECKPOINT).is_file() and not rundir.is_complete(out)
    with pytest.raises(RunDirError, match="started on 2 processes"):
        medpeft.train(config_from_dict(config(odd_csv, out)), quiet=True)

    # accelerate's launcher (on a GPU machine: accelerate launch --multi_gpu, one process per GPU).
    yaml.safe_dump(config(odd_csv, out), open(root / "resume.yaml", "w"))
    launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0",
            "-m", "medpeft", "train", str(root / "resume.yaml")])
    resumed = read_json(out / rundir.METRICS)
    assert (resumed["val"], resumed["test"], resumed["best_epoch"]) == \
        (uninterrupted["val"], uninterrupted["test"], uninterrupted["best_epoch"])
    for file in (root / "ddp" / "weights").iterdir():
        assert (out / "weights" / file.name).read_bytes() == file.read_bytes(), file.name
    assert '"event": "resume", "epoch": 1' in (out / rundir.LOG).read_text()


@pytest.fixture(scope="module")
def every_method_ddp(odd_csv, tmp_path_factory):
    """One epoch of every method, and of LoRA and full fine-tuning of a CNN with BatchNorm, in one launch."""
    root = tmp_path_factory.mktemp("methods")
    runs = [config(odd_csv, root / spec.name, name=spec.name, **SETTINGS.get(spec.name, {}))
            for spec in list_methods()]
    for method in ({"name": "lora", "targets": ["convs"], "r": 2}, {"name": "full"}):
        cnn = config(odd_csv, root / f"resnet-{method['name']}", **method)
        # 64 px: the last stage keeps 2x2 positions, so BatchNorm can train on a batch of 1 image.
        cnn["model"] = {"name": "resnet50", "weights": "random", "img_size": 64, "drop_path_rate": 0.0,
                        "kwargs": CNNS["resnet50"]}
        cnn["train"]["batch_size"] = 10  # the last batch (5) splits 3 + 2: the processes' BatchNorm statistics differ
        runs.append(cnn)
    bf16 = config(odd_csv, root / "lora-bf16")
    bf16["train"]["precision"] = "bf16"
    runs.append(bf16)
    for run in runs:
        run["train"]["epochs"] = 1
    (root / "configs.json").write_text(json.dumps(runs))
    launch([*TORCHRUN, WORKER, str(root / "configs.json")])
    return root, runs


def test_every_method_trains_under_ddp_and_its_processes_stay_in_step(every_method_ddp):
    """No DDP error (e.g. unused parameters), and the metrics the processes computed together equal the
    saved model's in one process, which holds only if every process held the same weights and statistics."""
    _, runs = every_method_ddp
    assert len(runs) == len(list_methods()) + 3
    for run in runs:
        metrics = read_json(Path(run["output_dir"]) / rundir.METRICS)
        assert metrics["processes"] == 2
        # a CNN's logits may differ in their last bits with the batches' composition: the rank-based metrics are
        # equal, the calibration's sums up to rounding
        evaluated = split_scores(medpeft.evaluate(run["output_dir"], "test"))
        assert_metrics_close(evaluated, metrics["test"], where=run["output_dir"])
        assert evaluated["per_label"] == metrics["test"]["per_label"], run["output_dir"]
        written = (Path(run["output_dir"]) / rundir.PREDICTIONS).read_text()
        assert written == single_process_predictions(run["output_dir"]), run["output_dir"]


def test_full_fine_tuning_in_two_processes_gives_the_single_process_weights(every_method_ddp, tmp_path):
    root, runs = every_method_ddp
    single = {**next(run for run in runs if Path(run["output_dir"]).name == "full"), "output_dir": str(tmp_path)}
    medpeft.train(config_from_dict(single), quiet=True)
    a, b = (load_file(Path(d) / "weights" / "adapter.safetensors") for d in (tmp_path, root / "full"))
    initial = build_model(config_from_dict(single)).model.state_dict()
    assert a.keys() == initial.keys()
    moved = max(float((a[k] - initial[k]).abs().max()) for k in a)
    assert moved > 1e-3  # the weights moved (2 AdamW steps of lr 3e-3)
    # AdamW's g / sqrt(v) turns float-level gradient differences of near-zero gradients into
    # differences of a small fraction of a step.
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.01 * moved


def test_bf16_training_in_two_processes_follows_the_single_process_run(every_method_ddp, tmp_path):
    root, runs = every_method_ddp
    single = {**next(run for run in runs if Path(run["output_dir"]).name == "lora-bf16"), "output_dir": str(tmp_path)}
    medpeft.train(config_from_dict(single), quiet=True)

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (Path(run_dir) / rundir.LOG).read_text().splitlines()
                if '"event": "step"' in line]

    assert (root / "lora-bf16" / rundir.SPLIT).read_text() == (tmp_path / rundir.SPLIT).read_text()
    # bf16 rounds differently for different batch shapes: close, not equal.
    assert losses(root / "lora-bf16") == pytest.approx(losses(tmp_path), rel=0.02)
    a, b = (load_file(Path(d) / "weights" / "adapter_model.safetensors") for d in (tmp_path, root / "lora-bf16"))
    # An element whose gradient is near zero can flip sign under bf16 rounding, and AdamW turns that into
    # a step of up to lr: a few elements may differ by a fraction of lr, the rest agree closely.
    lr = single["train"]["lr"]
    for key in a:
        differ = (a[key] - b[key]).abs()
        assert float((differ <= 2e-4 + 0.05 * a[key].abs()).float().mean()) >= 0.95, key
        assert float(differ.max()) < lr, key
