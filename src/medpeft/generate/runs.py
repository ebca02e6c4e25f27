"""Where a generate run's model comes from and how a finished run is read back.

A model source is ``random:NAME``, a folder in the diffusers layout, a hub id, or a finished ``medpeft
generate train`` run (its source with its method's trained parameters merged: a run can be the
foundation of another). A run's folder keeps its method's trained parameters in ``adapter/``.
"""

from __future__ import annotations

from pathlib import Path

from medpeft.config import build
from medpeft.engine import rundir
from medpeft.errors import RunDirError
from medpeft.generate.config import GenerateConfig
from medpeft.generate.model import RANDOM_PREFIX, DiffusionModel, load_diffusion, random_model

ADAPTER = "adapter"


def prepare(model: DiffusionModel, config: GenerateConfig) -> DiffusionModel:
    """`model` as the run trains it: its scheduler told what the UNet predicts (the samplers read it), the
    run's method applied."""
    from diffusers import DDIMScheduler

    model.scheduler = DDIMScheduler.from_config(model.scheduler.config, prediction_type=config.diffusion.prediction)
    config.method.apply(model)
    return model


def is_generate_run(path: Path) -> bool:
    return (path / rundir.CONFIG).is_file() and (path / ADAPTER).exists()


def load_source(source: str, seed: int = 0) -> DiffusionModel:
    """The model a source names (see the module's docstring); a run's is merged into plain weights."""
    if source.startswith(RANDOM_PREFIX):
        return random_model(source.removeprefix(RANDOM_PREFIX), seed)
    if is_generate_run(Path(source)):
        config, model = load_run(source)
        config.method.merge(model)
        return model
    return load_diffusion(source)


def load_run_config(run_dir: str | Path) -> GenerateConfig:
    """A finished generate run's config."""
    run_dir = Path(run_dir)
    if not rundir.is_complete(run_dir) or not is_generate_run(run_dir):
        raise RunDirError(f"{run_dir}: not a finished medpeft generate run (no {rundir.METRICS} or {ADAPTER}/)")
    return build(GenerateConfig, {**rundir.saved_config(run_dir), "output_dir": str(run_dir)})


def load_run(run_dir: str | Path) -> tuple[GenerateConfig, DiffusionModel]:
    """A finished generate run's config and model (its method applied, its trained parameters loaded)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    model = prepare(load_source(config.model.source, config.model.seed), config)
    config.method.load(model, run_dir / ADAPTER)
    return config, model
