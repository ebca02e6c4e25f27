"""Load foreign checkpoints (the published layouts of medpeft.backbones.layouts: Hugging Face, Meta,
open_clip, OpenAI CLIP, MAE / MRM, timm, plain state_dicts) into a timm model.

All adaptation happens here, in one place: read the file (or the published folder), unwrap the
container, recognise the layout and map its keys onto timm's, let timm's own filter convert the layouts
it knows and resample position / patch embeddings, drop pretraining-only keys (MAE decoder, mask token),
then load and check what is missing. Backbone weights that
the checkpoint lacks are an error, never a silent random init. Files are read with safetensors or
``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medpeft.backbones.layers import classifier_name
from medpeft.backbones.layouts import LAYOUTS, Layout
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
    layout: str = "timm"
    """The published layout it was read in (medpeft.backbones.layouts); 'timm' for a timm state_dict."""
    loaded: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    """Pretraining-only keys (MAE decoder, mask token) and keys outside the backbone prefix."""
    head_skipped: list = field(default_factory=list)
    """Classifier keys whose shape is for another task; the new head is initialised instead."""
    fresh: list = field(default_factory=list)
    """Model keys not in the checkpoint that may start fresh (classifier, fc_norm)."""
    unexpected: list = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.layout} layout)"]
        for label, keys in (("ignored", self.ignored), ("head skipped", self.head_skipped),
                            ("initialised fresh", self.fresh), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
                parts.append(f"{label}: {shown}")
        return "; ".join(parts)


def read_state_dict(path: str | Path, layouts: Iterable[Layout] = ()) -> dict[str, torch.Tensor]:
    """Read a checkpoint file, or the published folder of one of `layouts`, safely, and unwrap it to a
    flat ``{name: tensor}`` dict."""
    path = Path(path)
    layouts = list(layouts)
    if path.is_dir():
        return _read_folder(path, layouts)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    reader = next((layout.read for layout in layouts if layout.read is not None), None)
    obj = reader(path) if reader is not None else _read_file(path)
    return _unwrap(obj, path)


def _read_file(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        # MAE-style trainers save their argparse options beside the weights: plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))  # torch names the refused class or function there
        what = named.group(1) if named else str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds Python objects beyond tensors and plain "
            f"containers, which could run code ({what}); save it as a plain state_dict or safetensors, or "
            f"name its catalogue model (a torchxrayvision file: xrv-densenet121-all)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None


def _read_folder(folder: Path, layouts: list[Layout]) -> dict[str, torch.Tensor]:
    """The weights file of a published folder: the first of the layouts' file names that is there, or
    every shard a Hugging Face ``*.index.json`` names."""
    names = list(dict.fromkeys(name for layout in (layouts or LAYOUTS.values()) for name in layout.files))
    for name in names:
        index = folder / f"{name}.index.json"
        if index.is_file():
            return _read_shards(index, layouts)
        if (folder / name).is_file():
            return read_state_dict(folder / name, layouts)
    raise CheckpointError(f"{folder}: a folder without a weights file; expected one of {names}")


def _read_shards(index: Path, layouts: list[Layout]) -> dict[str, torch.Tensor]:
    import json

    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a Hugging Face shard index with a weight_map ({e})") from None
    state_dict = {}
    for shard in shards:
        state_dict.update(read_state_dict(index.parent / shard, layouts))
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


def _recognise(state_dict: dict, expected: list[Layout], path) -> tuple[Layout | None, str]:
    """The layout (and the prefix before its keys) of `state_dict`: one of `expected`, or else (when no
    layout is expected) any converting layout; (None, '') for a timm state_dict."""
    for layout in expected or [layout for layout in LAYOUTS.values() if layout.convert is not None]:
        prefix = layout.prefix_in(state_dict)
        if prefix is not None:
            return layout, prefix
    if expected:
        # Name the missing key under the prefix that holds most of the first layout's signature.
        first = expected[0]
        prefix = max(first.prefixes, key=lambda p: sum(p + key in state_dict for key in first.signature))
        lacking = next(prefix + key for key in first.signature if prefix + key not in state_dict)
        names = " or ".join(f"{layout.name} ({layout.description})" for layout in expected)
        raise CheckpointError(f"{path}: not in the expected layout {names}: it has no key {lacking!r} (its first "
                              f"key is {next(iter(state_dict))!r})")
    return None, ""


def _timm_filter(state_dict: dict, model: nn.Module) -> dict:
    """timm's own key conversion and position/patch-embedding resampling for the model's family (ViT, and
    Eva: EVA-02, DINOv3, whose filter converts Meta's DINOv3 keys)."""
    from timm.models import eva, vision_transformer

    if isinstance(model, vision_transformer.VisionTransformer):
        return vision_transformer.checkpoint_filter_fn(state_dict, model)
    if isinstance(model, eva.Eva):
        return eva.checkpoint_filter_fn(state_dict, model)
    return state_dict


def load_checkpoint(model: nn.Module, path: str | Path, layouts: Iterable[str] | None = None) -> LoadReport:
    """Load a checkpoint file or published folder into `model` in place and report what was loaded,
    ignored and kept fresh.

    `layouts` (names in medpeft.backbones.layouts) are the ones a catalogue model is published in: a
    checkpoint in none of them is refused, naming the first key it lacks. None: any layout is recognised,
    and one that is none of them is taken as a timm state_dict. Raises CheckpointError when a backbone
    weight is missing or has the wrong shape.
    """
    report = LoadReport(path=str(path))
    expected = [LAYOUTS[name] for name in layouts] if layouts is not None else []
    published = read_state_dict(path, expected)
    layout, prefix = _recognise(published, expected, path)
    report.layout = layout.name if layout is not None else "timm"
    if layout is not None and layout.convert is not None:
        report.ignored.extend(k for k in published if not k.startswith(prefix))
        published, dropped = layout.convert({k[len(prefix):]: v for k, v in published.items() if k.startswith(prefix)})
        report.ignored.extend(dropped)
    else:
        published = _strip_prefixes(published, report.ignored)
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

    check_finite(state_dict.items(), path)  # what is loaded: dropped keys (xrv's op_threshs) may hold NaN
    unused = next((k for k, v in state_dict.items() if k not in model_state and v.count_nonzero()), None)
    if unused is not None:
        raise CheckpointError(f"{path}: '{unused}' holds weights the model has no place for (another variant "
                              f"of the architecture, e.g. with attention biases?)")
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
