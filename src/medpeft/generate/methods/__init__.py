"""Generative PEFT methods for text-to-image diffusion models, one file each, registered under
``method.name`` (see registry)."""

from medpeft.generate.methods import difffit, lora, selective, svdiff  # noqa: F401  (they register)
from medpeft.generate.methods.registry import (
    ADAPTER_FILE, GENERATIVE_METHODS, GenerativeMethodConfig, count_parameters, trainable_state_dict,
)

__all__ = ["ADAPTER_FILE", "GENERATIVE_METHODS", "GenerativeMethodConfig", "count_parameters",
           "trainable_state_dict"]
