"""A finished run put to use: probabilities and decisions for new images (PNG, JPEG, TIFF, DICOM),
optionally with test-time augmentation (medpeft.inference.tta), several task runs on one shared backbone,
saliency maps and a standalone export. Evaluation: medpeft.inference.evaluation; ensembles of runs:
medpeft.inference.ensemble; thresholds re-fitted on a target site's sample: medpeft.inference.target.

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
from scipy.special import expit, logit
from torch import nn

from medpeft import accel
from medpeft.config import RunConfig
from medpeft.console import progress_bar
from medpeft.data.dataset import build_transform
from medpeft.engine import rundir
from medpeft.engine.assemble import load_model
from medpeft.engine.evaluation import stored_temperatures
from medpeft.engine.runtime import resolve_device
from medpeft.errors import ConfigError, RunDirError, TrainingError
from medpeft.inference.inputs import collect_inputs, input_name, read_batches, report_unreadable
from medpeft.inference.tta import view_logits
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
    """{label: threshold on `probabilities`' scale, None where val had one class}; None for arg-max."""
    temperatures: list[float] | None = None
    """Temperature scaling fitted on val (calibration.json; one per label, one for a multiclass task), applied
    by `probabilities`; None for a run trained before medpeft stored it (raw probabilities)."""

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

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) logits divided by the run's temperatures (unchanged without them)."""
        if self.temperatures is None:
            return logits
        return logits / torch.tensor(self.temperatures, dtype=logits.dtype, device=logits.device)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) calibrated probabilities of (..., K) logits: softmax over the labels for a multiclass task,
        else a sigmoid per label, of the logits divided by the run's temperatures."""
        logits = self.scaled(logits)
        return logits.softmax(-1) if self.config.data.task == "multiclass" else logits.sigmoid()

    def decide(self, probs: np.ndarray) -> pd.DataFrame:
        """Decision columns for (N, K) probabilities: pred:<label> 0/1, or pred = the arg-max label."""
        return decisions(self.labels, self.thresholds, probs)

    def logits(self, x: torch.Tensor, tta=False) -> torch.Tensor:
        """(B, K) float32 logits of a batch of model inputs in the run's precision, averaged over the test-time
        views (`tta`: False, the image itself; True, the run's medpeft.inference.tta.tta_views; or a list of
        views)."""
        return view_logits(self.model, self.config, x, tta)

    @property
    def members(self) -> list[Run]:
        """The runs whose `logits` `combine` takes: this one (an Ensemble has several)."""
        return [self]

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """`probabilities` of the one member's logits."""
        return self.probabilities(logits[0])

    def predict(self, images, batch_size: int | None = None, strict: bool = False, workers: int = 0,
                progress: bool = False, tta=False) -> pd.DataFrame:
        """One row per image: input, error ('' when read), prob:<label>..., pred:<label>... (or pred)."""
        return predict([self], images, batch_size=batch_size, strict=strict, workers=workers, progress=progress,
                       tta=tta)

    def explain(self, images, out_dir, labels: list[str] | None = None) -> pd.DataFrame:
        """Saliency overlays (PNG) per image and per label called positive (or `labels`), see medpeft.inference.saliency."""
        from medpeft.inference.saliency import explain

        return explain(self, images, out_dir, labels)

    def export(self, out_dir) -> dict:
        """A standalone model (merged safetensors loadable by timm, TorchScript, ONNX), see medpeft.inference.export."""
        from medpeft.inference.export import export

        return export(self, out_dir)


def decisions(labels: list[str], thresholds: dict | None, probs: np.ndarray) -> pd.DataFrame:
    """Decision columns for (N, K) probabilities: pred:<label> 0/1 (probability >= the label's threshold;
    None where it has none), or with no thresholds pred = the arg-max label."""
    if thresholds is None:
        return pd.DataFrame({"pred": np.asarray(labels)[probs.argmax(1)]})
    return pd.DataFrame({
        f"pred:{label}": pd.array(np.where(probs[:, k] >= t, 1, 0) if t is not None else [None] * len(probs),
                                  dtype="Int64")
        for k, (label, t) in enumerate(thresholds.items())})


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


def _temperatures(run_dir: Path, config: RunConfig) -> list[float] | None:
    """The run's temperature scaling (calibration.json), in label order; None for a run without one."""
    path = run_dir / rundir.CALIBRATION
    if not path.is_file():
        return None
    labels = list(config.data.labels)
    try:
        return stored_temperatures(rundir.read_json_object(path), labels, config.data.task)
    except (KeyError, TypeError, ValueError):
        raise RunDirError(f"{path}: expected 'temperatures' for the labels {labels}") from None


def _load(run_dir: Path, config: RunConfig, built, threshold: str) -> Run:
    """The Run, its thresholds moved onto the calibrated probabilities' scale, t -> sigmoid(logit(t) / T):
    the same decisions."""
    rule, thresholds = _decision_rule(run_dir, config, threshold)
    temperatures = _temperatures(run_dir, config)
    if temperatures is not None and thresholds is not None:
        with np.errstate(divide="ignore"):
            thresholds = {label: None if t is None else float(expit(logit(t) / temperature))
                          for (label, t), temperature in zip(thresholds.items(), temperatures)}
    return Run(run_dir, config, built.model, built.spec, rule, thresholds, temperatures)


def load_run(path, threshold: str = YOUDEN) -> Run:
    """Load a finished run directory (as written by `medpeft train`) for prediction, saliency or export.

    threshold: 'youden' (the rule stored with the run) or 'sensitivity:X', chosen on the run's
    validation predictions. Multiclass runs decide by arg-max."""
    run_dir = Path(path)
    config = rundir.finished_config(run_dir)
    return _load(run_dir, config, load_model(run_dir, config), threshold)


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
    return [_load(run_dir, config, built, threshold)
            for run_dir, config, built in zip(run_dirs, configs, shared_models(configs, run_dirs))]


# ----------------------------------------------------------------------------- prediction
def predict(predictors: list, images, batch_size: int | None = None, strict: bool = False, workers: int = 0,
            progress: bool = False, tta=False) -> pd.DataFrame:
    """Decode each image once and apply every predictor to it: a Run, or an Ensemble of runs on one backbone
    (medpeft.inference.ensemble). One run: columns prob:<label>, pred:<label>; several predictors, or an
    ensemble: the same under '<name>/'. `tta`: each run's logits averaged over test-time views (`Run.logits`).
    With `strict`, an unreadable input raises DataError."""
    items = collect_inputs(images)
    runs = [run for predictor in predictors for run in predictor.members]
    accel.prepare_process(runs[0].config.train)
    device = resolve_device(runs[0].config.train.device)
    batch_size = batch_size or runs[0].config.train.eval_batch_size
    logits = [[] for _ in runs]
    errors = []
    console = Console(stderr=True, quiet=not progress)
    for run in runs:
        run.model.to(device)
    with progress_bar(console) as bar:
        task = bar.add_task("predicting", total=len(items))
        for x, batch_errors in read_batches(items, runs[0].transform(), runs[0].config.model.img_size, batch_size,
                                            workers):
            x = x.to(device)
            for run, out in zip(runs, logits):
                out.append(run.logits(x, tta).cpu())
            errors += list(batch_errors)
            bar.advance(task, len(x))
    names = [input_name(item, i) for i, item in enumerate(items)]
    report_unreadable(names, errors, strict)
    ok = np.array([not e for e in errors], dtype=bool)
    logits = [torch.cat(out) if out else torch.zeros(0, len(run.labels)) for run, out in zip(runs, logits)]
    for run, z in zip(runs, logits):
        non_finite = ok & ~np.isfinite(run.probabilities(z).numpy()).all(1)
        if non_finite.any():
            raise TrainingError(f"{run.path}: the model gives non-finite outputs for {names[non_finite.argmax()]} "
                                f"({non_finite.sum()} of {len(names)} images): its weights overflow in "
                                f"train.precision '{run.config.train.precision}'")
    frames, members = [pd.DataFrame({"input": names, "error": errors})], iter(logits)
    for predictor in predictors:
        p = predictor.combine([next(members) for _ in predictor.members]).numpy()
        p[~ok] = np.nan
        group = pd.concat([pd.DataFrame(p, columns=[f"prob:{label}" for label in predictor.labels]),
                           predictor.decide(p)], axis=1)
        group.loc[~ok, [c for c in group.columns if c.startswith("pred")]] = None
        group.columns = [column_prefix(predictor, len(predictors) > 1) + c for c in group.columns]
        frames.append(group)
    return pd.concat(frames, axis=1)


def column_prefix(predictor, several: bool) -> str:
    """Where `predict` puts a predictor's columns: '' for one run predicting alone, else '<name>/' (each of
    several predictors, an ensemble)."""
    return f"{predictor.name}/" if several or not isinstance(predictor, Run) else ""
