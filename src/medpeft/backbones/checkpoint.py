"""Load foreign checkpoints (MAE / MRM / medical MAE, DINOv2, timm, plain state_dicts) into a timm model.

All adaptation happens here, in one place: unwrap the container, strip wrapper prefixes, drop
pretraining-only keys (MAE decoder, mask token), let timm's own filter convert layouts and
resample position / patch embeddings, then load and check what is missing. Backbone weights that
the checkpoint lacks are an error, never a silent random init. Files are read with safetensors or
``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medpeft.backbones.layers import classifier_name
from medpeft.errors import CheckpointError

# Containers that training scripts wrap a state_dict in ({'model': ...} is MAE, MRM and medical MAE).
_CONTAINER_KEYS = ("model", "state_dict", "model_state", "teacher", "module")
# Prefixes that DDP, DINO and encoder-decoder wrappers put in front of the backbone's keys.
_WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "base_encoder.")
# Keys that only the MAE pretraining model has.
_PRETRAINING_ONLY = ("decoder_", "decoder.", "mask_token")


@dataclass
class LoadReport:
    """What happened to each key of a checkpoint when it was loaded into a model."""

    path: str
    loaded: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    """Pretraining-only keys (MAE decoder, mask token) and keys outside the backbone prefix."""
    head_skipped: list = field(default_factory=list)
    """Classifier keys whose shape is for another task; the new head is initialised instead."""
    fresh: list = field(default_factory=list)
    """Model keys not in the checkpoint that may start fresh (classifier, fc_norm)."""
    unexpected: list = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.path}"]
        for label, keys in (("ignored", self.ignored), ("head skipped", self.head_skipped),
                            ("initialised fresh", self.fresh), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
                parts.append(f"{label}: {shown}")
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and unwrap it to a flat ``{name: tensor}`` dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            # MAE-style trainers save their argparse options beside the weights: plain data.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds Python objects beyond tensors and plain "
                f"containers, which could run code ({first}); save it as a plain state_dict or safetensors"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    state_dict = _unwrap(obj, path)
    check_finite(state_dict.items(), path)
    return state_dict


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source) -> None:
    """Refuse (name, tensor) weights that hold NaN or infinity (a diverged run, a damaged file), naming
    `source` and the tensor."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: {name} holds NaN or infinite values; expected finite weights (a "
                                  f"diverged run or a damaged file)")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            # Some trainers keep non-tensor entries (an epoch counter) beside the weights.
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
        obj = inner
    if not _is_state_dict(obj):
        raise CheckpointError(
            f"{path}: no state_dict found (expected tensors, or a dict under one of {list(_CONTAINER_KEYS)})")
    return dict(obj)


def _strip_prefixes(state_dict: dict, ignored: list) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        inside = [k for k in state_dict if k.startswith(prefix)]
        if inside and len(inside) * 2 >= len(state_dict):
            ignored.extend(k for k in state_dict if not k.startswith(prefix))
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def _timm_filter(state_dict: dict, model: nn.Module) -> dict:
    """timm's own key conversion and position/patch-embedding resampling for the model's family."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        return checkpoint_filter_fn(state_dict, model)
    return state_dict


def load_checkpoint(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a checkpoint file into `model` in place and report what was loaded, ignored and kept fresh.

    Raises CheckpointError when a backbone weight is missing or has the wrong shape.
    """
    report = LoadReport(path=str(path))
    published = _strip_prefixes(read_state_dict(path), report.ignored)
    # timm's filter sees the keys as published first: it tells layouts apart by them (DINOv2's mask_token).
    state_dict = _timm_filter(dict(published), model)
    report.ignored.extend(k for k in published if k.startswith(_PRETRAINING_ONLY))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_PRETRAINING_ONLY)}

    model_state = model.state_dict()
    # What a fine-tuning model may initialise itself: the classifier ('head', 'fc', 'classifier',
    # 'head.fc' by family) and the pooled-feature norm.
    head = classifier_name(model) + "."
    fresh_ok = (head, "fc_norm.")
    # MAE fine-tuning pools patch tokens and normalises them with fc_norm instead of norm:
    # the pretrained final norm is the right start for it.
    if "norm.weight" in state_dict and "norm.weight" not in model_state and "fc_norm.weight" in model_state:
        for suffix in ("weight", "bias"):
            if f"norm.{suffix}" in state_dict:
                state_dict[f"fc_norm.{suffix}"] = state_dict.pop(f"norm.{suffix}")

    for key in list(state_dict):
        if key not in model_state or state_dict[key].shape == model_state[key].shape:
            continue
        if key.startswith(head):
            report.head_skipped.append(key)
            del state_dict[key]
            continue
        raise CheckpointError(
            f"{path}: '{key}' has shape {tuple(state_dict[key].shape)} in the checkpoint but "
            f"{tuple(model_state[key].shape)} in the model (another architecture or size?)")

    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(fresh_ok)]
    if missing:
        shown = ", ".join(missing[:3])
        raise CheckpointError(
            f"{path}: lacks {len(missing)} backbone weights of the model ({shown}, ...); refusing to "
            f"leave them randomly initialised (wrong model name or checkpoint?)")
    report.fresh = list(result.missing_keys)
    report.unexpected = list(result.unexpected_keys)
    report.loaded = [k for k in state_dict if k not in result.unexpected_keys]
    return report
