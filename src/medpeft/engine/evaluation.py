"""A model's outputs and metrics over a whole split, in dataset order, on one process or several."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, softmax
from torch import nn
from torch.utils.data import DataLoader

from medpeft import accel
from medpeft.config import RunConfig
from medpeft.data.cache import ImageCache
from medpeft.data.table import META_PREFIX
from medpeft.engine import rundir
from medpeft.engine.distributed import SINGLE, Processes
from medpeft.engine.loaders import make_loader, to_device
from medpeft.engine.runtime import autocast
from medpeft.errors import TrainingError
from medpeft.metrics import classification_metrics
from medpeft.metrics.calibration import (
    BINNING,
    N_BINS,
    apply_temperature,
    calibration_metrics,
    fit_temperature,
    negative_log_likelihood,
)
from medpeft.metrics.subgroups import subgroup_metrics


@torch.no_grad()
def gathered(fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device,
             config: RunConfig, procs: Processes = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(batch)`` (on the CPU) and the targets over the whole dataset, in dataset order: each process
    computes its batches of the loader's plan and the outputs of all processes are gathered."""
    outputs, targets = [], []
    layout = accel.memory_format(config.model.family, config.train)
    for x, y in loader:
        with autocast(device, config.train.precision):
            outputs.append(fn(to_device(x, device, layout)).cpu())
        targets.append(y)
    indices = [i for batch in loader.batch_sampler for i in batch]
    mine = (indices, torch.cat(outputs), torch.cat(targets)) if outputs else None
    parts = [part for part in procs.all_gather(mine) if part is not None]
    order = torch.from_numpy(np.argsort(np.concatenate([part[0] for part in parts]), kind="stable"))
    return torch.cat([part[1] for part in parts])[order], torch.cat([part[2] for part in parts])[order]


@dataclass
class SplitOutputs:
    """A model's outputs over one split, in the table's order."""

    split: str
    rows: pd.DataFrame
    """The split's rows of the table (image_id, ..., meta:NAME)."""
    logits: np.ndarray
    """(N, K) float32."""
    targets: np.ndarray
    """(N, K): 1, 0 or NaN (unknown)."""


def split_outputs(model: nn.Module, table: pd.DataFrame, split: str, config: RunConfig, device: torch.device,
                  cache: ImageCache | None = None, procs: Processes = SINGLE,
                  features: dict | None = None) -> SplitOutputs | None:
    """The model's logits and the targets over one split (None if the split is empty). Under DDP, pass the
    unwrapped model; with `features` (cached frozen-prefix outputs per split), pass the model's Suffix."""
    rows = table[table["split"] == split]
    if rows.empty:
        return None
    loader = make_loader(table, split, config, train=False, cache=cache, procs=procs,
                         features=features[split] if features else None)
    model.eval()
    logits, targets = gathered(lambda x: model(x).float(), loader, device, config, procs)
    if not torch.isfinite(logits).all():
        raise TrainingError(f"{config.output_dir}: the model gives non-finite outputs on the {split} split: "
                            f"training diverged (lower train.lr; on GPU prefer bf16 to fp16)")
    return SplitOutputs(split, rows.reset_index(drop=True), logits.numpy(), targets.numpy())


def probabilities(logits: np.ndarray, task: str, temperatures: list[float] | None = None) -> np.ndarray:
    """(N, K) probabilities of (N, K) logits: softmax over the labels for a multiclass task, else a sigmoid
    per label; with `temperatures` (see medpeft.metrics.calibration), of the logits divided by them."""
    if temperatures is not None:
        return apply_temperature(logits, temperatures, task)
    return softmax(logits, axis=1) if task == "multiclass" else expit(logits)


def split_metrics(outputs: SplitOutputs, config: RunConfig, temperatures: list[float] | None = None,
                  evidence: bool = False, calibrated: bool = False) -> dict:
    """classification_metrics of the split's probabilities (temperature-scaled with `calibrated`); with
    `evidence`, also "calibration" (raw and, with `temperatures`, calibrated: ECE, Brier, reliability per
    label) and "subgroups" (per-subgroup AUROC of each of the data's subgroup columns present)."""
    labels, task = list(config.data.labels), config.data.task
    raw = probabilities(outputs.logits, task)
    scaled = probabilities(outputs.logits, task, temperatures) if temperatures is not None else None
    if calibrated and scaled is None:
        raise ValueError("calibrated metrics need temperatures")
    probs = scaled if calibrated else raw
    metrics = classification_metrics(outputs.targets, probs, labels, task)
    if evidence:
        metrics["calibration"] = {
            "binning": BINNING, "n_bins": N_BINS,
            "raw": calibration_metrics(outputs.targets, raw, labels),
            "calibrated": None if scaled is None else calibration_metrics(outputs.targets, scaled, labels),
            "temperatures": None if temperatures is None else temperature_record(temperatures, labels, task)}
        groups = {name: outputs.rows[META_PREFIX + name].astype(str).to_numpy()
                  for name in config.data.subgroups() if META_PREFIX + name in outputs.rows}
        metrics["subgroups"] = subgroup_metrics(outputs.targets, probs, labels, groups)
    return metrics


def temperature_record(temperatures: list[float], labels: list[str], task: str) -> dict:
    """{label: T} per label, or {"*": T} for a multiclass task's one temperature."""
    return {"*": temperatures[0]} if task == "multiclass" else dict(zip(labels, temperatures))


def evaluate_split(model: nn.Module, table: pd.DataFrame, split: str, config: RunConfig, device: torch.device,
                   cache: ImageCache | None = None, predictions: list | None = None, procs: Processes = SINGLE,
                   features: dict | None = None) -> dict | None:
    """Metrics of `model` on one split (None if the split is empty); with `predictions`, also append the
    split's rows of predictions.csv to it. Under DDP, pass the unwrapped model; with `features` (cached
    frozen-prefix outputs per split), pass the model's Suffix."""
    outputs = split_outputs(model, table, split, config, device, cache, procs, features)
    if outputs is None:
        return None
    if predictions is not None:
        predictions.append(prediction_rows(outputs, config))
    return split_metrics(outputs, config)


def prediction_rows(outputs: SplitOutputs, config: RunConfig, temperatures: list[float] | None = None) -> pd.DataFrame:
    """The split's rows of predictions.csv (probabilities temperature-scaled with `temperatures`)."""
    probs = probabilities(outputs.logits, config.data.task, temperatures)
    return rundir.prediction_frame(outputs.rows, outputs.split, list(config.data.labels), probs, outputs.targets)


def fit_calibration(val: SplitOutputs, config: RunConfig) -> tuple[list[float], dict]:
    """Temperature scaling fitted on the val split's logits (one temperature per label, one for a multiclass
    task; medpeft.metrics.calibration.fit_temperature): the temperatures, and the record calibration.json
    holds, with the val negative log-likelihood (mean BCE over known targets, or cross-entropy) before and
    after."""
    labels, task = list(config.data.labels), config.data.task
    temperatures = fit_temperature(val.logits, val.targets, task)
    return temperatures, {"method": "temperature scaling", "fitted_on": "val", "task": task,
            "temperatures": temperature_record(temperatures, labels, task),
            "val_nll_before": negative_log_likelihood(val.logits, val.targets, task),
            "val_nll_after": negative_log_likelihood(val.logits, val.targets, task, temperatures)}


def stored_temperatures(record: dict, labels: list[str], task: str) -> list[float]:
    """The temperatures of a calibration.json record, in label order (one for a multiclass task)."""
    temperatures = record["temperatures"]
    return [float(temperatures["*"])] if task == "multiclass" else [float(temperatures[label]) for label in labels]
