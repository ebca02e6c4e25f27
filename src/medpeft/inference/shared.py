"""Many task runs on one backbone in memory. Each run's model is a copy of the backbone's modules that
shares the backbone's frozen parameter and buffer tensors; only what the run trained (its adapter, its
head, or for full fine-tuning every weight) is its own. Memory grows by the runs' trained parameters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from medpeft.backbones import create_backbone
from medpeft.config import RunConfig
from medpeft.engine.assemble import Built, load_model, shared_backbone
from medpeft.errors import ConfigError


def backbone_key(config: RunConfig) -> dict:
    """What makes two runs' frozen backbones the same tensors. Randomly initialised weights are the same
    only from the same seed and head size (timm draws the head's init with the backbone's)."""
    key = {"model": replace(config.model, drop_path_rate=0.0)}
    if config.model.weights == "random":
        key.update(seed=config.train.seed, classes=len(config.data.labels))
    return key


def shared_models(configs: list[RunConfig], run_dirs: list[Path]) -> list[Built]:
    """Each run's model (eval mode, its best weights) built by the one model assembler over one shared backbone."""
    key = backbone_key(configs[0])
    for config, run_dir in zip(configs[1:], run_dirs[1:]):
        if backbone_key(config) != key:
            raise ConfigError(f"{run_dir}: fine-tuned from another backbone than {run_dirs[0]} "
                              f"({config.model.name} from {config.model.weights!r}); --runs needs runs of one "
                              f"backbone checkpoint")
    torch.manual_seed(configs[0].train.seed)
    backbone, _ = create_backbone(configs[0].model, len(configs[0].data.labels))
    built = [load_model(run_dir, config, backbone=shared_backbone(backbone))
             for config, run_dir in zip(configs, run_dirs)]
    backbone.requires_grad_(False)  # the shared tensors are every run's frozen ones
    return built
