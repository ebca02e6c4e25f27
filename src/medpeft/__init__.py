"""medpeft: parameter-efficient fine-tuning of medical vision foundation models."""

__version__ = "0.1.0"

from medpeft.config import RunConfig, load_config  # noqa: E402
from medpeft.train import evaluate, train  # noqa: E402
from medpeft.inference import load_run, load_runs  # noqa: E402

__all__ = ["RunConfig", "__version__", "evaluate", "load_config", "load_run", "load_runs", "train"]
