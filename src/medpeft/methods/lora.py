"""LoRA (Hu et al. 2021) through HF peft, on chosen linear layers of a timm ViT.

The classification head is trained and saved with the adapter (peft ``modules_to_save``), and the
weights are written in peft's adapter format, so ``peft.PeftModel.from_pretrained`` loads them.
Targets are matched by full regular expressions on ``blocks.N....`` names: a suffix such as
``proj`` would also hit ``patch_embed.proj``. Query/key/value alone (MED-PEFT uses query+value)
split the fused ``qkv`` into three Linears first (``medpeft.backbones.split_qkv``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import peft
from safetensors.torch import load_file
from torch import nn

from medpeft.backbones.layers import fuse_qkv, split_qkv
from medpeft.errors import CheckpointError, ConfigError
from medpeft.methods.registry import MethodSpec, classifier_name, register_method

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
_SPLIT_TARGETS = {"q", "k", "v"}
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraConfig:
    name: ClassVar[str] = "lora"
    r: int = 8
    """Rank of the update B @ A."""
    alpha: int = 16
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["qkv"])
    """Any of: qkv (fused, default), q, k, v (e.g. [q, v] as MED-PEFT), proj, fc1, fc2, mlp, all_linear."""

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"method.targets {self.targets} must be a non-empty list of: {', '.join(TARGETS)}")
        if _SPLIT_TARGETS & set(self.targets) and {"qkv", "all_linear"} & set(self.targets):
            raise ConfigError("method.targets: q/k/v cannot be combined with the fused qkv (or all_linear)")
        if self.r <= 0:
            raise ConfigError(f"method.r must be > 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")


def target_regex(targets: list[str]) -> str:
    patterns = sorted({p for t in targets for p in TARGETS[t]})
    return r"blocks\.\d+\.(?:" + "|".join(patterns) + ")"


@dataclass
class DoraConfig(LoraConfig):
    name: ClassVar[str] = "dora"


@dataclass
class RsLoraConfig(LoraConfig):
    name: ClassVar[str] = "rslora"


def apply(model: nn.Module, config: LoraConfig) -> nn.Module:
    if _SPLIT_TARGETS & set(config.targets):
        split_qkv(model)
    peft_config = peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
        target_modules=target_regex(config.targets), modules_to_save=[classifier_name(model)],
        use_dora=config.name == "dora", use_rslora=config.name == "rslora",
    )
    try:
        return peft.get_peft_model(model, peft_config)
    except ValueError as e:
        raise ConfigError(f"method.targets {config.targets}: {str(e).splitlines()[0]}") from None


def save(model: peft.PeftModel, directory: Path) -> None:
    model.save_pretrained(str(directory))


def load(model: peft.PeftModel, directory: Path) -> None:
    path = Path(directory) / PEFT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: LoRA adapter weights not found")
    result = peft.set_peft_model_state_dict(model, load_file(str(path)))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def merge(model: peft.PeftModel) -> nn.Module:
    """Fold B @ A * alpha / r into the base weights; returns the plain timm model."""
    return fuse_qkv(model.merge_and_unload())


register_method(MethodSpec(
    name="lora", config_cls=LoraConfig, apply=apply, save=save, load=load, merge=merge,
    description="LoRA: trainable low-rank updates of chosen linear layers (HF peft).",
    reference="Hu et al. 2021, arXiv 2106.09685; Lian et al. 2024, arXiv 2401.12215",
))
register_method(MethodSpec(
    name="dora", config_cls=DoraConfig, apply=apply, save=save, load=load, merge=merge,
    description="DoRA: LoRA on the direction of each weight plus a trained magnitude vector (HF peft).",
    reference="Liu et al. 2024, arXiv 2402.09353",
))
register_method(MethodSpec(
    name="rslora", config_cls=RsLoraConfig, apply=apply, save=save, load=load, merge=merge,
    description="rsLoRA: LoRA scaled by alpha / sqrt(r), stable at high rank (HF peft).",
    reference="Kalajdzievski 2023, arXiv 2312.03732",
))
