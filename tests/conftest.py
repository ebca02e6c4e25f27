"""Shared fixtures: a tiny ViT config and a tiny learnable image dataset written to disk."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

TINY_VIT = {
    "name": "vit_tiny_patch16_224",
    "weights": "random",
    "img_size": 32,
    "drop_path_rate": 0.1,
    "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8},
}


# Torch threads of each test process: the cores shared out between pytest-xdist's workers (`make test` runs
# two), so that workers never oversubscribe the cores; the processes tests start inherit the share.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


def pytest_addoption(parser):
    parser.addoption("--accel", choices=("on", "off"), default="on",
                     help="train.accel of every model and run these tests build in this process ('off': the "
                          "whole suite on the plain torch, timm and peft modules; tests of the speed-ups skip)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--accel") == "off":
        os.environ["MEDPEFT_TEST_ACCEL"] = "off"  # see accel_flag
        skip = pytest.mark.skip(reason="tests a speed-up of medpeft.accel, which --accel=off turns off")
        for item in items:
            if "accel" in item.keywords:
                item.add_marker(skip)


@contextmanager
def interrupted_at_call(module, name: str, call: int):
    """Inside, the `call`-th call (1-based) of ``module.name`` raises KeyboardInterrupt, as a killed run
    stops there; the block must end with it (the run is interrupted)."""
    original, calls = getattr(module, name), []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(module, name, interrupting)
        yield


def accel_flag() -> bool:
    """train.accel for configs that tests hand to other processes (pytest --accel)."""
    return os.environ.get("MEDPEFT_TEST_ACCEL") != "off"


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """medpeft's user cache folder (remembered image checks) is one of this session, for its subprocesses too."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _accel_switch(request, monkeypatch):
    """With --accel=off, medpeft.accel sees train.accel: false in every config."""
    if request.config.getoption("--accel") == "on":
        return
    from dataclasses import replace

    from medpeft import accel

    for name in ("apply", "memory_format", "prepare_process", "fused_attention"):
        original = getattr(accel, name)

        def off(*args, _original=original, **kwargs):
            return _original(*(replace(a, accel=False) if type(a).__name__ == "TrainConfig" else a for a in args),
                             **kwargs)
        monkeypatch.setattr(accel, name, off)


def write_squares_dataset(root, n_images=64, size=40, seed=0):
    """PNGs with a bright square (label 'bright') and/or a dark square (label 'dark'), 2 per patient."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        bright, dark = (int(v) for v in rng.integers(0, 2, 2))
        image = rng.normal(110, 25, (size, size))
        if bright:
            image[4:18, 4:18] += 90
        if dark:
            image[size - 18:size - 4, size - 18:size - 4] -= 70
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / f"img{i:03d}.png")
        rows.append({"path": f"img{i:03d}.png", "patient": f"p{i // 2}", "bright": bright, "dark": dark})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


@pytest.fixture(scope="session")
def squares_csv(tmp_path_factory):
    return write_squares_dataset(tmp_path_factory.mktemp("squares"))


@pytest.fixture
def run_config(squares_csv, tmp_path):
    """A plain-dict run config of a 2-epoch LoRA run on the squares data; tests change what they need."""
    return {
        "model": dict(TINY_VIT),
        "data": {"csv": str(squares_csv), "patient_column": "patient", "labels": ["bright", "dark"],
                 "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0.5, "log_every_steps": 2},
        "output_dir": str(tmp_path / "run"),
    }


def split_scores(evaluation: dict) -> dict:
    """An evaluation's metrics (medpeft.evaluate) without what it says about itself: the split's metrics."""
    return {key: value for key, value in evaluation.items() if key != "evaluation"}


def assert_metrics_close(a, b, atol: float = 1e-4, where: str = "metrics") -> None:
    """Two nested metrics equal, floats within `atol`: what two equal runs agree on when their logits may differ
    in the last bits (another kernel, batch composition, recomputation); a temperature fitted on such logits
    moves within the optimiser's tolerance with them. Rank-based metrics (AUROC) are compared exactly by callers."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_metrics_close(a[key], b[key], atol, f"{where}.{key}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_metrics_close(x, y, atol, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= atol, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
