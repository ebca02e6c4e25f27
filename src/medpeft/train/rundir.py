"""The run directory: what a run writes, written atomically, and complete only when metrics.json exists.

    config.yaml    resolved config
    split.csv      image_id, patient_id, split of every image used
    log.jsonl      training log (steps, epochs, resumes)
    weights/       the best trainable weights (the method's save format)
    checkpoint.pt  last epoch's trainable weights + optimiser/scheduler/RNG state, for resume
    predictions.csv  the best weights' val and test probabilities and targets per image
    thresholds.json  the decision rule chosen on val: per-label thresholds (Youden's J) or arg-max
    metrics.json   validation and test metrics, parameter counts, time; written last
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

CONFIG = "config.yaml"
SPLIT = "split.csv"
LOG = "log.jsonl"
WEIGHTS = "weights"
CHECKPOINT = "checkpoint.pt"
PREDICTIONS = "predictions.csv"
THRESHOLDS = "thresholds.json"
METRICS = "metrics.json"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def torch_save_atomic(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


@contextmanager
def atomic_directory(path: Path):
    """Yield a temporary folder; on success it replaces `path` (old contents removed)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def append_log(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def is_complete(run_dir: Path) -> bool:
    return (Path(run_dir) / METRICS).is_file()
