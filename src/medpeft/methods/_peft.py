"""What every HF-peft-backed method shares: target names -> module regex on timm ViT blocks, the
targets' validation, injection with the head trained and saved (``modules_to_save``), peft's adapter
format, and merging.

Targets are matched by full regular expressions on ``blocks.N....`` names: a suffix such as ``proj``
would also hit ``patch_embed.proj``. Query/key/value alone split the fused ``qkv`` into three
Linears first (``medpeft.backbones.split_qkv``); merging fuses them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import peft
from safetensors import SafetensorError
from torch import nn

from medpeft.backbones import classifier_name, fuse_qkv, split_qkv
from medpeft.config import MethodConfig, ModelConfig, option
from medpeft.errors import CheckpointError, ConfigError
from medpeft.methods.registry import read_safetensors

# Target name -> module-name patterns below ``blocks.N.``.
TARGETS = {
    "qkv": [r"attn\.qkv"],
    "q": [r"attn\.qkv\.q"],
    "k": [r"attn\.qkv\.k"],
    "v": [r"attn\.qkv\.v"],
    "proj": [r"attn\.proj"],
    "fc1": [r"mlp\.fc1"],
    "fc2": [r"mlp\.fc2"],
    "mlp": [r"mlp\.fc1", r"mlp\.fc2"],
    "all_linear": [r"attn\.qkv", r"attn\.proj", r"mlp\.fc1", r"mlp\.fc2"],
}
SPLIT_TARGETS = {"q", "k", "v"}
CNN_TARGET = "convs"
"""For CNNs: every ungrouped Conv2d after the stem (peft's LoRA / LoHa / ... on convolutions)."""
PEFT_WEIGHTS = "adapter_model.safetensors"


def targets_option(default: list[str]):
    """The ``targets`` field of a peft-backed method's config."""
    return option(default, "ViT: any of qkv (fused), q, k, v (e.g. [q, v] as MED-PEFT), proj, fc1, fc2, mlp, "
                  "all_linear. CNN: [convs] (every ungrouped convolution after the stem).", required=True)


@dataclass
class PeftConfig(MethodConfig):
    """Base of the configs of peft-backed methods: each has ``targets`` and makes its ``peft_config``."""

    def validate(self) -> None:
        check_targets(self.targets)

    def check_model(self, model: ModelConfig) -> None:
        super().check_model(model)
        if (CNN_TARGET in self.targets) != (model.family == "cnn"):
            expected = f"[{CNN_TARGET}]" if model.family == "cnn" else ", ".join(TARGETS)
            raise ConfigError(f"method.targets {self.targets} do not exist in {model.name} (a {model.family}; "
                              f"expected {expected})")

    def peft_config(self) -> peft.PeftConfig:
        """The peft config (its target_modules and modules_to_save are set by ``inject``)."""
        raise NotImplementedError


def check_targets(targets: list[str]) -> None:
    unknown = [t for t in targets if t not in TARGETS and t != CNN_TARGET]
    if unknown or not targets:
        raise ConfigError(f"method.targets {targets} must be a non-empty list of: {', '.join(TARGETS)} "
                          f"(ViT) or {CNN_TARGET} (CNN)")
    if SPLIT_TARGETS & set(targets) and {"qkv", "all_linear"} & set(targets):
        raise ConfigError("method.targets: q/k/v cannot be combined with the fused qkv (or all_linear)")
    if CNN_TARGET in targets and len(targets) > 1:
        raise ConfigError(f"method.targets: {CNN_TARGET} (CNN) cannot be combined with ViT targets")


def target_regex(targets: list[str], model: nn.Module | None = None) -> str:
    """A regex that peft full-matches against module names."""
    if CNN_TARGET in targets:
        convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        return "(?:" + "|".join(re.escape(name) for name in convs[1:]) + ")"  # convs[0] is the stem
    patterns = sorted({p for t in targets for p in TARGETS[t]})
    return r"blocks\.\d+\.(?:" + "|".join(patterns) + ")"


def apply(model: nn.Module, config: PeftConfig) -> peft.PeftModel:
    """Wrap `model` with the method's peft config on its targets; the head trains and is saved with it."""
    if SPLIT_TARGETS & set(config.targets):
        split_qkv(model)
    peft_config = config.peft_config()
    peft_config.target_modules = target_regex(config.targets, model)
    peft_config.modules_to_save = [classifier_name(model)]
    try:
        return peft.get_peft_model(model, peft_config)
    except ValueError as e:
        raise ConfigError(f"method.targets {config.targets}: {str(e).splitlines()[0]}") from None


def save(model: peft.PeftModel, directory: Path) -> None:
    """peft's own format; a run writes it in a medpeft.files.atomic_directory, which makes the file that
    safetensors writes private (0600) an ordinary one (0644). A failed write (e.g. a full disk) is one
    CheckpointError naming the file."""
    try:
        model.save_pretrained(str(directory))
    except SafetensorError as e:  # safetensors' Rust writer reports I/O errors as its own error
        raise CheckpointError(f"{Path(directory) / PEFT_WEIGHTS}: not written ({str(e).splitlines()[0]})") from None


def load(model: peft.PeftModel, directory: Path) -> None:
    path = Path(directory) / PEFT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter weights not found")
    state = read_safetensors(path)
    expected = set(peft.get_peft_model_state_dict(model))  # what this model would save
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    peft.set_peft_model_state_dict(model, state)


def merge(model: peft.PeftModel) -> nn.Module:
    """Fold the adapter into the base weights; returns the plain timm model."""
    return fuse_qkv(model.merge_and_unload())


SHARED = dict(apply=apply, save=save, load=load, merge=merge)
"""The MethodSpec functions of a peft-backed method."""
