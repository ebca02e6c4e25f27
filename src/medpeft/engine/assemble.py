"""One model assembler: a backbone with its weights, the method applied, the speed-ups of
``medpeft.accel``. Fine-tuning, evaluation, prediction and the shared-backbone predictor all build
their models here, so a run is evaluated and served by the model it was trained as."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from medpeft import accel
from medpeft.backbones import LoadReport, count_parameters, create_backbone
from medpeft.backbones.checkpoint import check_finite
from medpeft.backbones.text import install_text_head
from medpeft.config import RunConfig
from medpeft.engine import rundir
from medpeft.engine.runtime import resolve_device
from medpeft.errors import ConfigError
from medpeft.methods import MethodSpec, get_method
from medpeft.methods.registry import load_weights


@dataclass
class Built:
    model: nn.Module
    """The model to train and call (the method may wrap the backbone)."""
    spec: MethodSpec
    load_report: LoadReport | None
    backbone_parameters: int
    trainable_parameters: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_parameters / self.backbone_parameters


def build_model(config: RunConfig, backbone: nn.Module | None = None) -> Built:
    """The backbone with its weights (seeded first: the new head's init is reproducible) and the method
    applied, in the layout and with the kernels ``config.train`` asks for. With `backbone` (a copy that
    shares another model's frozen tensors, see ``shared_backbone``), that instead of a new one; every
    parameter the method trains then gets its own tensor."""
    report, shared = None, set()
    if backbone is None:
        torch.manual_seed(config.train.seed)
        backbone, report = create_backbone(config.model, len(config.data.labels))
        if config.model.head_init == "text":
            install_text_head(backbone, config.model, list(config.data.labels), config.data.task == "multiclass")
    else:
        if backbone.get_classifier().out_features != len(config.data.labels):
            backbone.reset_classifier(len(config.data.labels))
        shared = {id(t) for t in (*backbone.parameters(), *backbone.buffers())}
    _, backbone_parameters = count_parameters(backbone)
    spec = get_method(config.method.name)
    model = spec.apply(backbone, config.method)
    _own_trainable(model, shared)
    accel.apply(model, config.model.family, config.train, resolve_device(config.train.device))
    return Built(model, spec, report, backbone_parameters, count_parameters(model)[0])


def _own_trainable(model: nn.Module, shared: set[int]) -> None:
    """Give every trainable parameter that is one of the `shared` tensors a tensor of its own."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and id(param) in shared:
                setattr(module, name, nn.Parameter(param.detach().clone()))


def shared_backbone(backbone: nn.Module) -> nn.Module:
    """A copy of `backbone`'s modules that shares all its parameter and buffer tensors (trainable again)."""
    memo = {id(t): t for t in (*backbone.parameters(), *backbone.buffers())}
    return copy.deepcopy(backbone, memo).requires_grad_(True)


def load_model(run_dir: str | Path, config: RunConfig | None = None, backbone: nn.Module | None = None) -> Built:
    """A finished run's model with its best weights (finite: CheckpointError naming the file otherwise), in
    eval mode, on the CPU."""
    config = config or rundir.finished_config(Path(run_dir))
    built = build_model(config, backbone)
    weights = Path(run_dir) / rundir.WEIGHTS
    load_weights(built.spec, built.model, weights)
    for path in sorted(weights.glob("*.safetensors")):
        with safe_open(str(path), "pt") as tensors:
            check_finite(((name, tensors.get_tensor(name)) for name in tensors.keys()), path)  # noqa: SIM118 (not a dict)
    built.model.eval()
    return built


def check_buildable(config: RunConfig, where: str = "") -> None:
    """Build `config`'s model on the meta device, without its checkpoint (no memory, no file read), so
    that a method that cannot apply to the backbone (a target it lacks, a block size that does not divide
    a width) fails now, not when the run starts; ConfigError prefixed with `where`."""
    method = config.method
    if getattr(method, "total_step", 0) is None:  # filled in from the data by medpeft train
        method = replace(method, total_step=1_000_000)
    try:
        with torch.device("meta"):
            model = replace(config.model, weights="random", head_init="random")  # a text head reads the file
            build_model(replace(config, model=model, method=method,
                                train=replace(config.train, accel=False)))
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as e:
        raise ConfigError(f"{where}method {config.method.name!r} cannot apply to {config.model.name}: "
                          f"{str(e).splitlines()[0]}") from None
