"""A model's outputs and metrics over a whole split, in dataset order, on one process or several."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from medpeft import accel
from medpeft.config import RunConfig
from medpeft.data.cache import ImageCache
from medpeft.engine import rundir
from medpeft.engine.distributed import SINGLE, Processes
from medpeft.engine.loaders import make_loader, to_device
from medpeft.engine.runtime import autocast
from medpeft.errors import TrainingError
from medpeft.metrics import classification_metrics


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


def probabilities(model: nn.Module, loader: DataLoader, device: torch.device, config: RunConfig,
                  procs: Processes = SINGLE) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, K) and targets (N, K) over the whole dataset, in dataset order: softmax over the
    labels for a multiclass task, else a sigmoid per label."""
    model.eval()
    logits, targets = gathered(lambda x: model(x).float(), loader, device, config, procs)
    probs = logits.softmax(1) if config.data.task == "multiclass" else logits.sigmoid()
    return probs.numpy(), targets.numpy()


def evaluate_split(model: nn.Module, table: pd.DataFrame, split: str, config: RunConfig, device: torch.device,
                   cache: ImageCache | None = None, predictions: list | None = None, procs: Processes = SINGLE,
                   features: dict | None = None) -> dict | None:
    """Metrics of `model` on one split (None if the split is empty); with `predictions`, also append the
    split's rows of predictions.csv to it. Under DDP, pass the unwrapped model; with `features` (cached
    frozen-prefix outputs per split), pass the model's Suffix."""
    if not (table["split"] == split).any():
        return None
    loader = make_loader(table, split, config, train=False, cache=cache, procs=procs,
                         features=features[split] if features else None)
    probs, targets = probabilities(model, loader, device, config, procs)
    if not np.isfinite(probs).all():
        raise TrainingError(f"{config.output_dir}: the model gives non-finite outputs on the {split} split: "
                            f"training diverged (lower train.lr; on GPU prefer bf16 to fp16)")
    if predictions is not None:
        predictions.append(rundir.prediction_frame(table[table["split"] == split], split, list(config.data.labels),
                                                   probs, targets))
    return classification_metrics(targets, probs, config.data.labels, config.data.task)
