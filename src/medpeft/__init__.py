"""medpeft: parameter-efficient fine-tuning of medical vision foundation models.

The package root composes the layers: importing it registers every dataset format (medpeft.data) and
every method (medpeft.methods) with the config loader, and exposes the Python API.
"""

from medpeft import data, methods  # noqa: F401  (registration of formats and methods)
from medpeft.config import RunConfig, load_config
from medpeft.inference import evaluate, load_run, load_runs
from medpeft.train import train
from medpeft.version import __version__

__all__ = ["RunConfig", "__version__", "evaluate", "load_config", "load_run", "load_runs", "train"]
