"""A finished run put to use: probabilities and decisions for new images (PNG, JPEG, TIFF, DICOM),
several task runs on one shared backbone, saliency maps and a standalone export.

    run = medpeft.load_run("runs/nih-lora")
    table = run.predict(["scans/", "a.dcm"])      # one row per image: prob:<label>, pred:<label>
    run.explain(["a.dcm"], "saliency/")           # heatmap overlays for the labels called positive
    run.export("export/")                         # merged safetensors for timm, TorchScript, ONNX
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from torch import nn

from medpeft import accel
from medpeft.config import RunConfig
from medpeft.console import progress_bar
from medpeft.data.dataset import build_transform
from medpeft.engine import rundir
from medpeft.engine.assemble import load_model
from medpeft.engine.evaluation import evaluate_split
from medpeft.engine.loaders import image_cache
from medpeft.engine.runtime import autocast, resolve_device, session
from medpeft.errors import ConfigError, DataError, RunDirError, TrainingError
from medpeft.inference.inputs import collect_inputs, input_name, read_batches, report_unreadable
from medpeft.methods import MethodSpec
from medpeft.metrics.thresholds import YOUDEN, parse_rule, select_thresholds


@dataclass
class Run:
    """A finished run's model with its best weights, its preprocessing, labels and decision rule."""

    path: Path
    config: RunConfig
    model: nn.Module
    """The model in eval mode, on the CPU until `predict` moves it."""
    spec: MethodSpec
    rule: str
    """'youden', 'sensitivity:X' or 'argmax' (multiclass)."""
    thresholds: dict | None
    """{label: threshold, None where val had one class}; None for arg-max."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def labels(self) -> list[str]:
        return list(self.config.data.labels)

    @property
    def preprocessing(self) -> dict:
        return preprocessing(self.config)

    def transform(self):
        return build_transform(self.config.model.img_size, self.config.data.mean, self.config.data.std, None)

    def decide(self, probs: np.ndarray) -> pd.DataFrame:
        """Decision columns for (N, K) probabilities: pred:<label> 0/1, or pred = the arg-max label."""
        if self.thresholds is None:
            return pd.DataFrame({"pred": np.asarray(self.labels)[probs.argmax(1)]})
        return pd.DataFrame({
            f"pred:{label}": pd.array(np.where(probs[:, k] >= t, 1, 0) if t is not None else [None] * len(probs),
                                      dtype="Int64")
            for k, (label, t) in enumerate(self.thresholds.items())})

    def predict(self, images, batch_size: int | None = None, strict: bool = False, workers: int = 0,
                progress: bool = False) -> pd.DataFrame:
        """One row per image: input, error ('' when read), prob:<label>..., pred:<label>... (or pred)."""
        return predict([self], images, batch_size=batch_size, strict=strict, workers=workers, progress=progress)

    def explain(self, images, out_dir, labels: list[str] | None = None) -> pd.DataFrame:
        """Saliency overlays (PNG) per image and per label called positive (or `labels`), see medpeft.inference.saliency."""
        from medpeft.inference.saliency import explain

        return explain(self, images, out_dir, labels)

    def export(self, out_dir) -> dict:
        """A standalone model (merged safetensors loadable by timm, TorchScript, ONNX), see medpeft.inference.export."""
        from medpeft.inference.export import export

        return export(self, out_dir)


def preprocessing(config: RunConfig) -> dict:
    """What turns a grayscale image into the model's input (see medpeft.data.dataset.build_transform)."""
    return {"img_size": config.model.img_size, "mean": list(config.data.mean), "std": list(config.data.std),
            "resize": "squash (the whole image, no crop)", "channels": "grayscale repeated to RGB"}


# ----------------------------------------------------------------------------- loading
def _decision_rule(run_dir: Path, config: RunConfig, rule: str) -> tuple[str, dict | None]:
    """The stored rule (thresholds.json), or another threshold rule chosen on the run's val predictions."""
    path = run_dir / rundir.THRESHOLDS
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no {rundir.THRESHOLDS} (written by medpeft 0.1 before decision thresholds "
                          f"were stored); train the run again to predict with it")
    stored = rundir.read_json_object(path)
    if stored.get("rule") not in ("argmax", YOUDEN) or "thresholds" not in stored:
        raise RunDirError(f"{path}: expected a decision rule ('rule': argmax or {YOUDEN}, 'thresholds')")
    if stored["rule"] == "argmax" or rule == stored["rule"]:
        return stored["rule"], stored["thresholds"]
    parse_rule(rule)
    labels = list(config.data.labels)
    _, targets, probs = rundir.read_predictions(run_dir, "val", labels)
    return rule, select_thresholds(targets, probs, labels, rule)


def load_run(path, threshold: str = YOUDEN) -> Run:
    """Load a finished run directory (as written by `medpeft train`) for prediction, saliency or export.

    threshold: 'youden' (the rule stored with the run) or 'sensitivity:X', chosen on the run's
    validation predictions. Multiclass runs decide by arg-max."""
    run_dir = Path(path)
    config = rundir.finished_config(run_dir)
    built = load_model(run_dir, config)
    rule, thresholds = _decision_rule(run_dir, config, threshold)
    return Run(run_dir, config, built.model, built.spec, rule, thresholds)


def load_runs(paths, threshold: str = YOUDEN) -> list[Run]:
    """Several finished runs fine-tuned from one backbone checkpoint, sharing its frozen weights in memory:
    each run adds its own trained parameters (its adapter and head), not a backbone."""
    from medpeft.inference.shared import shared_models

    run_dirs = [Path(p) for p in paths]
    if len(run_dirs) == 1:
        return [load_run(run_dirs[0], threshold)]
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        raise ConfigError(f"--runs: two runs have the same folder name ({', '.join(names)}); the output's column "
                          f"groups are named by it")
    configs = [rundir.finished_config(run_dir) for run_dir in run_dirs]
    first = run_dirs[0]
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        if preprocessing(config) != preprocessing(configs[0]):
            raise ConfigError(f"{run_dir}: its preprocessing (img_size, mean, std) differs from {first}'s; "
                              f"runs in --runs must take the same input")
    runs = []
    for run_dir, config, built in zip(run_dirs, configs, shared_models(configs, run_dirs)):
        rule, thresholds = _decision_rule(run_dir, config, threshold)
        runs.append(Run(run_dir, config, built.model, built.spec, rule, thresholds))
    return runs


# ----------------------------------------------------------------------------- prediction
def predict(runs: list[Run], images, batch_size: int | None = None, strict: bool = False, workers: int = 0,
            progress: bool = False) -> pd.DataFrame:
    """Decode each image once and apply every run to it. One run: columns prob:<label>, pred:<label>;
    several: the same under '<run name>/'. With `strict`, an unreadable input raises DataError."""
    items = collect_inputs(images)
    accel.prepare_process(runs[0].config.train)
    device = resolve_device(runs[0].config.train.device)
    batch_size = batch_size or runs[0].config.train.eval_batch_size
    probs = [[] for _ in runs]
    errors = []
    console = Console(stderr=True, quiet=not progress)
    for run in runs:
        run.model.to(device)
    with progress_bar(console) as bar:
        task = bar.add_task("predicting", total=len(items))
        for x, batch_errors in read_batches(items, runs[0].transform(), runs[0].config.model.img_size, batch_size,
                                            workers):
            x = x.to(device)
            for run, out in zip(runs, probs):
                out.append(class_probabilities(run, x, device))
            errors += list(batch_errors)
            bar.advance(task, len(x))
    names = [input_name(item, i) for i, item in enumerate(items)]
    report_unreadable(names, errors, strict)
    ok = np.array([not e for e in errors], dtype=bool)
    frames = [pd.DataFrame({"input": names, "error": errors})]
    for run, out in zip(runs, probs):
        p = torch.cat(out).numpy() if out else np.zeros((0, len(run.labels)))
        non_finite = ok & ~np.isfinite(p).all(1)
        if non_finite.any():
            raise TrainingError(f"{run.path}: the model gives non-finite outputs for {names[non_finite.argmax()]} "
                                f"({non_finite.sum()} of {len(names)} images): its weights overflow in "
                                f"train.precision '{run.config.train.precision}'")
        p[~ok] = np.nan
        group = pd.concat([pd.DataFrame(p, columns=[f"prob:{label}" for label in run.labels]), run.decide(p)], axis=1)
        group.loc[~ok, [c for c in group.columns if c.startswith("pred")]] = None
        if len(runs) > 1:
            group.columns = [f"{run.name}/{c}" for c in group.columns]
        frames.append(group)
    return pd.concat(frames, axis=1)


@torch.no_grad()
def class_probabilities(run: Run, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, K) probabilities: sigmoid per label, softmax for a multiclass task; in the run's precision."""
    with autocast(device, run.config.train.precision):
        logits = run.model(x).float()
    return (logits.softmax(1) if run.config.data.task == "multiclass" else logits.sigmoid()).cpu()


def evaluate(run_dir: str | Path, split: str = "test") -> dict:
    """Metrics of a finished run's best weights on one split of its own data split (on every process of a
    launcher, each computing its share of the images)."""
    run_dir = Path(run_dir)
    config = rundir.finished_config(run_dir)
    built = load_model(run_dir, config)
    table = rundir.run_table(run_dir, config)
    with session(config.train) as (procs, device):
        metrics = evaluate_split(built.model.to(device), table, split, config, device, image_cache(table, config),
                                 procs=procs)
    if metrics is None:
        raise DataError(f"{run_dir}: the run's '{split}' split is empty")
    return metrics


def zero_shot(config: RunConfig, split: str = "test") -> dict:
    """Metrics, before any training, of a vision-language catalogue model's zero-shot classifier
    (``model.head_init: text``, see medpeft.backbones.text) on one split of the config's data split."""
    from medpeft.backbones import create_backbone
    from medpeft.backbones.text import install_text_head
    from medpeft.train.components import prepare_table

    if config.model.head_init != "text":
        raise ConfigError("zero-shot evaluation needs model.head_init: text")
    table = prepare_table(config, progress=True)
    torch.manual_seed(config.train.seed)
    model, _ = create_backbone(config.model, len(config.data.labels))
    install_text_head(model, config.model, list(config.data.labels), config.data.task == "multiclass")
    with session(config.train) as (procs, device):
        metrics = evaluate_split(model.to(device), table, split, config, device, image_cache(table, config),
                                 procs=procs)
    if metrics is None:
        raise DataError(f"{config.data.csv}: the '{split}' split is empty")
    return metrics

