"""medpeft: parameter-efficient fine-tuning of medical vision foundation models.

The Python API (``medpeft.train``, ``medpeft.load_config``, ``medpeft.evaluate``, ...) is imported on first
use, so importing the package (and the command line, ``medpeft --help``) does not import torch. Dataset
formats and methods register themselves when their registry is first read (medpeft.config.schema.Registry).
"""

import importlib
import sys
import types

from medpeft.version import __version__

_API = {"RunConfig": "medpeft.config", "load_config": "medpeft.config", "evaluate": "medpeft.inference",
        "load_run": "medpeft.inference", "load_runs": "medpeft.inference", "train": "medpeft.train"}
__all__ = ["RunConfig", "__version__", "evaluate", "load_config", "load_run", "load_runs", "train"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'medpeft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The import system binds each submodule on its parent package; ``medpeft.train`` stays the API's
    function, as ``from medpeft.train import train`` names it, when the package medpeft.train is imported."""

    def __setattr__(self, name: str, value) -> None:
        if not (name == "train" and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
