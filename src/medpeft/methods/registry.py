"""One registry from a method's name to its config (a MethodConfig subclass, registered under
``method.name`` too) and the functions that apply, save, load and merge it. A method registers itself
at import: ``register_method(MethodSpec(...))``; a new method is one file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from medpeft.config import METHODS, MethodConfig, build
from medpeft.errors import CheckpointError
from medpeft.files import write_bytes_atomic

ADAPTER_FILE = "adapter.safetensors"
RUNNING_STATS_FILE = "running_stats.safetensors"
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def freeze_all_but_head(model: nn.Module) -> nn.Module:
    """Freeze every parameter but the classifier's (a method then unfreezes or adds its own); returns `model`."""
    model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside a method's wrapper (e.g. a peft.PeftModel), for timm's helpers."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable_state_dict(model: nn.Module) -> dict:
    """Only the parameters that training changes, detached, on the CPU, in the default layout (a CNN's
    weights are channels-last in training)."""
    return {n: p.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict, source: str) -> None:
    """Load a trainable-parameter state into an applied model, refusing missing or extra keys."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointError(
            f"{source}: does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(state, strict=False)


def _write_safetensors(tensors: dict, path: Path) -> None:
    write_bytes_atomic(path, save(tensors))


def read_safetensors(path: Path) -> dict:
    """The tensors of a safetensors file of a run, or one CheckpointError naming it."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def save_trainable(model: nn.Module, directory: Path) -> None:
    """Default save: the trainable parameters as safetensors (names as in the applied model)."""
    _write_safetensors(trainable_state_dict(model), Path(directory) / ADAPTER_FILE)


def load_trainable(model: nn.Module, directory: Path) -> None:
    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter weights not found")
    load_trainable_state_dict(model, read_safetensors(path), str(path))


def running_stats(model: nn.Module) -> dict:
    """The BatchNorm running statistics: buffers that training changes even where the weights are frozen."""
    return {f"{name}.{key}" if name else key: buffer.detach().cpu().clone()
            for name, module in model.named_modules() if isinstance(module, _BATCH_NORMS)
            for key, buffer in module.named_buffers(recurse=False)}


def load_running_stats(model: nn.Module, state: dict, source: str) -> None:
    """Put saved running statistics into `model` as new tensors (a backbone shared with other runs is left as is)."""
    expected = running_stats(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(f"{source}: BatchNorm statistics do not fit the model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for key, value in state.items():
        module_name, _, buffer_name = key.rpartition(".")
        setattr(model.get_submodule(module_name), buffer_name, value.clone())  # a new tensor: not shared


def save_weights(spec: "MethodSpec", model: nn.Module, directory: Path) -> None:
    """A run's weights: the method's trained parameters, and the BatchNorm statistics if the model has any."""
    spec.save(model, directory)
    stats = running_stats(model)
    if stats:
        _write_safetensors(stats, Path(directory) / RUNNING_STATS_FILE)


def load_weights(spec: "MethodSpec", model: nn.Module, directory: Path) -> None:
    """Load what `save_weights` wrote into a model that `spec.apply` has just prepared."""
    spec.load(model, directory)
    if running_stats(model):
        path = Path(directory) / RUNNING_STATS_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: BatchNorm statistics not found (runs of medpeft 0.1 before they were "
                                  f"saved lose them: train the run again)")
        load_running_stats(model, read_safetensors(path), str(path))


def own_weights(model: nn.Module) -> nn.Module:
    """The merge of a method that trains the timm model's own weights: there is nothing to fold."""
    return model


@dataclass(frozen=True)
class TrainingHooks:
    """For a method that acts during training beyond its parameters' gradients (e.g. AdaLoRA)."""
    configure: Callable[[Any, int], Any]
    """(method config, the run's optimiser steps) -> the resolved config, saved with the run."""
    loss: Callable[[nn.Module], Any]
    """A term added to the training loss (a scalar tensor)."""
    after_step: Callable[[nn.Module, int], None]
    """Called after each optimiser step (0-based), before the gradients are cleared."""
    state_dict: Callable[[nn.Module], dict]
    """Training state outside the parameters, checkpointed for an exact resume."""
    load_state_dict: Callable[[nn.Module, dict], None]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    """Its knobs; also says which backbone families the method applies to (``families``)."""
    apply: Callable[[nn.Module, Any], nn.Module]
    """Freeze and inject in place as needed (the classifier always trains); return the module to train and call."""
    description: str
    reference: str = ""
    save: Callable[[nn.Module, Path], None] = save_trainable
    load: Callable[[nn.Module, Path], None] = load_trainable
    """Load saved weights into a model that `apply` has just prepared."""
    merge: Callable[[nn.Module], nn.Module] | None = None
    """Fold the method into plain backbone weights; None when the method cannot merge."""
    hooks: TrainingHooks | None = None

    @property
    def families(self) -> tuple[str, ...]:
        return self.config_cls.families


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make `spec` known by its name, to the config loader (``method.name``) and to ``get_method``."""
    METHODS.register(spec.name)(spec.config_cls)
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    METHODS.get(name)  # the loader's error for an unknown name
    return _REGISTRY[name]


def list_methods() -> list[MethodSpec]:
    return list(_REGISTRY.values())


def method_config_from_dict(data: Any) -> MethodConfig:
    """The config of the method named by ``data['name']`` (or by `data`, a name)."""
    return build(MethodConfig, {"name": data} if isinstance(data, str) else data)

