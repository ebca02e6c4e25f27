"""The pieces of fine-tuning that the recipe (medpeft.train.recipe) puts together: the checked dataset,
what a method derives from the run, the optimiser, the loss, the frozen-prefix features and the
decision rule chosen on validation."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from medpeft.config import RunConfig, TrainConfig
from medpeft.data import read_split_dataset
from medpeft.data.cache import ImageCache
from medpeft.data.images import check_images
from medpeft.engine.distributed import SINGLE, Processes
from medpeft.engine.evaluation import gathered
from medpeft.engine.loaders import make_loader
from medpeft.engine.rundir import prediction_arrays
from medpeft.errors import DataError
from medpeft.methods import get_method, unwrap
from medpeft.metrics.thresholds import YOUDEN, select_thresholds
from medpeft.train.prefix import prefix


def prepare_table(config: RunConfig, procs: Processes = SINGLE, progress: bool = False) -> pd.DataFrame:
    """Read the dataset and its split, check that every used image decodes, check val can select a model.

    Under DDP the main process checks the images first; the others then find its remembered results."""
    if not procs.main:
        procs.barrier()
    table = check_images(read_split_dataset(config.data), config.data, progress=progress and procs.main)
    if procs.main:
        procs.barrier()
    check_foundation_split(config, table)
    val = table.loc[table["split"] == "val", config.data.labels].to_numpy()
    if not any(0 < np.nansum(column) < np.isfinite(column).sum() for column in val.T):
        raise DataError(f"{config.data.csv}: the validation split has no label with both classes; "
                        f"AUROC cannot select a model (more patients or a larger val_fraction?)")
    return table


def check_foundation_split(config: RunConfig, table: pd.DataFrame) -> None:
    """Refuse a foundation that trained on this run's val or test images: a ``model.weights`` file with a
    medpeft run's split.csv beside it (a ``medpeft pretrain`` run) is checked image by image. Pretraining
    has no labels to stratify by, so a stratified fine-tuning split is another split."""
    weights = Path(str(config.model.weights))
    split_file = weights.parent / "split.csv"
    if not (weights.is_file() and split_file.is_file()):
        return
    held_out = table.loc[table["split"].isin(["val", "test"]), "image_id"]
    leaked = int(held_out.isin(trained_images(split_file)).sum())
    if leaked:
        raise DataError(f"model.weights {weights}: that run pretrained on {leaked} of this run's "
                        f"{len(held_out)} val and test images ({split_file}); draw one split for both: "
                        f"data.split.stratify: false here and there (pretraining has no labels to stratify by)")


def trained_images(split_file: Path) -> set[str]:
    """The image ids a run trained on: the 'train' rows of its split.csv."""
    split = pd.read_csv(split_file, usecols=["image_id", "split"])
    return set(split.loc[split["split"] == "train", "image_id"])


def optimizer_steps(config: RunConfig, table: pd.DataFrame) -> int:
    """Optimiser steps of the whole run (the last batch of an epoch is kept, and ends an accumulation)."""
    batches = math.ceil(int((table["split"] == "train").sum()) / config.train.batch_size)
    return config.train.epochs * math.ceil(batches / config.train.grad_accum_steps)


def resolve_method(config: RunConfig, table: pd.DataFrame) -> RunConfig:
    """The config with what the method derives from the run filled in (e.g. AdaLoRA's step count)."""
    hooks = get_method(config.method.name).hooks
    if hooks is None:
        return config
    return replace(config, method=hooks.configure(config.method, optimizer_steps(config, table)))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimiser factory on the unwrapped timm model, over trainable parameters only: no weight
    decay for 1-D parameters (norms, biases) and the model's no_weight_decay() set (pos_embed,
    cls_token); layer-wise lr decay from the model's block structure (lr_scale per group). AdamW is
    fused (one kernel for all parameters)."""
    return create_optimizer_v2(
        unwrap(model), opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
        **({"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {"fused": True}))


def loss_function(task: str):
    """(logits (B, K), targets (B, K)) -> the mean loss: cross-entropy of the one-hot class, or masked BCE."""
    if task == "multiclass":
        return lambda logits, targets: nn.functional.cross_entropy(logits, targets.argmax(1))
    return masked_bce


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the known targets; NaN (e.g. an ignored uncertain label) is left out."""
    known = ~torch.isnan(targets)
    if known.all():
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)
    # An all-unknown batch still gives a graph, with zero gradient.
    return nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known]) if known.any() \
        else logits.sum() * 0.0


def prefix_features(model: nn.Module, end: int, table: pd.DataFrame, config: RunConfig, device: torch.device,
                    cache: ImageCache | None, procs: Processes) -> dict[str, torch.Tensor]:
    """The frozen prefix's output for every image of each split (table order), computed once, in eval mode."""
    model.eval()
    return {split: gathered(lambda x: prefix(model, x, end).float(),
                            make_loader(table, split, config, train=False, cache=cache, procs=procs),
                            device, config, procs)[0]
            for split in ("train", "val", "test") if (table["split"] == split).any()}


def decision_rule(val: pd.DataFrame, config: RunConfig) -> dict:
    """What turns probabilities into decisions, chosen on the val rows of predictions.csv: arg-max for a
    multiclass task, else a per-label threshold by Youden's J."""
    labels = list(config.data.labels)
    if config.data.task == "multiclass":
        return {"rule": "argmax", "thresholds": None}
    targets, probs = prediction_arrays(val, labels)
    return {"rule": YOUDEN, "thresholds": select_thresholds(targets, probs, labels, YOUDEN)}
