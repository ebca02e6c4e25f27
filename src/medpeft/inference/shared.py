"""Many task runs on one backbone in memory. Each run's model is a copy of the backbone's modules that
shares the backbone's frozen parameter and buffer tensors; only what the run trained (its adapter, its
head, or for full fine-tuning every weight) is its own. Memory grows by the runs' trained parameters."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from medpeft.backbones import create_backbone
from medpeft.backbones.layers import use_onednn_linear
from medpeft.config import RunConfig
from medpeft.errors import ConfigError
from medpeft.methods import MethodSpec, get_method
from medpeft.methods.registry import load_weights
from medpeft.train import rundir


def backbone_key(config: RunConfig) -> dict:
    """What makes two runs' frozen backbones the same tensors. Randomly initialised weights are the same
    only from the same seed and head size (timm draws the head's init with the backbone's)."""
    key = {"model": replace(config.model, drop_path_rate=0.0)}
    if config.model.weights == "random":
        key.update(seed=config.train.seed, classes=len(config.data.labels))
    return key


def _unshare_trainable(model: nn.Module, shared: dict) -> None:
    """Give every parameter the method trains its own tensor, so loading the run's weights leaves the
    shared backbone untouched."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and id(param) in shared:
                module._parameters[name] = nn.Parameter(param.detach().clone())


def shared_models(configs: list[RunConfig], run_dirs: list[Path]) -> list[tuple[nn.Module, MethodSpec]]:
    """(model in eval mode with the run's best weights, method) per run, over one shared backbone."""
    key = backbone_key(configs[0])
    for config, run_dir in zip(configs[1:], run_dirs[1:]):
        if backbone_key(config) != key:
            raise ConfigError(f"{run_dir}: fine-tuned from another backbone than {run_dirs[0]} "
                              f"({config.model.name} from {config.model.weights!r}); --runs needs runs of one "
                              f"backbone checkpoint")
    torch.manual_seed(configs[0].train.seed)
    backbone, _ = create_backbone(configs[0].model, len(configs[0].data.labels))
    backbone.requires_grad_(False)
    shared = {id(t): t for t in (*backbone.parameters(), *backbone.buffers())}
    out = []
    for config, run_dir in zip(configs, run_dirs):
        model = copy.deepcopy(backbone, dict(shared))  # the memo maps every tensor to itself: not copied
        model.requires_grad_(True)
        if model.get_classifier().out_features != len(config.data.labels):
            model.reset_classifier(len(config.data.labels))
        spec = get_method(config.method.name)
        model = spec.apply(model, config.method)
        _unshare_trainable(model, shared)
        load_weights(spec, model, run_dir / rundir.WEIGHTS)
        use_onednn_linear(model)  # as build_model: the same kernel, the same probabilities as evaluation
        out.append((model.eval(), spec))
    return out
