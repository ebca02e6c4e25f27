"""The sections of a run config: model, data (one class per dataset format), train, augment, and the
base of every method's config (one class per method). Every key is defined here or in its reader's or
method's own file, with its default; code below the loader trusts the values."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from medpeft.config.schema import Registry, Section, option
from medpeft.errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
AGE_BINS = [20, 40, 60, 80]
DATA_FORMATS = Registry("data.format", "dataset format", "medpeft.data")
"""Dataset formats: each reader file registers its DataConfig subclass here (through medpeft.data)."""
METHODS = Registry("method.name", "method", "medpeft.methods")
"""PEFT methods: each method file registers its MethodConfig subclass here (through medpeft.methods)."""

# timm modules whose models are vision transformers (patch embedding, blocks, position embedding).
_VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "deit", "eva", "beit")


@functools.cache
def model_family(name: str) -> str:
    """'vit' or 'cnn' for a timm model name (hub names are taken as ViTs); ConfigError for an unknown name."""
    if name.startswith("hf-hub:"):
        return "vit"
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"model.name {name!r} is neither a catalogue model (medpeft models) nor a timm model "
                          f"(see timm.list_models())")
    module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    return "vit" if module in _VIT_MODULES else "cnn"


@dataclass
class ModelConfig(Section):
    path = "model"
    name: str = option("vit_base_patch16_224", "A foundation model of the catalogue (`medpeft models`: rad-dino, "
                       "biomedclip, ...; its preprocessing becomes the default of img_size, data.mean and "
                       "data.std) or a timm model name: any ViT (tiny to large, any patch and image size) or "
                       "CNN (resnet, densenet, convnext, ...).", required=True)
    weights: str = option("", "'random' (explicit random init), 'timm' (timm / Hugging Face hub weights of a "
                          "timm `name`: needs a network or a filled cache), 'hub' (a catalogue model's "
                          "published weights by its hub id), or a local checkpoint file "
                          "(.pth/.pt/.bin/.safetensors) or folder as its authors publish it.", required=True)
    img_size: int = option(224, "Input size (pixels, square); ViT position embeddings are built (and "
                           "resampled) for it.", gt=0)
    drop_path_rate: float = option(0.1, "Stochastic depth rate (0 for models without drop path).", ge=0, lt=1)
    global_pool: str | None = option(None, "None: the model's default. ViT: 'token' (class token) or 'avg' "
                                     "(mean of patch tokens + fc_norm, as in MAE fine-tuning); CNN: 'avg', 'max', ...")
    kwargs: dict[str, Any] = option({}, "Extra timm.create_model arguments, e.g. embed_dim / depth / "
                                    "num_heads / patch_size for small models.")
    head_init: Literal["random", "text"] = option(
        "random", "The classifier's start: 'random', or 'text' for a vision-language catalogue model "
        "(biomedclip, chexzero, siglip, medsiglip): its zero-shot classifier, from its text tower's embeddings "
        "of `prompt` (and, multi-label, minus those of `negative_prompt`) for each label.")
    prompt: str = option("{label}", "head_init 'text': the text of a label's presence; {label} is the label "
                         "name with '_' as spaces.")
    negative_prompt: str = option("no {label}", "head_init 'text', multi-label: the text of its absence (the "
                                  "CheXzero prompt pair).")

    def validate(self) -> None:
        model_family(self.architecture)
        entry = self.entry
        for key in ("prompt", "negative_prompt"):
            text = getattr(self, key)
            try:
                text.format(label="x")
            except (KeyError, IndexError, ValueError):
                text = ""
            if "{label}" not in text:
                raise ConfigError(f"model.{key} {getattr(self, key)!r} must hold {{label}} and no other braces")
        if self.head_init == "text" and not (entry is not None and entry.text):
            raise ConfigError(f"model.head_init 'text' needs a vision-language catalogue model with a text "
                              f"tower, not {self.name!r} (see medpeft models)")
        if self.weights == "timm" and entry is not None:
            raise ConfigError(f"model.weights 'timm' is for timm model names; {self.name!r} is a catalogue model: "
                              f"give its published file or folder, or 'hub'")
        if self.weights == "hub" and (entry is None or entry.hub is None):
            what = "is not a catalogue model" if entry is None else "has no hub id (its weights are published elsewhere)"
            raise ConfigError(f"model.weights 'hub': {self.name!r} {what}; give a local file or folder")

    @property
    def entry(self):
        """The catalogue entry of `name` (medpeft.config.catalogue), or None for a timm name."""
        from medpeft.config.catalogue import entry_of

        return entry_of(self.name)

    @property
    def architecture(self) -> str:
        """The timm model name that is built."""
        entry = self.entry
        return entry.architecture if entry is not None else self.name

    @property
    def family(self) -> str:
        """'vit' or 'cnn'."""
        return model_family(self.architecture)


@dataclass
class SplitConfig(Section):
    path = "data.split"
    files: dict[str, str] = option({}, "Split files by split name (train, val, test, or train_val: a pool "
                                   "that val_fraction carves a patient-disjoint val from): published lists "
                                   "('<path> <0/1 labels...>', labels checked against the dataset), image-name "
                                   "lists (NIH's train_val_list.txt) or medpeft split files. Unlisted images "
                                   "are unused.")
    column: str | None = option(None, "Column of the labels CSV holding train / val / test per row "
                                "(format 'csv').")
    val_fraction: float = option(0.1, "With neither files nor column: the share of images (whole patients) "
                                 "drawn for validation; with files.train_val: carved from that pool.", ge=0, lt=1)
    test_fraction: float = option(0.1, "With neither files nor column: the share of images (whole patients) "
                                  "drawn for test.", ge=0, lt=1)
    seed: int = option(0, "Seed of the patient draw and of the label-fraction subset.", ge=0)
    stratify: bool = option(True, "Draw val and test (and carve val from files.train_val) by iterative "
                            "stratification over the labels, so each split has its share of every label's "
                            "positives; false: a plain patient shuffle (medpeft 0.1).")
    label_fraction: float = option(1.0, "Train on this share of the training images: a patient-level, "
                                   "label-stratified subset, nested across fractions for a seed (the 1% subset "
                                   "lies inside the 10% one).", gt=0, le=1)

    def validate(self) -> None:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.split.val_fraction + test_fraction must be < 1")
        unknown = sorted(set(self.files) - {"train", "val", "test", "train_val"})
        if unknown:
            raise ConfigError(f"data.split.files: unknown split {unknown[0]!r} (expected train, val, test or "
                              f"train_val)")
        if self.files and self.column:
            raise ConfigError("data.split: give files or column, not both")


@dataclass
class DataConfig(Section):
    """The dataset. ``format`` picks the reader (a registered subclass), whose own keys join these."""

    path = "data"
    registry = DATA_FORMATS
    default_selection = "csv"
    format: ClassVar[str]
    split_column: ClassVar[bool] = False
    """Whether the reader reads ``split.column``."""

    csv: str | list[str] = option("", "The dataset's label file (a folder for 'folder' and 'images', the "
                                  ".npz file for 'medmnist'), or a list of files read as one dataset.",
                                  required=True)
    labels: list[str] = option([], "Label names, in output order (default for nih, chexpert, rsna: the "
                               "standard set).")
    task: Literal["multilabel", "multiclass"] = option(
        "multilabel", "'multilabel' (sigmoid + BCE per label; binary = one label) or 'multiclass' (softmax + "
        "cross-entropy).")
    on_missing: Literal["error", "skip"] = option("error", "A listed image that is missing or does not decode "
                                                  "by the rules below (checked for every image before a run): "
                                                  "'error' (listing them all), or 'skip' them (each listed with "
                                                  "its reason, counts per split).")
    alpha: Literal["error", "flatten"] = option("error", "An image with transparent pixels: 'error' (an image "
                                                "problem), or 'flatten' it onto black.")
    split: SplitConfig = option(factory=SplitConfig, help="Which image goes to train, val and test (data.split.*).")
    cache_dir: str | None = option(None, "Decode every used image once into a uint8 memmap at model.img_size "
                                   "under this folder, reused by later runs and processes; None decodes each "
                                   "image every epoch.")
    mean: list[float] = option(IMAGENET_MEAN, "Per-channel normalisation mean (RGB, of pixel values scaled to "
                               "[0, 1]; the gray image is repeated).", length=3, ge=0, le=1)
    std: list[float] = option(IMAGENET_STD, "Per-channel normalisation standard deviation (RGB).", length=3, gt=0)
    num_workers: int = option(0, "DataLoader worker processes (and cache-building processes).", ge=0)
    age_bins: list[int] = option(AGE_BINS, "Edges (years, strictly increasing) of the age groups of the "
                                 "subgroup reports: [20, 40, 60, 80] gives 0-19, 20-39, 40-59, 60-79 and 80+.", gt=0)

    def default_labels(self) -> tuple[str, ...]:
        """The labels used when ``labels`` is not given."""
        return ()

    def known_labels(self) -> tuple[str, ...] | None:
        """The labels the format has (None: whatever the files name)."""
        return None

    def read(self, path: str):
        """The plain table (medpeft.data.table) of one label file `path`; each format implements it."""
        raise NotImplementedError

    def subgroups(self) -> list[str]:
        """The NAMEs of the table's ``meta:NAME`` columns that evaluations report per subgroup."""
        return []

    def validate(self) -> None:
        if not self.labels:
            self.labels = list(self.default_labels())
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"data.labels has duplicates: {self.labels}")
        known = self.known_labels()
        unknown = [label for label in self.labels if known is not None and label not in known]
        if unknown:
            raise ConfigError(f"data.labels: the '{self.format}' format has no label {unknown[0]!r} "
                              f"(expected some of: {', '.join(known)})")
        if self.task == "multiclass" and len(self.labels) < 2:
            raise ConfigError("data.task 'multiclass' needs at least 2 labels")
        if not self.age_bins or any(b <= a for a, b in zip(self.age_bins, self.age_bins[1:])):
            raise ConfigError(f"data.age_bins must be a non-empty list of strictly increasing ages, got "
                              f"{self.age_bins}")
        if self.split.column and not self.split_column:
            raise ConfigError(f"data.split.column: the '{self.format}' format has no split column (format 'csv')")


def check_pattern(key: str, pattern: str | None) -> None:
    """A regular expression with at least one group (the patient id), or ConfigError."""
    if pattern is None:
        return
    try:
        groups = re.compile(pattern).groups
    except re.error as e:
        raise ConfigError(f"{key} {pattern!r} is not a regular expression ({e})") from None
    if groups < 1:
        raise ConfigError(f"{key} {pattern!r} needs a group (...) around the patient id")


@dataclass
class AugmentConfig(Section):
    path = "augment"
    enabled: bool = option(True, "Random augmentation of training images (evaluation never augments).")
    scale: list[float] = option([0.5, 1.0], "RandomResizedCrop area range.", length=2, gt=0, le=1)
    hflip: float = option(0.5, "Probability of a horizontal flip.", ge=0, le=1)
    rand_augment_ops: int = option(0, "torchvision RandAugment operations per image; 0 = off.", ge=0)
    rand_augment_magnitude: int = option(9, "RandAugment magnitude.", ge=0, le=30)

    def validate(self) -> None:
        if self.scale[0] > self.scale[1]:
            raise ConfigError(f"augment.scale must be [low, high] with low <= high, got {self.scale}")


@dataclass
class TrainConfig(Section):
    path = "train"
    epochs: int = option(10, "Passes over the training images.", gt=0)
    batch_size: int = option(32, "Images per step (the global batch under DDP).", gt=0)
    eval_batch_size: int = option(64, "Images per evaluation batch.", gt=0)
    optimizer: Literal["adamw", "sgd"] = option("adamw", "'adamw' or 'sgd' (timm's factory).")
    lr: float = option(1e-3, "Peak learning rate (per optimiser step, after accumulation).", gt=0)
    min_lr: float = option(1e-6, "Learning rate at the start of warmup and the end of the cosine decay.", ge=0)
    warmup_epochs: float = option(1.0, "Epochs of linear warmup (fractions allowed).", ge=0)
    weight_decay: float = option(0.05, "Decoupled weight decay (none on norms, biases, position embedding, "
                                 "class token).", ge=0)
    momentum: float = option(0.9, "SGD momentum.", ge=0, lt=1)
    layer_decay: float | None = option(None, "Layer-wise lr decay (e.g. 0.75): lr scale = decay ** (depth - "
                                       "layer); None = off.", gt=0, le=1)
    grad_accum_steps: int = option(1, "Batches whose gradients add up to one optimiser step.", gt=0)
    grad_clip: float | None = option(None, "Clip the gradient norm to this; None = off.", gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "'fp32', 'bf16' (autocast; CPU or GPU) or 'fp16' (autocast + loss scaling; GPU only).")
    device: str = option("auto", "'auto' (cuda if available), 'cpu' or 'cuda[:N]'.")
    attention: Literal["auto", "fused", "math"] = option(
        "auto", "Attention kernel of timm ViTs: 'fused' (torch's scaled_dot_product_attention), 'math' (timm's "
        "matmul + softmax path; keeps each block's attention matrix for backward) or 'auto' (train.accel "
        "chooses: 'math' under bf16 on the CPU, else 'fused').")
    recompute: Literal["none", "selective", "blocks"] = option(
        "none", "Activation recomputation of ViT blocks: 'none', 'selective' (keep the qkv, attention and fc2 "
        "outputs; recompute the rest) or 'blocks' (keep block inputs only).")
    frozen_prefix_cache: bool = option(False, "Compute the part of the model the method leaves frozen once per "
                                       "image and train the rest on it (linear probe, ViTs with frozen leading "
                                       "blocks; needs augment.enabled: false).")
    accel: bool = option(True, "medpeft's speed-ups where measured faster: oneDNN linear layers and lean LoRA "
                         "layers (fp32 on the CPU), reused allocator memory, the attention kernel for 'auto', "
                         "channels-last CNNs. false: the plain torch, timm and peft modules.")
    compile: bool = option(False, "torch.compile the training forward (inductor: needs a C/C++ compiler).")
    eval_every: int = option(1, "Epochs between two validations (the last epoch is always validated); the "
                             "best weights are chosen among the validated epochs.", gt=0)
    early_stopping_patience: int | None = option(None, "Stop after this many validations without a better "
                                                 "validation mean AUROC; None = never.", gt=0)
    seed: int = option(0, "Seed of the head's init, data order, augmentation, dropout and drop path (below "
                       "10^6: each image's augmentation seed, derived from it, is a 64-bit number).", ge=0, lt=1_000_000)
    log_every_steps: int = option(10, "Optimiser steps between two step records in log.jsonl.", gt=0)

    def validate(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr:g}) must be <= train.lr ({self.lr:g})")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", self.device):
            raise ConfigError(f"train.device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass
class MethodConfig(Section):
    """A PEFT method's knobs; ``name`` picks the registered subclass (see medpeft.methods)."""

    path = "method"
    registry = METHODS
    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]] = ("vit",)
    """Backbone families the method applies to: 'vit', 'cnn'."""
    lr_range: ClassVar[tuple[float, float]] = (1e-4, 1e-2)
    """Where ``medpeft tune`` searches train.lr for the method (log scale)."""
    search_space: ClassVar[dict[str, tuple]] = {}
    """The method's own keys that ``medpeft tune`` searches (medpeft.train.tune): dotted key -> ``("float",
    low, high[, log])``, ``("int", low, high[, log])`` or ``("categorical", [choices])``."""

    def check_model(self, model: ModelConfig) -> None:
        """Rules that depend on the backbone (e.g. which targets exist); ConfigError naming the key."""
        if model.family not in self.families:
            raise ConfigError(f"method.name {self.name!r} applies to {' and '.join(self.families)} backbones, "
                              f"not to model.name {model.name!r} ({model.family})")
