"""Test-time augmentation: a run's logits averaged over a fixed, deterministic set of views of each image,
the views its training augmentation covered.

The views act on the model's input (the image already squashed to img_size x img_size and normalised):
resizing and mirroring commute with the per-channel normalisation, and training crops the same
img_size image when data.cache_dir is set. The logits are averaged, not the probabilities: the views are
one model's estimates on one scale, their mean is a logit on that scale, so the run's temperature
scaling (logits / T, linear: averaging before or after it is the same) and its val-chosen thresholds
apply unchanged, and the identity view alone gives plain prediction exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F

from medpeft.config import RunConfig
from medpeft.engine.runtime import autocast
from medpeft.errors import ConfigError


@dataclass(frozen=True)
class View:
    """One deterministic view of a batch of model inputs (B, C, S, S): a centred square crop keeping
    `area` of the image (1 = the whole image) resized back to S x S, then mirrored left-right with `hflip`."""

    area: float = 1.0
    hflip: bool = False

    @property
    def name(self) -> str:
        """'identity', 'hflip', 'crop0.75' or 'crop0.75+hflip'."""
        parts = [f"crop{self.area:g}"] * (self.area < 1) + ["hflip"] * self.hflip
        return "+".join(parts) or "identity"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.area < 1:
            size = x.shape[-1]
            side = round(size * math.sqrt(self.area))
            edge = (size - side) // 2
            x = F.resized_crop(x, edge, edge, side, side, [size, size], antialias=True)
        return F.hflip(x) if self.hflip else x


IDENTITY = View()


def tta_views(config: RunConfig) -> list[View]:
    """The views a run's training augmentation covered: the whole image and a centred crop at the middle of
    augment.scale's area range (when it is below 1), each also mirrored when augment.hflip > 0. A run whose
    training augmentation covers no view besides the image itself: ConfigError."""
    augment = config.augment
    areas = [1.0]
    if augment.enabled and augment.scale[0] < 1:
        areas.append(round((augment.scale[0] + min(augment.scale[1], 1.0)) / 2, 4))
    flips = [False, True] if augment.enabled and augment.hflip > 0 else [False]
    views = [View(area, flip) for area in areas for flip in flips]
    if len(views) == 1:
        raise ConfigError(f"{config.output_dir}: trained without crops or flips (augment.enabled "
                          f"{augment.enabled}, scale {augment.scale}, hflip {augment.hflip}): test-time "
                          f"augmentation has no view besides the image itself")
    return views


def resolve_views(config: RunConfig, tta) -> list[View]:
    """`tta` as a run's list of views: False, the image itself; True, `tta_views`; or the views given."""
    if tta is True:
        return tta_views(config)
    return list(tta) if tta else [IDENTITY]


def tta_record(configs: dict[str, RunConfig], tta) -> dict | None:
    """{run name: its view names} for the runs' configs by name; None without test-time augmentation."""
    return {name: [view.name for view in resolve_views(config, tta)] for name, config in configs.items()} if tta \
        else None


@torch.no_grad()
def view_logits(model: torch.nn.Module, config: RunConfig, x: torch.Tensor, tta=False) -> torch.Tensor:
    """(B, K) float32 logits of a batch of model inputs in the run's precision (train.precision), averaged
    over the views of `tta` (see `resolve_views`)."""
    with autocast(x.device, config.train.precision):
        return torch.stack([model(view(x)).float() for view in resolve_views(config, tta)]).mean(0)
