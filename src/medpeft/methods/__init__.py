"""PEFT methods behind one interface; each module registers itself by name."""

from medpeft.methods.registry import (
    MethodSpec, get_method, list_methods, method_config_from_dict, register_method, unwrap,
)
from medpeft.methods import (  # noqa: F401  (registration)
    adalora, adapters, fact, full, linear_probe, lora, peft_adapters, selective, ssf, vpt,
)

__all__ = ["MethodSpec", "get_method", "list_methods", "method_config_from_dict", "register_method", "unwrap"]
