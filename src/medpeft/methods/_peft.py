"""What every HF-peft-backed method shares: target names -> module regex on timm ViT blocks, injection
with the head trained and saved (``modules_to_save``), peft's adapter format, and merging.

Targets are matched by full regular expressions on ``blocks.N....`` names: a suffix such as ``proj``
would also hit ``patch_embed.proj``. Query/key/value alone split the fused ``qkv`` into three
Linears first (``medpeft.backbones.split_qkv``); merging fuses them back.
"""

from __future__ import annotations

import re
from pathlib import Path

import peft
from safetensors.torch import load_file
from torch import nn

from medpeft.backbones.layers import fuse_qkv, split_qkv
from medpeft.errors import CheckpointError, ConfigError
from medpeft.methods.registry import classifier_name

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


def check_targets(targets: list[str]) -> None:
    unknown = [t for t in targets if t not in TARGETS and t != CNN_TARGET]
    if unknown or not targets:
        raise ConfigError(f"method.targets {targets} must be a non-empty list of: {', '.join(TARGETS)} "
                          f"(ViT) or {CNN_TARGET} (CNN)")
    if SPLIT_TARGETS & set(targets) and {"qkv", "all_linear"} & set(targets):
        raise ConfigError("method.targets: q/k/v cannot be combined with the fused qkv (or all_linear)")


def target_regex(targets: list[str], model: nn.Module | None = None) -> str:
    """A regex that peft full-matches against module names."""
    if CNN_TARGET in targets:
        convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        return "(?:" + "|".join(re.escape(name) for name in convs[1:]) + ")"  # convs[0] is the stem
    patterns = sorted({p for t in targets for p in TARGETS[t]})
    return r"blocks\.\d+\.(?:" + "|".join(patterns) + ")"


def inject(model: nn.Module, targets: list[str], peft_config: peft.PeftConfig) -> peft.PeftModel:
    """Wrap `model` with `peft_config` (its target_modules and modules_to_save are set here)."""
    if SPLIT_TARGETS & set(targets):
        split_qkv(model)
    peft_config.target_modules = target_regex(targets, model)
    peft_config.modules_to_save = [classifier_name(model)]
    try:
        return peft.get_peft_model(model, peft_config)
    except ValueError as e:
        raise ConfigError(f"method.targets {targets}: {str(e).splitlines()[0]}") from None


def save(model: peft.PeftModel, directory: Path) -> None:
    model.save_pretrained(str(directory))


def load(model: peft.PeftModel, directory: Path) -> None:
    path = Path(directory) / PEFT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter weights not found")
    state = load_file(str(path))
    expected = set(peft.get_peft_model_state_dict(model))  # what this model would save
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    peft.set_peft_model_state_dict(model, state)


def merge(model: peft.PeftModel) -> nn.Module:
    """Fold the adapter into the base weights; returns the plain timm model."""
    return fuse_qkv(model.merge_and_unload())
