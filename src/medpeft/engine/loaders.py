"""Batches of a run's images: the decode-once cache, the DataLoader of one split (this process's share
of it under DDP), and batches on the device in the model's layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from medpeft.config import PretrainConfig, RunConfig
from medpeft.data.cache import ImageCache, build_cache
from medpeft.data.dataset import ImageDataset, build_transform
from medpeft.engine.distributed import SINGLE, BatchPlan, Processes


def image_cache(table: pd.DataFrame, config: RunConfig | PretrainConfig, progress: bool = False) -> ImageCache | None:
    """The decode-once cache of the table's images at the training size, if data.cache_dir is set."""
    if not config.data.cache_dir:
        return None
    return build_cache(table["image_id"].tolist(), table["path"].tolist(), config.model.img_size,
                       config.data.cache_dir, workers=max(1, config.data.num_workers), progress=progress,
                       alpha=config.data.alpha)


def make_loader(table: pd.DataFrame, split: str, config: RunConfig | PretrainConfig, train: bool,
                cache: ImageCache | None = None, procs: Processes = SINGLE,
                features: torch.Tensor | None = None, targets: np.ndarray | None = None) -> DataLoader:
    """This process's batches of one split: training takes its part of each shuffled global batch,
    evaluation its share of whole batches in dataset order (see ``BatchPlan``). With `features` (the
    split's cached frozen-prefix outputs, in table order), their batches instead of the images'. With
    `targets` (one row per image of the split, in table order), those instead of the label columns."""
    rows = table[table["split"] == split]
    targets = rows[config.data.labels].to_numpy() if targets is None else targets
    if features is not None:
        dataset = TensorDataset(features, torch.tensor(targets, dtype=torch.float32))
    else:
        transform = build_transform(config.model.img_size, config.data.mean, config.data.std,
                                    config.augment if train else None)
        dataset = ImageDataset(rows["path"].tolist(), targets, transform, seed=config.train.seed,
                               random=train and config.augment.enabled, cache=cache,
                               image_ids=rows["image_id"].tolist(), alpha=config.data.alpha)
    generator = torch.Generator()
    plan = BatchPlan(len(dataset), config.train.batch_size if train else config.train.eval_batch_size,
                     shuffle=train, generator=generator, procs=procs, split=train)
    return DataLoader(dataset, batch_sampler=plan, num_workers=config.data.num_workers, generator=generator,
                      pin_memory=torch.cuda.is_available())


def to_device(x: torch.Tensor, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    """A batch on the device; images (4-D) in the model's memory layout."""
    return x.to(device, non_blocking=True, memory_format=layout) if x.dim() == 4 else x.to(device, non_blocking=True)
