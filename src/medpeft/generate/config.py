"""``medpeft generate train``'s config: a diffusion model, image + prompt pairs from any reader, a
generative method, the diffusion objective and how to train (the classification run's ``train`` and
``augment`` sections, with the keys that do not apply to diffusion refused).

.. code-block:: yaml

    model: {source: random:pixel-64}          # or a diffusers folder, a hub id, a generate run's folder
    data: {csv: labels.csv, labels: [cardiomegaly, nodule], patient_column: patient_id}
    prompt: {template: "chest x-ray, {findings}", no_finding: "no finding"}
    method: {name: lora, r: 8}
    diffusion: {prediction: epsilon, snr_gamma: 5.0, prompt_dropout: 0.1, ema_decay: 0.999}
    train: {epochs: 20, batch_size: 16, lr: 1.0e-4}
    output_dir: runs/gen-lora
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medpeft.config import AugmentConfig, DataConfig, Section, TrainConfig, build, option
from medpeft.config.run import layered, plain
from medpeft.errors import ConfigError
from medpeft.generate.methods import GENERATIVE_METHODS, GenerativeMethodConfig


@dataclass
class DiffusionModelConfig(Section):
    path = "model"
    source: str = option("", "A folder in the diffusers layout (unet/, text_encoder/, tokenizer/, scheduler/, "
                         "vae/ optional), a hub id, a finished medpeft generate run (its model), or random:NAME "
                         "(random weights; NAME: pixel-64, pixel-64-small, pixel-32-small).", required=True)
    seed: int = option(0, "Seed of a random:NAME model's weights.")


@dataclass
class PromptConfig(Section):
    path = "prompt"
    column: str | None = option(None, "A text column of the CSV carried as data.metadata_columns (e.g. a report's "
                                "impression) used as each image's prompt; None: the template.")
    template: str = option("chest x-ray, {findings}", "The prompt made from an image's labels: {findings} is the "
                           "names of its positive labels, joined by ', ' (underscores as spaces).")
    no_finding: str = option("no finding", "{findings} of an image without a positive label.")

    def validate(self) -> None:
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        if fields - {"findings"}:
            raise ConfigError(f"prompt.template {self.template!r}: the only field is {{findings}}, not "
                              f"{{{sorted(fields - {'findings'})[0]}}}")


@dataclass
class DiffusionConfig(Section):
    path = "diffusion"
    prediction: Literal["epsilon", "v_prediction"] = option(
        "epsilon", "What the UNet predicts: the noise ('epsilon') or the velocity ('v_prediction').")
    snr_gamma: float | None = option(None, "Min-SNR loss weighting (Hang et al. 2023): weight min(SNR, gamma) / SNR "
                                     "per timestep (5 in the paper); None = plain MSE.", gt=0)
    prompt_dropout: float = option(0.1, "Probability of training on the empty prompt instead (classifier-free "
                                   "guidance needs it).", ge=0, lt=1)
    ema_decay: float | None = option(None, "Exponential moving average of the trained parameters, used for the "
                                     "saved model (e.g. 0.999); None = off.", gt=0, lt=1)


EVALUATION = "generated"
"""``medpeft generate evaluate``'s folder in a run's evaluations/."""

# Keys of the classification train section that a diffusion run does not read.
_NOT_FOR_DIFFUSION = {"layer_decay": None, "early_stopping_patience": None, "eval_every": 1, "optimizer": "adamw",
                      "frozen_prefix_cache": False, "recompute": "none", "attention": "auto"}
# X-rays are not mirror images (the heart is on the left): no flips; crops that keep most of the image.
GENERATE_DEFAULTS = {"augment": {"hflip": 0.0, "scale": [0.8, 1.0]}, "data": {"mean": [0.5] * 3, "std": [0.5] * 3},
                     "train": {"lr": 1e-4, "weight_decay": 0.01, "warmup_epochs": 0.0}}


@dataclass
class GenerateConfig(Section):
    """``medpeft generate train``: a diffusion model, images with prompts, a generative method, training."""

    model: DiffusionModelConfig
    data: DataConfig
    method: GenerativeMethodConfig
    prompt: PromptConfig = option(factory=PromptConfig, help="How each image's prompt is made (prompt.*).")
    diffusion: DiffusionConfig = option(factory=DiffusionConfig, help="The diffusion objective (diffusion.*).")
    train: TrainConfig = option(factory=TrainConfig, help="How to train (train.*).")
    augment: AugmentConfig = option(factory=AugmentConfig, help="Training augmentation (augment.*).")
    output_dir: str = option("", "The run directory to write.", required=True)

    def validate(self) -> None:
        for key, default in _NOT_FOR_DIFFUSION.items():
            if getattr(self.train, key) != default:
                raise ConfigError(f"train.{key} does not apply to diffusion training")
        if self.train.precision == "fp16":
            raise ConfigError("train.precision 'fp16' is not supported for diffusion training (it has no loss "
                              "scaling); use 'bf16' or 'fp32'")
        if self.data.mean != [0.5] * 3 or self.data.std != [0.5] * 3:
            raise ConfigError("data.mean and data.std must be 0.5: a diffusion model's images are in [-1, 1]")
        if self.prompt.column is not None and self.prompt.column not in getattr(self.data, "metadata_columns", []):
            raise ConfigError(f"prompt.column {self.prompt.column!r} must be one of data.metadata_columns (the "
                              f"columns a reader carries)")
        if self.prompt.column is None and not self.data.labels:
            raise ConfigError("data.labels is required for prompt.template (or set prompt.column)")

    def to_dict(self) -> dict:
        return {**plain(self), "data": plain(self.data), "method": plain(self.method)}


def load_generate_config(path: str | Path | None = None, overrides: list[str] = (),
                         base: dict | None = None) -> GenerateConfig:
    """GENERATE_DEFAULTS, then `base`, the YAML file and ``key=value`` overrides, validated."""
    return build(GenerateConfig, layered(GENERATE_DEFAULTS, path, overrides, base))


def key_tables() -> dict[str, str]:
    """The README's tables of the generate config's own sections and methods, made from the schema."""
    from medpeft.config.docs import methods_table, section_table

    return {"generate.model": section_table(DiffusionModelConfig, "model."),
            "generate.prompt": section_table(PromptConfig, "prompt."),
            "generate.diffusion": section_table(DiffusionConfig, "diffusion."),
            "generate.method": section_table(GenerativeMethodConfig, "method.") + "\n\n"
            + methods_table(GENERATIVE_METHODS, GenerativeMethodConfig)}
