"""Run configuration: typed dataclasses, loaded from YAML with ``key=value`` overrides, validated once.

Every key is defined here with its default; code below the loader trusts the values.
Paths in a config are taken relative to the current working directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medpeft.data.labels import CHEXPERT_COMPETITION_LABELS, NIH_LABELS, RSNA_CLASSES, RSNA_LABELS
from medpeft.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Formats and the labels they use when data.labels is not given.
DEFAULT_LABELS = {"csv": (), "nih": NIH_LABELS, "chexpert": CHEXPERT_COMPETITION_LABELS, "rsna": RSNA_LABELS,
                  "folder": (), "medmnist": (), "images": ()}


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"
    """timm model name; any ViT (tiny/small/base/large, any patch and image size)."""
    weights: str = ""
    """Required: 'random' (explicit random init), 'timm' (timm / Hugging Face hub weights of `name`,
    needs a network or a filled cache) or a local checkpoint file (.pth/.pt/.bin/.safetensors)."""
    img_size: int = 224
    """Input size (pixels, square); ViT position embeddings are built (and resampled) for it."""
    drop_path_rate: float = 0.1
    global_pool: str | None = None
    """None: the model's default. ViT: 'token' (class token) or 'avg' (mean of patch tokens + fc_norm,
    as in MAE fine-tuning); CNN: 'avg', 'max', ..."""
    kwargs: dict = field(default_factory=dict)
    """Extra timm.create_model arguments, e.g. embed_dim/depth/num_heads/patch_size for small models."""

    def __post_init__(self):
        if not self.weights:
            raise ConfigError("model.weights is required: 'random', 'timm' or a checkpoint file path")
        _positive("model.img_size", self.img_size)


@dataclass
class SplitConfig:
    files: dict = field(default_factory=dict)
    """Split files by split name (train, val, test, or train_val: a pool that val_fraction carves a
    patient-disjoint val from): published lists ('<path> <0/1 labels...>', labels checked against the
    dataset), image-name lists (NIH's train_val_list.txt) or medpeft split files. Unlisted images are unused."""
    column: str | None = None
    """CSV column holding train/val/test per row (format 'csv')."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    """With neither files nor column: a random patient-level split with these fractions of the images."""
    seed: int = 0
    label_fraction: float = 1.0
    """Train on this fraction of the training images: a patient-level, label-stratified subset, nested
    across fractions for a seed (the 1% subset lies inside the 10% one)."""

    def __post_init__(self):
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"data.split.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.split.val_fraction + test_fraction must be < 1")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"data.split.label_fraction must be in (0, 1], got {self.label_fraction}")
        unknown = set(self.files) - {"train", "val", "test", "train_val"}
        if unknown:
            raise ConfigError(f"data.split.files: unknown split {sorted(unknown)[0]!r} "
                              f"(expected train, val, test or train_val)")
        if self.files and self.column:
            raise ConfigError("data.split: give files or column, not both")


@dataclass
class DataConfig:
    format: str = "csv"
    """Reader: 'csv' (generic labels CSV), 'nih' (Data_Entry_2017*.csv), 'chexpert' (train.csv /
    valid.csv), 'rsna' (stage_2_train_labels.csv), 'folder' (data.csv names the root of <class>/
    folders), 'medmnist' (data.csv names the .npz file, which carries its own split), 'images' (data.csv
    names a folder; every image below it, no labels: for pretraining)."""
    csv: str | list = ""
    """The dataset's label file, or a list of them read as one dataset (CheXpert: [train.csv, valid.csv])."""
    image_root: str | None = None
    """Folder the image paths are relative to; default per reader (the CSV's folder; NIH: images/ beside it)."""
    path_column: str = "path"
    patient_column: str | None = None
    """Patient id column, used to keep a patient's images on one side of a split; default: one patient per row."""
    labels: list = field(default_factory=list)
    """Label names, in output order; default for nih / chexpert / rsna: the standard set."""
    label_column: str | None = None
    """One column of delimited label names per row ('A|B'); if unset, each label is a 0/1 column."""
    label_delimiter: str = "|"
    negative_names: list = field(default_factory=lambda: ["No Finding"])
    """Names in `label_column` meaning 'none of the labels' (multilabel tasks)."""
    task: str = "multilabel"
    """'multilabel' (sigmoid + BCE per label; binary = one label) or 'multiclass' (softmax + cross-entropy)."""
    views: list | None = None
    """Keep only these views (e.g. [PA]); None keeps all."""
    frontal_only: bool = False
    """CheXpert: drop lateral views."""
    uncertainty: Any = "med-peft"
    """CheXpert uncertain (-1) labels: a preset (ones, zeros, ignore, med-peft) or {label: policy, default: policy}."""
    class_info: str | None = None
    """RSNA: stage_2_detailed_class_info.csv for the 3-class task (labels: the three classes)."""
    patient_pattern: str | None = None
    """Folder format: regex whose first group, searched in the file name, is the patient id."""
    on_missing: str = "error"
    """A listed image file that is missing or unreadable: 'error', or 'skip' it (the count is reported)."""
    split: SplitConfig = field(default_factory=SplitConfig)
    cache_dir: str | None = None
    """Decode every used image once into a uint8 memmap at model.img_size under this folder, reused
    by later runs and processes (medpeft.data.cache); None decodes each image every epoch."""
    mean: list = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list = field(default_factory=lambda: list(IMAGENET_STD))
    num_workers: int = 0
    labels_required: typing.ClassVar[bool] = True

    def __post_init__(self):
        if not self.csv:
            raise ConfigError("data.csv is required: the path of a labels CSV")
        _choice("data.format", self.format, tuple(DEFAULT_LABELS))
        _choice("data.on_missing", self.on_missing, ("error", "skip"))
        if not self.labels:
            if self.format == "rsna" and self.class_info:
                self.labels = list(RSNA_CLASSES)
            else:
                self.labels = list(DEFAULT_LABELS[self.format])
        if not self.labels and self.labels_required:
            raise ConfigError("data.labels is required: the list of label names")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"data.labels has duplicates: {self.labels}")
        _choice("data.task", self.task, ("multilabel", "multiclass"))
        if self.task == "multiclass" and len(self.labels) < 2:
            raise ConfigError("data.task 'multiclass' needs at least 2 labels")
        for key in ("mean", "std"):
            if len(getattr(self, key)) != 3:
                raise ConfigError(f"data.{key} must have 3 values (RGB), got {getattr(self, key)}")


@dataclass
class UnlabelledDataConfig(DataConfig):
    """Images for pretraining: as DataConfig, but labels are optional (a reader's are read, never used)."""

    labels_required: typing.ClassVar[bool] = False


@dataclass
class AugmentConfig:
    enabled: bool = True
    scale: list = field(default_factory=lambda: [0.5, 1.0])
    """RandomResizedCrop area range."""
    hflip: float = 0.5
    rand_augment_ops: int = 0
    """torchvision RandAugment operations per image; 0 = off."""
    rand_augment_magnitude: int = 9


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    """Peak learning rate (per optimiser step, after accumulation)."""
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: float | None = None
    """Layer-wise lr decay (e.g. 0.75): lr scale = decay ** (depth - layer); None = off."""
    grad_accum_steps: int = 1
    grad_clip: float | None = None
    precision: str = "fp32"
    """'fp32', 'bf16' (autocast; CPU or GPU) or 'fp16' (autocast + loss scaling; GPU only)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda[:N]'."""
    attention: str = "auto"
    """Attention kernel of timm ViTs: 'fused' (torch's scaled_dot_product_attention), 'math' (timm's matmul
    + softmax path; keeps each block's attention matrix, N^2 per head, for backward) or 'auto': 'math' under
    bf16 on the CPU, where torch's fused kernel is 3.8x slower, 'fused' elsewhere."""
    recompute: str = "none"
    """Activation recomputation of ViT blocks: 'none', 'selective' (keep the qkv, attention and fc2
    outputs; recompute norms, GELU, adds, proj and fc1) or 'blocks' (keep block inputs only). See
    medpeft.train.recompute."""
    frozen_prefix_cache: bool = False
    """Compute the part of the model the method leaves frozen once per image and train the rest on it
    (linear probe, ViTs with frozen leading blocks; needs augment.enabled: false). See medpeft.train.prefix."""
    compile: bool = False
    """torch.compile the training forward (inductor: needs a C/C++ compiler; pays off on GPUs and long runs)."""
    early_stopping_patience: int | None = None
    """Stop after this many epochs without a better validation mean AUROC; None = never."""
    seed: int = 0
    log_every_steps: int = 10

    def __post_init__(self):
        _choice("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("train.attention", self.attention, ("auto", "fused", "math"))
        _choice("train.recompute", self.recompute, ("none", "selective", "blocks"))
        for key in ("epochs", "batch_size", "eval_batch_size", "grad_accum_steps", "log_every_steps"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.lr", self.lr)
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"train.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    method: Any
    """The method's own config dataclass (see medpeft.methods); YAML: {name: lora, r: 8, ...}."""
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    output_dir: str = ""
    """The run directory; required."""

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("output_dir is required: the run directory to write")

    def to_dict(self) -> dict:
        """Plain data, as written to the run's config.yaml (the method's name first)."""
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method.name, **dataclasses.asdict(self.method)}
        return out


@dataclass
class MAEConfig:
    """Masked-autoencoder pretraining (He et al. 2022); defaults follow the medical recipe of Xiao et al.
    2023 for chest X-rays (mask ratio 0.9; RandomResizedCrop scale 0.5-1 is PRETRAIN_DEFAULTS' augment)."""

    mask_ratio: float = 0.9
    norm_pix_loss: bool = True
    """Reconstruct each patch normalised by its own mean and variance (MAE's better target)."""
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    adam_betas: list = field(default_factory=lambda: [0.9, 0.95])
    preview_every: int = 10
    """Write a reconstruction preview PNG every this many epochs (and after the last); 0 = never."""
    preview_images: int = 4

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mae.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "preview_images"):
            _positive(f"mae.{key}", getattr(self, key))
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError(f"mae.decoder_embed_dim ({self.decoder_embed_dim}) must be divisible by "
                              f"mae.decoder_num_heads ({self.decoder_num_heads})")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"mae.adam_betas must have 2 values, got {self.adam_betas}")
        if self.preview_every < 0:
            raise ConfigError(f"mae.preview_every must be >= 0, got {self.preview_every}")


@dataclass
class PretrainConfig:
    """``medpeft pretrain``: the encoder (model), unlabelled images (data: any reader, labels unused;
    trains on the 'train' split, reports reconstruction loss on 'val', never reads 'test'), mae, train
    (epochs, batch_size, lr, min_lr, warmup_epochs, weight_decay, grad_accum_steps, grad_clip, precision,
    device, seed), augment, output_dir. Defaults not given here are PRETRAIN_DEFAULTS."""

    model: ModelConfig
    data: UnlabelledDataConfig
    mae: MAEConfig = field(default_factory=MAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    output_dir: str = ""

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("output_dir is required: the run directory to write")
        if self.data.split.label_fraction != 1.0:
            raise ConfigError("data.split.label_fraction does not apply to pretraining (labels are not used)")
        for key in ("layer_decay", "early_stopping_patience"):
            if getattr(self.train, key) is not None:
                raise ConfigError(f"train.{key} does not apply to pretraining")
        if self.train.optimizer != "adamw":
            raise ConfigError("train.optimizer: MAE pretraining uses adamw")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The MAE recipe (He et al. 2022: AdamW, base lr 1.5e-4 per 256 images, 40 warmup epochs of 800, no drop
# path) with the chest X-ray choices of Xiao et al. 2023 (mask ratio 0.9 in MAEConfig, crop scale 0.5-1).
# fp32, which every machine runs well; on a GPU or a CPU with bf16 matmul units set train.precision: bf16
# (2.8x the fp32 step on 2 AVX512-BF16 cores: benchmarks/results/pretrain_precision.md).
PRETRAIN_DEFAULTS = {
    "model": {"weights": "random", "drop_path_rate": 0.0},
    "data": {"split": {"val_fraction": 0.05, "test_fraction": 0.0}},
    "train": {"epochs": 800, "batch_size": 256, "lr": 1.5e-4, "min_lr": 0.0, "warmup_epochs": 40,
              "weight_decay": 0.05, "precision": "fp32"},
    "augment": {"scale": [0.5, 1.0]},
}


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def build_dataclass(cls, data: Any, prefix: str):
    """Build dataclass `cls` from a mapping, refusing unknown keys and values of the wrong type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"config key '{where}{unknown[0]}' does not exist (expected one of: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], data[name], key)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)
    if hint is Any:
        return value
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} must not be empty")
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base not in (int, float, type(None)) and isinstance(value, base):
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key} must be {expected}, got {value!r}")


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``['train.lr=1e-3', 'method.r=4']`` into a nested dict; values are parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def merge_dicts(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict) -> RunConfig:
    """Validate a plain mapping (as read from YAML) into a RunConfig."""
    from medpeft.methods import method_config_from_dict

    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of sections (model, data, method, train, ...)")
    data = dict(data)
    for section in ("model", "data", "method"):
        if section not in data:
            raise ConfigError(f"config section '{section}' is required")
    method = method_config_from_dict(data.pop("method"))
    hints = typing.get_type_hints(RunConfig)
    known = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"config key '{unknown[0]}' does not exist (expected one of: {', '.join(known)})")
    kwargs = {name: _coerce(hints[name], value, name) for name, value in data.items()}
    return RunConfig(method=method, **kwargs)


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict:
    """A YAML file that must hold a mapping; one-line errors naming the file."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected {expected}, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a YAML config file (or start from `base`), apply ``key=value`` overrides, validate."""
    data = dict(base or {})
    if path is not None:
        data = merge_dicts(data, read_yaml_mapping(path, "config file", "a mapping of sections"))
    data = merge_dicts(data, parse_overrides(list(overrides)))
    return config_from_dict(data)


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] = (),
                         base: dict | None = None) -> PretrainConfig:
    """A pretraining config: PRETRAIN_DEFAULTS, then `base`, the YAML file and ``key=value`` overrides."""
    data = merge_dicts(PRETRAIN_DEFAULTS, base or {})
    if path is not None:
        data = merge_dicts(data, read_yaml_mapping(path, "config file", "a mapping of sections"))
    data = merge_dicts(data, parse_overrides(list(overrides)))
    for section in ("model", "data"):
        if section not in data:
            raise ConfigError(f"config section '{section}' is required")
    return build_dataclass(PretrainConfig, data, "")


def dump_config(config: RunConfig | PretrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
