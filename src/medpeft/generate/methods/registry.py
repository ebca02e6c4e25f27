"""The generative methods' registry: ``method.name`` -> a GenerativeMethodConfig subclass, each in its own
file (this package imports them all), which selects or adds the parameters it trains.

A method adapts the model's `components` (the UNet, and the text encoder when named): ``apply`` freezes
everything and makes exactly the method's parameters trainable; ``merge`` folds what it added into plain
weights (the identity for methods that tune existing parameters); ``save`` writes the trained parameters
(``adapter.safetensors``, names as in the applied model) and ``load`` reads them into an applied model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from safetensors.torch import load_file, save
from torch import nn

from medpeft.config import Registry, Section, option
from medpeft.errors import CheckpointError
from medpeft.files import write_bytes_atomic

GENERATIVE_METHODS = Registry("method.name", "generative method", "medpeft.generate.methods")
ADAPTER_FILE = "adapter.safetensors"


@dataclass
class GenerativeMethodConfig(Section):
    """A generative method's knobs; ``name`` picks the registered subclass."""

    path = "method"
    registry = GENERATIVE_METHODS
    name: ClassVar[str]
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    components: list[Literal["unet", "text_encoder"]] = option(
        ["unet"], "The components the method adapts: the UNet, and the text encoder if named.", required=True)

    def apply(self, model) -> None:
        """Freeze `model` (a DiffusionModel) and make exactly this method's parameters trainable."""
        for module in model.modules().values():
            module.requires_grad_(False)
        for name in self.components:
            self.adapt(getattr(model, name))

    def adapt(self, component: nn.Module) -> None:
        """Make this method's parameters of one component trainable (adding them if the method has its own)."""
        raise NotImplementedError

    def merge(self, model) -> None:
        """Fold the method's own parameters into plain weights; the model then has the base's architecture."""

    def save(self, model, folder: Path) -> None:
        write_bytes_atomic(Path(folder) / ADAPTER_FILE, save(trainable_state_dict(model)))

    def load(self, model, folder: Path) -> None:
        path = Path(folder) / ADAPTER_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: adapter weights not found")
        state = load_file(str(path))
        expected = trainable_state_dict(model)
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{path}: does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, module in model.modules().items():
            prefix = f"{name}."
            module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)},
                                   strict=False)


def trainable_state_dict(model) -> dict:
    """The trainable parameters of every component, named ``COMPONENT.PARAMETER``, detached, on the CPU."""
    return {f"{component}.{name}": param.detach().to("cpu", copy=True)
            for component, module in model.modules().items()
            for name, param in module.named_parameters() if param.requires_grad}


def count_parameters(model) -> dict:
    """{'trainable': n, 'total': n, 'trainable_percent': %} over the components with weights (the VAE,
    frozen, included in the total)."""
    total = sum(p.numel() for module in model.modules().values() for p in module.parameters())
    trainable = sum(p.numel() for module in model.modules().values() for p in module.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total}
