"""LoRA (Hu et al. 2022) through peft, on the attention projections of the UNet (``to_q``, ``to_k``,
``to_v``, ``to_out.0``) and, when adapted, of the text encoder (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``), as diffusers' LoRA training does. Saved in the format diffusers reads
(``pipeline.load_lora_weights(folder)``: ``pytorch_lora_weights.safetensors`` with ``unet.``/``text_encoder.``
keys); merged with peft's merge. peft's own injection adds the layers to both components (transformers'
``add_adapter`` needs a newer peft than the UNet's)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from medpeft.config import option
from medpeft.errors import CheckpointError
from medpeft.generate.methods.registry import GENERATIVE_METHODS, GenerativeMethodConfig

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "default"  # peft's adapter name
TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}


@GENERATIVE_METHODS.register("lora")
@dataclass
class LoraConfig(GenerativeMethodConfig):
    description = "LoRA on the attention projections (rank r, scale alpha / r)."
    reference = "Hu et al. 2022, arXiv 2106.09685; diffusers' LoRA training"
    r: int = option(8, "Rank of the update B @ A.", gt=0)
    alpha: float = option(8.0, "Scale numerator: the update is (alpha / r) B @ A.", gt=0)
    dropout: float = option(0.0, "Dropout on the update's input.", ge=0, lt=1)

    def peft_config(self, component: str):
        import peft

        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               init_lora_weights="gaussian", target_modules=TARGETS[component])

    def apply(self, model) -> None:
        import peft

        for module in model.modules().values():
            module.requires_grad_(False)
        for name in self.components:  # peft's injection, as diffusers' add_adapter does
            peft.inject_adapter_in_model(self.peft_config(name), getattr(model, name), ADAPTER)

    def merge(self, model) -> None:
        from diffusers.utils import recurse_remove_peft_layers
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name in self.components:
            component = getattr(model, name)
            for module in component.modules():
                if isinstance(module, BaseTunerLayer):
                    module.merge()
            recurse_remove_peft_layers(component)

    def save(self, model, folder: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(_lora_state(getattr(model, name)))
                  for name in self.components}
        # the peft config (rank, alpha, targets) in the file's metadata, where diffusers reads it
        layers.update({f"{name}_lora_adapter_metadata": self.peft_config(name).to_dict() for name in self.components})
        with tempfile.TemporaryDirectory(dir=folder) as scratch:  # written whole, then moved into place
            StableDiffusionPipeline.save_lora_weights(scratch, safe_serialization=True, **layers)
            shutil.move(Path(scratch) / LORA_FILE, Path(folder) / LORA_FILE)

    def load(self, model, folder: Path) -> None:
        from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
        from safetensors.torch import load_file

        path = Path(folder) / LORA_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: LoRA weights not found")
        state = load_file(str(path))
        for name in self.components:
            component, prefix = getattr(model, name), f"{name}."
            own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if own:  # diffusers' own reading: the UNet's keys (lora.down/up), the text encoder's (lora_linear_layer)
                own = (convert_unet_state_dict_to_peft if name == "unet" else convert_state_dict_to_peft)(own)
            own = {k.replace(".weight", f".{ADAPTER}.weight"): v for k, v in own.items()}
            expected = {n for n, _ in component.named_parameters() if ".lora_" in n}
            missing, extra = sorted(expected - set(own)), sorted(set(own) - expected)
            if missing or extra:
                raise CheckpointError(f"{path}: does not fit the model's {name}: missing {missing[:3]}, "
                                      f"unexpected {extra[:3]}")
            component.load_state_dict(own, strict=False)


def _lora_state(component: nn.Module) -> dict:
    """The LoRA weights of `component` in peft's saved layout (``...to_q.lora_A.weight``)."""
    return {n.replace(f".{ADAPTER}.", "."): p.detach().cpu() for n, p in component.named_parameters() if ".lora_" in n}
