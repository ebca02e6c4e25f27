"""A finished run put to use: probabilities and decisions for new images (PNG, JPEG, TIFF, DICOM),
several task runs on one shared backbone, saliency maps and a standalone export.

    run = medpeft.load_run("runs/nih-lora")
    table = run.predict(["scans/", "a.dcm"])      # one row per image: prob:<label>, pred:<label>
    run.explain(["a.dcm"], "saliency/")           # heatmap overlays for the labels called positive
    run.export("export/")                         # merged safetensors for timm, TorchScript, ONNX
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
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
from medpeft.data import read_dataset, read_split_dataset
from medpeft.data.dataset import build_transform
from medpeft.data.images import check_images
from medpeft.data.labels import match_labels
from medpeft.engine import rundir
from medpeft.engine.assemble import load_model
from medpeft.engine.evaluation import evaluate_split, prediction_rows, split_metrics, split_outputs, stored_temperatures
from medpeft.engine.loaders import image_cache
from medpeft.engine.runtime import autocast, resolve_device, session
from medpeft.errors import ConfigError, DataError, RunDirError, TrainingError
from medpeft.files import atomic_directory, write_json_atomic
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

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) calibrated probabilities of (..., K) logits: softmax over the labels for a multiclass task,
        else a sigmoid per label, of the logits divided by the run's temperatures."""
        if self.temperatures is not None:
            logits = logits / torch.tensor(self.temperatures, dtype=logits.dtype, device=logits.device)
        return logits.softmax(-1) if self.config.data.task == "multiclass" else logits.sigmoid()

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
    """(B, K) calibrated probabilities (`Run.probabilities`); the model runs in the run's precision."""
    with autocast(device, run.config.train.precision):
        logits = run.model(x).float()
    return run.probabilities(logits).cpu()


def evaluate(run_dir: str | Path, split: str | None = None, data=None, name: str | None = None,
             calibrated: bool = False, label_map: dict | None = None) -> dict:
    """Metrics of a finished run's best weights on its own data or on another dataset (external validation;
    `data`: a YAML file with a data section, a data-section mapping or a DataConfig), through the run's
    preprocessing. `split`: train, val, test or all (every image); default test of the run's own data, all
    of another dataset. The data's labels meet the run's through
    medpeft.data.labels.match_labels (`label_map` {run label: data label} first); a run label the data lack
    is reported under "absent", not scored. The metrics (classification_metrics, calibration raw and
    calibrated, subgroups) are written with the split's predictions to RUN/evaluations/NAME/ (NAME: `name`,
    default the split for the run's own data, the data file's stem, "-calibrated" added with `calibrated`),
    never over the run's own files. `calibrated`: the probabilities are temperature-scaled
    (calibration.json). On every process of a launcher, each computing its share of the images."""
    run_dir = Path(run_dir)
    split = split or ("test" if data is None else "all")
    if split not in ("train", "val", "test", "all"):
        raise ConfigError(f"split {split!r}: expected train, val, test or all")
    config = rundir.finished_config(run_dir)
    temperatures = _temperatures(run_dir, config)
    if calibrated and temperatures is None:
        raise RunDirError(f"{run_dir}: no {rundir.CALIBRATION} (trained before medpeft fitted temperature "
                          f"scaling); evaluate it without --calibrated")
    if data is None:
        if label_map:
            raise ConfigError("a label map applies to another dataset (--data)")
        eval_config, matched, source = config, {label: label for label in config.data.labels}, "run"
        table = rundir.run_table(run_dir, config)
    else:
        reading, eval_config, matched, source = external_config(config, data, label_map)
        table = check_images(read_dataset(reading) if split == "all" else read_split_dataset(reading), reading,
                             progress=True)
        table = table.rename(columns={theirs: ours for ours, theirs in matched.items() if theirs})
    if split == "all":
        table = table.assign(split="all")
    name = name or ((split if data is None else source) + "-calibrated" * calibrated)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ConfigError(f"evaluation name {name!r}: expected a folder name of letters, digits, '.', '_' and '-'")
    present = [k for k, label in enumerate(config.data.labels) if matched[label]]
    built = load_model(run_dir, config)
    with session(config.train) as (procs, device):
        outputs = split_outputs(built.model.to(device), table, split, eval_config, device,
                                image_cache(table, eval_config), procs)
    if outputs is None:
        raise DataError(f"{eval_config.data.csv}: the '{split}' split is empty")
    outputs = replace(outputs, logits=outputs.logits[:, present])
    if temperatures is not None and config.data.task != "multiclass":
        temperatures = [temperatures[k] for k in present]
    metrics = split_metrics(outputs, eval_config, temperatures, evidence=True, calibrated=calibrated)
    metrics["evaluation"] = {
        "name": name, "data": {"format": eval_config.data.format, "csv": eval_config.data.csv}, "split": split,
        "calibrated": calibrated, "label_map": matched,
        "absent": [label for label in config.data.labels if not matched[label]]}
    if procs.main:
        (run_dir / rundir.EVALUATIONS).mkdir(exist_ok=True)
        with atomic_directory(run_dir / rundir.EVALUATIONS / name) as out:
            write_json_atomic(out / rundir.METRICS, metrics)
            prediction_rows(outputs, eval_config, temperatures if calibrated else None).to_csv(
                out / rundir.PREDICTIONS, index=False)
    return metrics


def external_config(config: RunConfig, data, label_map: dict | None = None):
    """How to evaluate the run on another dataset: (the data section to read it with, under the data's own
    label names; the run's config over it, with the run's names of the labels the data have, and the run's
    mean and std (the model's preprocessing); {run label: data label or None}; the evaluation's default
    name). Without `labels`, the data's labels are those of its format that match the run's (any format's
    labels for a CSV: the run's names, or the label map's)."""
    from medpeft.config import DataConfig, build, read_yaml_mapping

    source = "external"
    if isinstance(data, DataConfig):
        data = data.to_dict()
    elif not isinstance(data, dict):
        path, source = Path(data), Path(data).stem
        data = read_yaml_mapping(path, "data config", "a mapping with a data section").get("data")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: config section 'data' is required (a mapping: format, csv, ...)")
    run_labels = list(config.data.labels)
    unknown = sorted(set(label_map or {}) - set(run_labels))
    if unknown:
        raise ConfigError(f"label map: the run has no label {unknown[0]!r} (its labels: {', '.join(run_labels)})")
    given = list(data.get("labels") or [])
    probe = build(DataConfig, {**data, "labels": given})
    known = probe.known_labels()
    candidates = given or (list(known) if known is not None else run_labels + list((label_map or {}).values()))
    try:
        matched = match_labels(run_labels, candidates, label_map)
    except ValueError as e:
        raise ConfigError(f"{probe.csv}: {e}") from None
    wrong = [theirs for theirs in matched.values() if theirs and theirs not in candidates]
    if wrong:
        raise ConfigError(f"label map: the data have no label {wrong[0]!r} (their labels: {', '.join(candidates)})")
    missing = [label for label, theirs in matched.items() if not theirs]
    if config.data.task == "multiclass" and missing:
        raise ConfigError(f"{probe.csv}: the data have no class {missing[0]!r} of this multiclass run")
    if len(missing) == len(run_labels):
        raise ConfigError(f"{probe.csv}: none of the run's labels ({', '.join(run_labels)}) is among the data's "
                          f"({', '.join(candidates)}); map them with --map RUN_LABEL=DATA_LABEL")
    reading = build(DataConfig, {**data, "labels": [theirs for theirs in matched.values() if theirs],
                                 "mean": list(config.data.mean), "std": list(config.data.std)})
    scored = copy.copy(reading)
    scored.labels = [ours for ours, theirs in matched.items() if theirs]  # the columns once renamed to the run's
    return reading, replace(config, data=scored), matched, source


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

