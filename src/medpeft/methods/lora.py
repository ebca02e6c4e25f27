"""The LoRA family through HF peft, on chosen linear layers of a timm ViT (or the convolutions of a CNN):
LoRA (Hu et al. 2021), DoRA and rsLoRA. Weights are saved in peft's adapter format
(``peft.PeftModel.from_pretrained`` loads them) with the classification head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import peft

from medpeft.config import option
from medpeft.methods import _peft
from medpeft.methods.registry import MethodSpec, register_method


@dataclass
class LoraConfig(_peft.PeftConfig):
    families = ("vit", "cnn")
    search_space = {"method.r": ("categorical", [4, 8, 16]), "method.alpha": ("int", 4, 64, True),
                    "method.dropout": ("float", 0.0, 0.2)}
    use_dora: ClassVar[bool] = False
    use_rslora: ClassVar[bool] = False
    r: int = option(8, "Rank of the update B @ A.", gt=0)
    alpha: int = option(16, "Scaling numerator: the update is multiplied by alpha / r (rsLoRA: alpha / sqrt(r)).",
                        gt=0)
    dropout: float = option(0.0, "Dropout on the update's input.", ge=0, lt=1)
    targets: list[str] = _peft.targets_option(["qkv"])

    def peft_config(self) -> peft.LoraConfig:
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                               use_dora=self.use_dora, use_rslora=self.use_rslora)


@dataclass
class DoraConfig(LoraConfig):
    families = ("vit",)
    use_dora = True


@dataclass
class RsLoraConfig(LoraConfig):
    families = ("vit",)
    use_rslora = True


register_method(MethodSpec(
    name="lora", config_cls=LoraConfig, **_peft.SHARED,
    description="LoRA: trainable low-rank updates of chosen linear layers (HF peft).",
    reference="Hu et al. 2021, arXiv 2106.09685; Lian et al. 2024, arXiv 2401.12215"))
register_method(MethodSpec(
    name="dora", config_cls=DoraConfig, **_peft.SHARED,
    description="DoRA: LoRA on the direction of each weight plus a trained magnitude vector (HF peft).",
    reference="Liu et al. 2024, arXiv 2402.09353"))
register_method(MethodSpec(
    name="rslora", config_cls=RsLoraConfig, **_peft.SHARED,
    description="rsLoRA: LoRA scaled by alpha / sqrt(r), stable at high rank (HF peft).",
    reference="Kalajdzievski 2023, arXiv 2312.03732"))
