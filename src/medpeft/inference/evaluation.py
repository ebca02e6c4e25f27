"""A finished run's metrics on its own split or on another dataset (external validation), optionally with
test-time augmentation or as an ensemble with other runs of its task; a vision-language model's zero-shot
metrics before any training."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from medpeft.config import RunConfig
from medpeft.data import read_dataset, read_split_dataset
from medpeft.data.images import check_images
from medpeft.data.labels import match_labels
from medpeft.engine import rundir
from medpeft.engine.assemble import load_model
from medpeft.engine.evaluation import evaluate_split, prediction_rows, split_metrics, split_outputs
from medpeft.engine.loaders import image_cache
from medpeft.engine.runtime import session
from medpeft.errors import ConfigError, DataError, RunDirError
from medpeft.files import atomic_directory, write_json_atomic
from medpeft.inference.ensemble import load_ensemble
from medpeft.inference.run import _temperatures
from medpeft.inference.tta import tta_record, view_logits


def evaluate(run_dir: str | Path, split: str | None = None, data=None, name: str | None = None,
             calibrated: bool = False, label_map: dict | None = None, tta=False, ensemble_with=None) -> dict:
    """Metrics of a finished run's best weights on its own data or on another dataset (external validation;
    `data`: a YAML file with a data section, a data-section mapping or a DataConfig), through the run's
    preprocessing. `split`: train, val, test or all (every image); default test of the run's own data, all
    of another dataset. The data's labels meet the run's through
    medpeft.data.labels.match_labels (`label_map` {run label: data label} first); a run label the data lack
    is reported under "absent", not scored. The metrics (classification_metrics, calibration raw and
    calibrated, subgroups) are written with the split's predictions to RUN/evaluations/NAME/ (NAME: `name`,
    default the split for the run's own data, the data file's stem, then "-ensemble", "-tta" and "-calibrated"
    as they apply), never over the run's own files. `calibrated`: the probabilities are temperature-scaled
    (calibration.json). `tta`: the logits averaged over test-time views (medpeft.inference.tta; True: the
    run's own views). `ensemble_with`: other run directories of the same task, backbone and split
    (medpeft.inference.ensemble): the ensemble's probabilities, the mean of the runs' calibrated ones, are
    scored (as "raw": they are calibrated already, `calibrated` does not apply). The evaluation block
    records both. On every process of a launcher, each computing its share of the images."""
    run_dir = Path(run_dir)
    split = split or ("test" if data is None else "all")
    if split not in ("train", "val", "test", "all"):
        raise ConfigError(f"split {split!r}: expected train, val, test or all")
    config = rundir.finished_config(run_dir)
    temperatures = _temperatures(run_dir, config)
    if calibrated and ensemble_with:
        raise ConfigError("--calibrated: an ensemble averages its runs' temperature-scaled probabilities already")
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
    name = name or ((split if data is None else source) + "-ensemble" * bool(ensemble_with) + "-tta" * bool(tta)
                    + "-calibrated" * calibrated)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ConfigError(f"evaluation name {name!r}: expected a folder name of letters, digits, '.', '_' and '-'")
    present = [k for k, label in enumerate(config.data.labels) if matched[label]]
    scorer, runs = _scorer(run_dir, config, tta, ensemble_with)
    views = tta_record(runs, tta)  # a run without views is refused before the images go through the model
    if ensemble_with:
        temperatures = None
    with session(config.train) as (procs, device):
        outputs = split_outputs(scorer.to(device), table, split, eval_config, device,
                                image_cache(table, eval_config), procs)
    if outputs is None:
        raise DataError(f"{eval_config.data.csv}: the '{split}' split is empty")
    outputs = replace(outputs, logits=outputs.logits[:, present])
    if temperatures is not None and config.data.task != "multiclass":
        temperatures = [temperatures[k] for k in present]
    metrics = split_metrics(outputs, eval_config, temperatures, evidence=True, calibrated=calibrated)
    metrics["evaluation"] = {
        "name": name, "data": {"format": eval_config.data.format, "csv": eval_config.data.csv}, "split": split,
        "calibrated": calibrated, "label_map": matched, "tta": views,
        "ensemble": [config.output_dir for config in runs.values()] if ensemble_with else None,
        "absent": [label for label in config.data.labels if not matched[label]]}
    if procs.main:
        (run_dir / rundir.EVALUATIONS).mkdir(exist_ok=True)
        with atomic_directory(run_dir / rundir.EVALUATIONS / name) as out:
            write_json_atomic(out / rundir.METRICS, metrics)
            prediction_rows(outputs, eval_config, temperatures if calibrated else None).to_csv(
                out / rundir.PREDICTIONS, index=False)
    return metrics


class _Scorer(nn.Module):
    """What an evaluation scores as logits: a function of the input batch over the runs' models (held here so
    that moving this module moves them)."""

    def __init__(self, models: list[nn.Module], logits):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def _scorer(run_dir: Path, config: RunConfig, tta, ensemble_with) -> tuple[_Scorer, dict]:
    """The scored logits (the run's, averaged over the `tta` views; or the ensemble's with `ensemble_with`,
    see Ensemble.mean_logits) and {run name: its config, with the run directory as output_dir}."""
    if not ensemble_with:
        model = load_model(run_dir, config).model
        return _Scorer([model], lambda x: view_logits(model, config, x, tta)), {run_dir.name: config}
    ensemble = load_ensemble([run_dir, *ensemble_with])
    runs = ensemble.runs
    return (_Scorer([run.model for run in runs],
                    lambda x: ensemble.mean_logits([run.logits(x, tta) for run in runs]).float()),
            {run.name: run.config for run in runs})


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

