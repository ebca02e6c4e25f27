"""Whole configs: a fine-tuning run and an MAE pretraining run, loaded from YAML with ``key=value``
overrides and validated completely, cross-field rules included, before anything runs.

Paths in a config are taken relative to the current working directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from medpeft.config.schema import Section, build, option
from medpeft.config.sections import AugmentConfig, DataConfig, MethodConfig, ModelConfig, TrainConfig
from medpeft.errors import ConfigError


@dataclass
class RunConfig(Section):
    """``medpeft train``: a backbone, a labelled dataset, a method, and how to train."""

    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    train: TrainConfig = option(factory=TrainConfig, help="How to train (train.*).")
    augment: AugmentConfig = option(factory=AugmentConfig, help="Training augmentation (augment.*).")
    output_dir: str = option("", "The run directory to write.", required=True)

    def validate(self) -> None:
        """The rules between sections, in one place."""
        if not self.data.labels:
            raise ConfigError("data.labels is required: the list of label names")
        self.method.check_model(self.model)
        check_training(self.train, self.model, self.augment)

    def to_dict(self) -> dict:
        """Plain data, as written to the run's config.yaml (the selecting keys first)."""
        return {**plain(self), "data": plain(self.data), "method": plain(self.method)}


def check_training(train: TrainConfig, model: ModelConfig, augment: AugmentConfig) -> None:
    """Rules between train and the model or augmentation, shared by fine-tuning and pretraining."""
    if train.frozen_prefix_cache and augment.enabled:
        raise ConfigError("train.frozen_prefix_cache needs augment.enabled: false (an augmented image gives a "
                          "new prefix output every epoch)")
    if train.recompute != "none" and model.family != "vit":
        raise ConfigError(f"train.recompute '{train.recompute}' needs a ViT with blocks; use 'none' for "
                          f"{model.name}")
    if train.precision == "fp16" and not train.device.startswith("cuda"):
        import torch

        if train.device != "auto" or not torch.cuda.is_available():
            raise ConfigError(f"train.precision 'fp16' needs a CUDA device, not train.device {train.device!r} "
                              f"on this machine; use 'bf16'")


def plain(section) -> dict:
    """A section as plain data; a registered section's selecting key first (data.format, method.name)."""
    out = dataclasses.asdict(section)
    registry = type(section).registry
    return {registry.attribute: getattr(section, registry.attribute), **out} if registry else out


@dataclass
class MAEConfig(Section):
    """Masked-autoencoder pretraining (He et al. 2022); defaults follow the medical recipe of Xiao et al.
    2023 for chest X-rays (mask ratio 0.9; crop scale 0.5-1 in PRETRAIN_DEFAULTS)."""

    path = "mae"
    mask_ratio: float = option(0.9, "Share of patches hidden from the encoder.", gt=0, lt=1)
    norm_pix_loss: bool = option(True, "Reconstruct each patch normalised by its own mean and variance.")
    decoder_embed_dim: int = option(512, "Decoder width.", gt=0)
    decoder_depth: int = option(8, "Decoder blocks.", gt=0)
    decoder_num_heads: int = option(16, "Decoder attention heads (must divide decoder_embed_dim).", gt=0)
    adam_betas: list[float] = option([0.9, 0.95], "AdamW's betas.", length=2, ge=0, lt=1)
    preview_every: int = option(10, "Write a reconstruction preview PNG every this many epochs (and after the "
                                "last); 0 = never.", ge=0)
    preview_images: int = option(4, "Images in each preview.", gt=0)

    def validate(self) -> None:
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError(f"mae.decoder_embed_dim ({self.decoder_embed_dim}) must be divisible by "
                              f"mae.decoder_num_heads ({self.decoder_num_heads})")


@dataclass
class PretrainConfig(Section):
    """``medpeft pretrain``: the encoder (model), unlabelled images (data: any reader, labels unused; trains
    on the 'train' split, reports reconstruction loss on 'val', never reads 'test'), mae, train, augment.
    Defaults not given here are PRETRAIN_DEFAULTS."""

    model: ModelConfig
    data: DataConfig
    mae: MAEConfig = option(factory=MAEConfig, help="The masked autoencoder (mae.*).")
    train: TrainConfig = option(factory=TrainConfig, help="How to train (train.*).")
    augment: AugmentConfig = option(factory=AugmentConfig, help="Training augmentation (augment.*).")
    output_dir: str = option("", "The run directory to write.", required=True)

    def validate(self) -> None:
        if self.data.split.label_fraction != 1.0:
            raise ConfigError("data.split.label_fraction does not apply to pretraining (labels are not used)")
        for key in ("layer_decay", "early_stopping_patience"):
            if getattr(self.train, key) is not None:
                raise ConfigError(f"train.{key} does not apply to pretraining")
        if self.train.eval_every != 1:
            raise ConfigError("train.eval_every does not apply to pretraining (it validates every epoch)")
        if self.train.optimizer != "adamw":
            raise ConfigError("train.optimizer: MAE pretraining uses adamw")
        if self.model.family != "vit":
            raise ConfigError(f"MAE pretraining needs a VisionTransformer encoder, not {self.model.name}")
        check_training(self.train, self.model, self.augment)

    def to_dict(self) -> dict:
        return {**plain(self), "data": plain(self.data)}


# The MAE recipe (He et al. 2022: AdamW, base lr 1.5e-4 per 256 images, 40 warmup epochs of 800, no drop
# path) with the chest X-ray choices of Xiao et al. 2023 (mask ratio 0.9 in MAEConfig, crop scale 0.5-1).
# fp32, which every machine runs well; on a GPU or a CPU with bf16 matmul units set train.precision: bf16
# (benchmarks/results/pretrain_precision.md).
PRETRAIN_DEFAULTS = {
    "model": {"weights": "random", "drop_path_rate": 0.0},
    "data": {"split": {"val_fraction": 0.05, "test_fraction": 0.0}},
    "train": {"epochs": 800, "batch_size": 256, "lr": 1.5e-4, "min_lr": 0.0, "warmup_epochs": 40,
              "weight_decay": 0.05, "precision": "fp32"},
    "augment": {"scale": [0.5, 1.0]},
}


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``['train.lr=1e-3', 'method.r=4']`` into a nested dict; values are parsed as YAML, except
    text YAML cannot read as one value (``, `` or ``|``, a block-scalar mark), which is taken as written."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _override_value(raw)
    return nested


def _override_value(raw: str):
    if not raw.strip():
        return None
    if raw.strip()[0] in "|>":  # a block scalar's mark, which YAML reads as an empty string
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def merge_dicts(base: dict, update: dict) -> dict:
    """`base` with `update` merged in, mappings key by key (neither is changed)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict:
    """A YAML file that must hold a mapping; one-line errors naming the file."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected {expected}, got {type(loaded).__name__}")
    return loaded


def config_from_dict(data) -> RunConfig:
    """Validate a plain mapping (as read from YAML) into a RunConfig."""
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of sections (model, data, method, train, ...)")
    if "tune" in data:
        raise ConfigError("config section 'tune' is read by medpeft tune, not by a training run: search with "
                          "medpeft tune, then train its best.yaml (or remove the section to train as written)")
    return build(RunConfig, with_catalogue_defaults(data))


def layered(defaults: dict, path, overrides, base) -> dict:
    """`defaults`, then `base`, the YAML file at `path` and the ``key=value`` overrides, merged (not validated)."""
    data = merge_dicts(defaults, base or {})
    if path is not None:
        data = merge_dicts(data, read_yaml_mapping(path, "config file", "a mapping of sections"))
    return merge_dicts(data, parse_overrides(list(overrides)))


def with_catalogue_defaults(data: dict) -> dict:
    """`data` over the defaults of its catalogue model (model.img_size, data.mean, ...), if it names one."""
    from medpeft.config.catalogue import entry_of

    model = data.get("model")
    entry = entry_of(model.get("name")) if isinstance(model, dict) and isinstance(model.get("name"), str) else None
    return merge_dicts(entry.config_defaults(), data) if entry is not None else data


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a YAML config file (or start from `base`), apply ``key=value`` overrides, validate."""
    return config_from_dict(layered({}, path, overrides, base))


def load_data_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> DataConfig:
    """The data section alone of a config file (its other sections are not read), with ``data.*`` overrides."""
    data = layered({}, path, overrides, base)
    if "data" not in data:
        raise ConfigError(f"{path}: config section 'data' is required")
    return build(DataConfig, data["data"])


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] = (),
                         base: dict | None = None) -> PretrainConfig:
    """A pretraining config: PRETRAIN_DEFAULTS, then `base`, the YAML file and ``key=value`` overrides."""
    return build(PretrainConfig, with_catalogue_defaults(layered(PRETRAIN_DEFAULTS, path, overrides, base)))


# Keys that medpeft 0.1 wrote into every run's data section, whatever its format (one class held every
# reader's options); a format that does not have them never read them.
_V0_DATA_KEYS = ("image_root", "path_column", "patient_column", "label_column", "label_delimiter",
                 "negative_names", "views", "frontal_only", "uncertainty", "class_info", "patient_pattern")


def upgrade_saved(data: dict) -> dict:
    """A config as a run directory saved it, made loadable by this medpeft: a 0.1 run's data section
    loses the keys of other formats (they had no effect on its run); a config saved before
    data.split.stratify existed drew its split unstratified."""
    section = data.get("data") or {}
    if not isinstance(section, dict):
        return data  # not a config this medpeft wrote; loading it says why
    section = dict(section)
    known = {f.name for f in DataConfig.registry.get(section.get("format", "csv")).fields()}
    for key in _V0_DATA_KEYS:
        if key not in known:
            section.pop(key, None)
    if isinstance(section.get("split"), dict) and "stratify" not in section["split"]:
        section["split"] = {**section["split"], "stratify": False}
    return {**data, "data": section}


def dump_config(config: RunConfig | PretrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
