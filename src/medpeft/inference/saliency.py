"""Grad-CAM saliency maps (Selvaraju et al. 2017, arXiv 1610.02391) for a finished run, as heatmap
overlays on the input images.

The activations weighed are those of the last feature map: for a CNN the timm module that produces
`forward_features`' output (the last entry of timm's `feature_info`), for a ViT the tokens entering the
last block's attention (`blocks[-1].norm1`), whose patch tokens are reshaped to the patch grid; prefix
tokens (class, register, prompt tokens) are dropped. The forward pass goes through the run's model, so
the method's adapters apply. Weights: the gradient of the label's logit averaged over space;
map = ReLU(sum over channels of weight * activation), scaled to [0, 1].

    run = medpeft.load_run("runs/nih-lora")
    table = run.explain(["a.dcm", "scans/"], "saliency/")   # saliency/<image stem>__<label>.png
"""

from __future__ import annotations

import io
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import matplotlib
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from medpeft.engine.runtime import resolve_device
from medpeft.errors import ConfigError, DataError
from medpeft.files import write_bytes_atomic
from medpeft.inference.inputs import collect_inputs, input_name, read_input, report_unreadable
from medpeft.methods.registry import unwrap

COLORMAP = "jet"
ALPHA = 0.4
"""Weight of the heatmap's colour in the overlay; the grayscale image has 1 - ALPHA."""


def target_layer(model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The module of a timm model whose output Grad-CAM weighs, and a function from that output to a
    (B, C, H', W') feature map."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        gh, gw = model.patch_embed.grid_size

        def to_grid(tokens: torch.Tensor) -> torch.Tensor:
            # (B, N, C): the patch tokens are the last gh * gw, after class, register and prompt tokens
            return tokens[:, -gh * gw:].transpose(1, 2).reshape(len(tokens), -1, gh, gw)

        return model.blocks[-1].norm1, to_grid
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError(f"{type(model).__name__}: no saliency maps for this model (neither a timm ViT with "
                          f".blocks nor a timm CNN with .feature_info)")
    return model.get_submodule(info[-1]["module"]), lambda features: features


@contextmanager
def captured_activations(run) -> Iterator[dict]:
    """While open, the run model's forward pass replaces the target layer's output by a detached copy
    that requires grad, kept under 'leaf' of the yielded dict with 'to_grid' to make it a feature map.
    The parameters' requires_grad is left alone: gradients flow to that leaf only. The hook is removed
    on exit."""
    module, to_grid = target_layer(unwrap(run.model))
    store: dict = {"to_grid": to_grid}

    def hook(_module: nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
        store["leaf"] = output.detach().float().requires_grad_(True)
        return store["leaf"]

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def grad_cam(logit: torch.Tensor, store: dict) -> np.ndarray:
    """The (H', W') Grad-CAM map in [0, 1] of a scalar logit computed while `store` was captured."""
    (grad,) = torch.autograd.grad(logit, store["leaf"], retain_graph=True)
    features, grad = store["to_grid"](store["leaf"].detach()), store["to_grid"](grad)
    weights = grad.mean((2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(1))[0]
    top = cam.max()
    return (cam / top if top > 0 else torch.zeros_like(cam)).cpu().numpy()


def _forward(run, x: torch.Tensor, store: dict) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (K,) of one input (3, H, W) with the graph kept, and its probabilities. In fp32 whatever the
    run's precision, so a probability may differ from `predict`'s in the last digits."""
    device = resolve_device(run.config.train.device)
    with torch.enable_grad():
        logits = run.model.to(device)(x.reshape(1, *x.shape[-3:]).to(device).float())[0]
    if "leaf" not in store:
        raise RuntimeError("the saliency target layer did not run in the model's forward pass")
    probs = run.probabilities(logits)
    return logits, probs.detach().cpu().numpy()


def saliency_map(run, x: torch.Tensor, label_index: int) -> np.ndarray:
    """Grad-CAM map (H', W') in [0, 1] of one preprocessed input x ((3, H, W) or (1, 3, H, W), as made by
    `run.transform()`) for the label at `label_index`. H', W': the feature map's grid (e.g. 8 x 8)."""
    with captured_activations(run) as store:
        logits, _ = _forward(run, x, store)
        return grad_cam(logits[label_index], store)


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map resized (bilinearly) to size = (height, width)."""
    t = torch.as_tensor(cam, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(image: Image.Image, cam: np.ndarray, colormap: str = COLORMAP, alpha: float = ALPHA) -> Image.Image:
    """The grayscale image at its own size with the map, upsampled to it, blended on top in colour (RGB)."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)[..., None]
    heat = upsample(cam, gray.shape[:2])
    color = matplotlib.colormaps[colormap](heat, bytes=True)[..., :3].astype(np.float32)
    return Image.fromarray(np.round((1 - alpha) * gray + alpha * color).astype(np.uint8), "RGB")


def _positive(run, probs: np.ndarray) -> list[int]:
    """Indices of the labels the run calls positive (the arg-max label for a multiclass run)."""
    row = run.decide(probs[None]).iloc[0]
    if "pred" in row:
        return [run.labels.index(row["pred"])]
    return [k for k, label in enumerate(run.labels) if pd.notna(row[f"pred:{label}"]) and row[f"pred:{label}"] == 1]


def _stems(items: list) -> list[str]:
    """File-name stems of the inputs, with the input index added where two inputs share a stem."""
    stems = [f"image{i}" if isinstance(item, Image.Image) else Path(item).stem for i, item in enumerate(items)]
    counts = Counter(stems)
    return [f"{stem}_{i}" if counts[stem] > 1 else stem for i, stem in enumerate(stems)]


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def explain(run, images, out_dir, labels: list[str] | None = None) -> pd.DataFrame:
    """Write a Grad-CAM overlay PNG, out_dir/<image stem>__<label>.png, per image and per label the run
    calls positive on it, or per label in `labels`. Returns one row per map: input, label, probability,
    file, error (''); an image with no positive label has one row without label and file, an unreadable
    one a row with the reason in 'error' (and an UnreadableInputWarning). Inputs as for `predict`: files,
    folders, PIL images (named image<index>); two inputs with one stem get their index added to it."""
    unknown = [label for label in labels or [] if label not in run.labels]
    if unknown:
        raise ConfigError(f"labels: {unknown[0]!r} is not a label of run {run.name} "
                          f"(expected one of: {', '.join(run.labels)})")
    items = collect_inputs(images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = run.transform()
    rows, names, errors = [], [], []
    for i, (item, stem) in enumerate(zip(items, _stems(items))):
        name = input_name(item, i)
        names.append(name)
        try:
            image = read_input(item)
        except DataError as e:
            errors.append(str(e))
            rows.append({"input": name, "label": None, "probability": np.nan, "file": None, "error": str(e)})
            continue
        errors.append("")
        with captured_activations(run) as store:
            logits, probs = _forward(run, transform(image), store)
            chosen = [run.labels.index(label) for label in labels] if labels else _positive(run, probs)
            if not chosen:
                rows.append({"input": name, "label": None, "probability": np.nan, "file": None, "error": ""})
            for k in chosen:
                path = out_dir / f"{stem}__{_safe(run.labels[k])}.png"
                buffer = io.BytesIO()
                overlay(image, grad_cam(logits[k], store)).save(buffer, format="PNG")
                write_bytes_atomic(path, buffer.getvalue())
                rows.append({"input": name, "label": run.labels[k], "probability": float(probs[k]),
                             "file": str(path), "error": ""})
    report_unreadable(names, errors, strict=False)
    return pd.DataFrame(rows, columns=["input", "label", "probability", "file", "error"])
