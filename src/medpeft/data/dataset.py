"""Torch dataset over the plain table, with X-ray augmentation that is reproducible per sample."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from medpeft.config import AugmentConfig
from medpeft.data.cache import ImageCache
from medpeft.data.images import load_grayscale


def build_transform(img_size: int, mean, std, augment: AugmentConfig | None) -> v2.Compose:
    """Grayscale PIL image -> normalised (3, img_size, img_size) float tensor.

    Training (`augment` enabled): RandomResizedCrop (area `augment.scale`), horizontal flip and
    optional RandAugment. Evaluation: resize to a square (X-rays are not centre-cropped).
    """
    if augment is not None and augment.enabled:
        steps = [v2.RandomResizedCrop(img_size, scale=tuple(augment.scale), antialias=True)]
        if augment.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(augment.hflip))
        if augment.rand_augment_ops > 0:
            steps.append(v2.RandAugment(augment.rand_augment_ops, augment.rand_augment_magnitude))
    else:
        steps = [v2.Resize((img_size, img_size), antialias=True)]
    # Augment the single gray channel, then repeat it: foundation models take RGB input.
    return v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.RGB(), v2.Normalize(list(mean), list(std))])


class ImageDataset(Dataset):
    """Items ``(image (3, H, W) float32, target (K,) float32)``.

    Each sample's random augmentation is seeded from (seed, epoch, index), so it does not depend
    on worker count, batch order or where a resumed run restarted; set ``epoch`` before each epoch.
    """

    def __init__(self, paths: list[str], targets: np.ndarray, transform, seed: int = 0, random: bool = False,
                 cache: ImageCache | None = None, image_ids: list[str] | None = None, alpha: str = "error"):
        self.paths = list(paths)
        self.alpha = alpha  # load_grayscale's policy for transparent pixels
        # With a cache, pixels come from its memmap (already at the training size) instead of the files.
        self.cache = cache
        self.cache_rows = [cache.index_of(i) for i in image_ids] if cache is not None else None
        self.targets = torch.tensor(np.asarray(targets, dtype=np.float32))
        self.transform = transform
        self.seed = seed
        self.random = random
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if self.cache is not None:
            image = Image.fromarray(np.asarray(self.cache[self.cache_rows[index]]))
        else:
            image = load_grayscale(self.paths[index], self.alpha)
        if self.random:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
                x = self.transform(image)
        else:
            x = self.transform(image)
        return x, self.targets[index]
