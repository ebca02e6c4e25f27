"""Text-to-image diffusion models through ``diffusers``: a text-conditional UNet
(``UNet2DConditionModel``), a noise scheduler, a CLIP text encoder with its tokenizer and, for latent
diffusion, a VAE (``AutoencoderKL``); without a VAE the UNet denoises pixels (small images).

A model comes from a folder in the diffusers layout (``unet/``, ``vae/`` if any, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, as Stable Diffusion 1.5 and RoentGen are published), from a hub id (when
a network exists; ``from_pretrained`` reads the same layout), or from a named configuration with random
weights (``random:pixel-64``: a small model to pretrain, e.g. on the phantoms).

Images are tensors (N, C, H, W) in [-1, 1]; ``channels`` is 1 for a pixel-space X-ray model.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medpeft.errors import CheckpointError, ConfigError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
RANDOM_PREFIX = "random:"
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Named small configurations (random weights) of pixel-space models for single-channel images: the UNet's
# and the text encoder's sizes. 'pixel-64' has attention at two resolutions; the '-small' ones (for CPU
# budgets: demos, benchmarks) have 16/32/64 channels and attention at the lowest resolution only.
_SMALL_UNET = dict(in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32, 64),
                   norm_num_groups=8, attention_head_dim=8, cross_attention_dim=32,
                   down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
_SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=32)
NAMED = {
    "pixel-64": {
        "unet": dict(sample_size=64, in_channels=1, out_channels=1, layers_per_block=1,
                     block_out_channels=(32, 64, 96), norm_num_groups=8, attention_head_dim=8,
                     cross_attention_dim=64,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        "text_encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=32),
    },
    "pixel-64-small": {"unet": {**_SMALL_UNET, "sample_size": 64}, "text_encoder": _SMALL_TEXT},
    "pixel-32-small": {"unet": {**_SMALL_UNET, "sample_size": 32}, "text_encoder": _SMALL_TEXT},
}
# The pixel-space DDPM schedule of Ho et al. 2020 (linear betas 1e-4 to 0.02 over 1000 steps: almost no
# signal left at the last step), sampled with DDIM; like theirs (and diffusers' DDPM pipelines), each step's
# estimate of the clean image is clipped to the pixel range [-1, 1]. Unclipped, a small model's early
# estimates overshoot and its samples end as saturated noise.
SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                 clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=False, steps_offset=1,
                 prediction_type="epsilon")


@dataclass
class DiffusionModel:
    unet: nn.Module
    scheduler: object
    text_encoder: nn.Module
    tokenizer: object
    vae: nn.Module | None = None

    @property
    def channels(self) -> int:
        """Channels of the images the model makes (the VAE's, or the UNet's in pixel space)."""
        return self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels

    @property
    def image_size(self) -> int:
        """Side of the images in pixels (the UNet's sample size, times the VAE's downsampling)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        return self.unet.config.sample_size * factor

    def modules(self) -> dict[str, nn.Module]:
        """The components with weights, by their folder name."""
        found = {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}
        return {name: module for name, module in found.items() if module is not None}

    def save(self, folder: str | Path) -> None:
        """Write the diffusers layout (weights as safetensors), readable by ``load_diffusion`` and by
        diffusers' own ``from_pretrained`` of each component."""
        folder = Path(folder)
        with quiet_transformers():
            for name, module in self.modules().items():
                module.save_pretrained(folder / name, safe_serialization=True)
            self.tokenizer.save_pretrained(folder / "tokenizer")
            self.scheduler.save_pretrained(folder / "scheduler")


@contextmanager
def quiet_transformers():
    """transformers' progress bars (loading and writing weights) off inside, as they were after."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def load_diffusion(source: str) -> DiffusionModel:
    """A model from `source`: ``random:NAME`` (see NAMED), a folder in the diffusers layout, or a hub id."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if source.startswith(RANDOM_PREFIX):
        return random_model(source.removeprefix(RANDOM_PREFIX))
    folder = Path(source)
    if folder.exists():
        missing = [name for name in COMPONENTS if name != "vae" and not (folder / name).is_dir()]
        if missing:
            raise CheckpointError(f"{folder}: not a diffusers model folder (no {', '.join(missing)}/; expected "
                                  f"{', '.join(COMPONENTS)}/, vae/ optional)")
    elif source.count("/") != 1:
        raise ConfigError(f"model {source!r}: not a folder, a hub id (owner/name) or random:NAME "
                          f"(NAME one of {', '.join(NAMED)})")
    try:
        with quiet_transformers():
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae") if _has_vae(source) else None
            return DiffusionModel(
                unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
                scheduler=DDIMScheduler.from_pretrained(source, subfolder="scheduler"),
                text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
                tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"), vae=vae)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: cannot load the diffusion model ({str(e).splitlines()[0]})") from None


def _has_vae(source: str) -> bool:
    folder = Path(source)
    if folder.exists():
        return (folder / "vae").is_dir()
    from huggingface_hub import file_exists

    return file_exists(source, "vae/config.json")


def random_model(name: str, seed: int = 0) -> DiffusionModel:
    """A named configuration (NAMED) with random weights, the same for the same `seed`."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in NAMED:
        raise ConfigError(f"model {RANDOM_PREFIX}{name}: unknown configuration (expected one of: {', '.join(NAMED)})")
    config = NAMED[name]
    tokenizer = character_tokenizer(config["text_encoder"]["max_position_embeddings"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **config["text_encoder"]))
    return DiffusionModel(unet=unet, scheduler=DDIMScheduler(**SCHEDULER), text_encoder=text_encoder,
                          tokenizer=tokenizer)


def character_tokenizer(max_length: int):
    """A CLIP tokenizer whose vocabulary is every byte (as a word's inner and last character) and no merges:
    each character is a token. For models trained from random weights, which have no learned vocabulary."""
    import tempfile

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate([*_SPECIAL_TOKENS, *chars, *(c + "</w>" for c in chars)])}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def encode_prompts(model, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states (N, L, D) of the prompts, padded to the tokenizer's length."""
    tokens = model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
    device = next(model.text_encoder.parameters()).device
    return model.text_encoder(tokens.input_ids.to(device))[0]
