"""The run directory: what a run writes, written atomically, and complete only when metrics.json exists.

    config.yaml      the resolved config
    split.csv        image_id, patient_id, split (and metadata meta:NAME) of every image used
    log.jsonl        training log (steps, epochs, resumes): one record per step, those after the
                     checkpoint dropped when the run resumes
    weights/         the best trainable weights (the method's save format)
    checkpoint.pt    the last epoch's trainable weights + optimiser / scheduler / RNG state, for resume
    predictions.csv  the best weights' val and test probabilities and targets per image
                     (image_id, split, prob:LABEL..., target:LABEL..., meta:NAME...)
    thresholds.json  the decision rule chosen on val: per-label thresholds (Youden's J) or arg-max
    calibration.json temperature scaling fitted on val (per label; one for a multiclass task), applied by
                     predict; predictions.csv and thresholds.json hold the raw (unscaled) probabilities
    evaluations/     one folder per later evaluation (medpeft evaluate): metrics.json, predictions.csv
    metrics.json     validation and test metrics, parameter counts, time; written last

Fine-tuning (medpeft.train), MAE pretraining (medpeft.pretrain), studies, inference and the CLI all read
and write run directories through this module. A process training a run holds the folder's lock
(medpeft.files.locked) from start to end; a file of the folder that cannot be read is one error naming it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from packaging.version import Version

from medpeft.config import PretrainConfig, RunConfig, build, read_yaml_mapping, upgrade_saved
from medpeft.data import read_dataset
from medpeft.data.table import META_PREFIX
from medpeft.engine.distributed import SINGLE, Processes
from medpeft.errors import CheckpointError, ConfigError, DataError, RunDirError
from medpeft.files import LOCK, read_json, remove_temporaries, write_bytes_atomic, write_text_atomic
from medpeft.version import __version__

CONFIG = "config.yaml"
SPLIT = "split.csv"
LOG = "log.jsonl"
WEIGHTS = "weights"
CHECKPOINT = "checkpoint.pt"
PREDICTIONS = "predictions.csv"
THRESHOLDS = "thresholds.json"
CALIBRATION = "calibration.json"
EVALUATIONS = "evaluations"
METRICS = "metrics.json"
LOG_SIZE = "log_size"


def is_complete(run_dir: Path) -> bool:
    return (Path(run_dir) / METRICS).is_file()


def append_log(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_checkpoint(state: dict, run_dir: Path) -> None:
    """checkpoint.pt, atomically (a run killed while writing keeps the previous epoch's), with the size of
    log.jsonl at this point (LOG_SIZE: a resumed run drops the records written after it)."""
    buffer = io.BytesIO()
    torch.save({**state, LOG_SIZE: (Path(run_dir) / LOG).stat().st_size}, buffer)
    write_bytes_atomic(Path(run_dir) / CHECKPOINT, buffer.getvalue())


def _read_checkpoint(path: Path) -> dict:
    """A run's checkpoint.pt (``torch.load(weights_only=True)``: a pickle that would run code is refused)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(checkpoint, dict) and "state" in checkpoint:
            return checkpoint
        reason = "no training state in it"
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        reason = type(e).__name__
    raise CheckpointError(f"{path}: not a readable checkpoint ({reason}): damaged, or not one that medpeft wrote; "
                          f"delete it to start the run again from its first epoch")


def read_json_object(path: Path) -> dict:
    """A JSON file of a run directory (metrics.json, thresholds.json): an object, or one error naming it."""
    try:
        data = read_json(path)
    except ValueError as e:  # not JSON, not UTF-8
        raise RunDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_split(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except ValueError as e:  # pandas' parser and empty-data errors, not UTF-8
        raise RunDirError(f"{path}: not a readable CSV file ({str(e).strip().splitlines()[0]})") from None
    missing = [c for c in ("image_id", "patient_id", "split") if c not in table]
    if missing:
        raise RunDirError(f"{path}: lacks the columns {', '.join(missing)}")
    return table


def saved_config(run_dir: Path) -> dict:
    """The run's config.yaml as plain data, upgraded to this medpeft's schema (see config.upgrade_saved)."""
    return upgrade_saved(read_yaml_mapping(Path(run_dir) / CONFIG, "run config", "a mapping of sections"))


def _same_config(run_dir: Path, config: RunConfig | PretrainConfig) -> bool:
    """Whether the run directory's config.yaml is `config` (as this medpeft reads it: defaults filled in),
    but for output_dir: a run folder that was moved or copied resumes where it is now. A config.yaml that
    is not a readable mapping is an error naming it."""
    saved = {**saved_config(run_dir), "output_dir": config.output_dir}
    try:
        return build(type(config), saved) == config
    except ConfigError:
        return False


def check_run_dir(run_dir: Path, config: RunConfig | PretrainConfig) -> dict | None:
    """Refuse a complete run or another run's folder; return the checkpoint of a run to resume (None for a
    new run)."""
    run_dir = Path(run_dir)
    if is_complete(run_dir):
        raise RunDirError(f"{run_dir}: the run is complete already ({METRICS} exists); choose another output_dir")
    if (run_dir / CONFIG).is_file():
        if not _same_config(run_dir, config):
            raise RunDirError(f"{run_dir}: holds an unfinished run of another config; choose another output_dir "
                              f"or delete it")
        checkpoint = run_dir / CHECKPOINT
        return _read_checkpoint(checkpoint) if checkpoint.is_file() else None
    if run_dir.exists() and any(path.name != LOCK for path in run_dir.iterdir()):
        raise RunDirError(f"{run_dir}: exists and is not a medpeft run directory")
    return None


def _split_frame(table: pd.DataFrame) -> pd.DataFrame:
    return table[["image_id", "patient_id", "split", *metadata_columns(table)]].reset_index(drop=True)


def metadata_columns(table: pd.DataFrame) -> list[str]:
    """The table's metadata columns (meta:NAME, e.g. data.metadata_columns of the csv reader)."""
    return [c for c in table.columns if c.startswith(META_PREFIX)]


def start_run_dir(run_dir: Path, config_text: str, table: pd.DataFrame, checkpoint: dict | None) -> None:
    """Write config.yaml and split.csv, remove what killed writers left, and cut log.jsonl back to where
    `checkpoint` (the one to resume, None for a new run) was saved: the steps that run again log again.
    A resumed run must see the split it started with."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run_dir)
    split_path = run_dir / SPLIT
    key = ["image_id", "patient_id", "split"]  # metadata columns a newer reader adds do not change the split
    if checkpoint is not None and not _split_frame(table)[key].equals(_read_split(split_path)[key]):
        raise RunDirError(f"{split_path}: the data no longer give the split this run started with")
    write_text_atomic(run_dir / CONFIG, config_text)
    write_text_atomic(split_path, _split_frame(table).to_csv(index=False))
    log, size = run_dir / LOG, 0 if checkpoint is None else checkpoint.get(LOG_SIZE)
    if log.is_file() and size is not None:  # None: a checkpoint saved before its log size was
        write_bytes_atomic(log, log.read_bytes()[:size])


def rng_state(device: torch.device, procs: Processes = SINGLE) -> dict:
    """The RNG states of every process, which a checkpoint keeps so that a resumed run draws what an
    uninterrupted one would (dropout, drop path)."""
    mine = {"cpu": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
    return {"rng": procs.all_gather(mine)}


def restore_rng(checkpoint: dict, device: torch.device, run_dir: Path, procs: Processes = SINGLE) -> None:
    """Restore this process's RNG states from a checkpoint and log the resume."""
    states = checkpoint["rng"]
    if len(states) != procs.world:
        raise RunDirError(f"{Path(run_dir) / CHECKPOINT}: the run was started on {len(states)} processes; "
                          f"resume it on as many (--devices {len(states)})")
    torch.set_rng_state(states[procs.rank]["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[procs.rank]["cuda"], device)
    if procs.main:
        append_log(run_dir, {"event": "resume", "epoch": checkpoint["state"]["epoch"]})


def finished_config(run_dir: Path) -> RunConfig:
    """The config of a complete fine-tuning run of this medpeft (or an older one), with `run_dir` as its
    output_dir (a run that was moved is named where it is now); refuse any other folder."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunDirError(f"{run_dir}: not a medpeft run directory (no {CONFIG})")
    if not is_complete(run_dir):
        raise RunDirError(f"{run_dir}: the run is incomplete (no {METRICS}); resume it with medpeft train")
    metrics = read_json_object(run_dir / METRICS)
    written_by = metrics.get("medpeft_version", "0")
    if Version(written_by) > Version(__version__):
        raise RunDirError(f"{run_dir}: written by medpeft {written_by}, newer than this medpeft {__version__}; "
                          f"upgrade medpeft to use it")
    config = build(RunConfig, saved_config(run_dir))
    if list(config.data.labels) != metrics.get("labels"):
        raise RunDirError(f"{run_dir}: {CONFIG} names the labels {config.data.labels}, but the run was trained for "
                          f"{metrics.get('labels')} ({METRICS})")
    return dataclasses.replace(config, output_dir=str(run_dir))


def run_table(run_dir: Path, config: RunConfig) -> pd.DataFrame:
    """The run's dataset with the run's own split (split.csv)."""
    table = read_dataset(config.data).drop(columns="split", errors="ignore")
    saved = _read_split(Path(run_dir) / SPLIT)
    table = table.merge(saved[["image_id", "split"]], on="image_id", how="inner")
    if len(table) != len(saved):
        raise DataError(f"{config.data.csv}: lacks {len(saved) - len(table)} images of the run's split "
                        f"({Path(run_dir) / SPLIT})")
    return table


def prediction_frame(rows: pd.DataFrame, split: str, labels: list[str], probs: np.ndarray,
                     targets: np.ndarray) -> pd.DataFrame:
    """Rows of predictions.csv: image_id, split, prob:LABEL..., target:LABEL... ((N, K) arrays), then the
    metadata columns of `rows` (the split's rows of the run's table, in order)."""
    return pd.concat([pd.DataFrame({"image_id": rows["image_id"].to_numpy(), "split": split}),
                      pd.DataFrame(probs, columns=[f"prob:{label}" for label in labels]),
                      pd.DataFrame(targets, columns=[f"target:{label}" for label in labels]),
                      rows[metadata_columns(rows)].reset_index(drop=True)], axis=1)


def read_predictions(run_dir: Path, split: str, labels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ids, targets (N, K) and probabilities (N, K) of one split of a run's predictions.csv, sorted
    by image id."""
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        raise RunDirError(f"{path}: missing; the run's predictions are needed")
    table = pd.read_csv(path, dtype={"image_id": str})
    table = table[table["split"] == split].sort_values("image_id", kind="stable")
    return (table["image_id"].to_numpy(), *prediction_arrays(table, labels))


def prediction_arrays(rows: pd.DataFrame, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Targets (N, K) and probabilities (N, K) of rows of predictions.csv."""
    return (rows[[f"target:{label}" for label in labels]].to_numpy(float),
            rows[[f"prob:{label}" for label in labels]].to_numpy(float))
