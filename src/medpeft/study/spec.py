"""A study file: a grid of backbones x datasets x methods x label fractions x seeds over one base run config.

.. code-block:: yaml

    name: kermany-small
    base:                        # a run config without output_dir, shared by every cell
      model: {name: vit_small_patch16_224, weights: random, img_size: 64}
      data: {csv: labels.csv, labels: [pneumonia]}
      train: {epochs: 10}
    axes:
      backbone: {scratch: {}}    # level name -> a partial run config merged into the cell's config
      dataset: {pneumonia: {}}
      method:                    # the level's `method` replaces base's; its name defaults to the level's
        full: {train: {lr: 1.0e-4}}
        lora: {method: {r: 8}}
        lora-qv: {method: {name: lora, targets: [q, v]}}
      fraction: [0.01, 0.1, 1.0] # sets data.split.label_fraction
      seed: [0, 1, 2]            # sets train.seed (the split stays the same, so seeds are paired)
    overrides:                   # per-cell settings, applied in order to the cells that match `where`
      - where: {method: lora, fraction: 0.01}
        set: {method.r: 4, train.epochs: 100}
    report: {correction: holm, alpha: 0.05, stratify: true}   # how the report tests (ReportOptions)
    external:                    # per dataset level: an external test set each of its cells is evaluated on
      pneumonia: {data: {format: csv, csv: other-hospital.csv, labels: [pneumonia]}, split: all}
    tune: {trials: 20, space: {train.epochs: null}}   # search each task's hyperparameters first (medpeft tune)

A **generative study** has a ``generate`` section: its base and levels are then a ``medpeft generate train``
config (medpeft.generate.config; the method axis names generative methods), and each cell, once trained,
is measured by ``medpeft generate evaluate`` with the section's settings (StudyEvaluation: the extractor
run, n, steps, guidance, seed), which the cells' config hash covers; ``tune`` and ``external`` are then
refused (they score classifiers).

.. code-block:: yaml

    name: kermany-generate
    base: {model: {source: runs/foundation}, data: {csv: labels.csv, labels: [normal, bacteria, virus]},
           train: {epochs: 3, precision: bf16}}
    axes: {method: {full: {train: {lr: 2.0e-4}}, bias: {}, lora: {method: {r: 8}}}, seed: [0, 1]}
    generate: {extractor: runs/kermany-judge, n: 300, steps: 20, guidance: 3.0}

Every axis is optional (one level, ``default``, when absent; without a method axis, base's method is
the one level, named after it). String values may use environment
variables (``${NIH_ROOT}/Data_Entry_2017.csv``). An ``external`` entry's data section is any reader's
(its labels meet the run's by name, medpeft.data.labels) and its split one of all (default), train, val,
test. With ``tune``, each task (backbone, dataset, method, fraction) is searched with its first seed's
config (medpeft.train.tune: ``trials``; ``space`` changes every method's own space, so a key set there
must be a key of each method's config; a key set to null is dropped where it is), and every seed of the
task trains with the best values (medpeft.study.runner); the space is checked when the study is read.
Every cell is validated as a run config when the study is read, and ``medpeft study run`` builds each
cell's model on the meta device before the first cell trains, so a typo or a method that does not fit
its backbone fails before any training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from medpeft.config import (
    DataConfig, Section, build, config_from_dict, explicit, merge_dicts, option, read_yaml_mapping,
)
from medpeft.errors import ConfigError
from medpeft.generate.config import load_generate_config
from medpeft.train.tune import TuneOptions, resolve_space

AXES = ("backbone", "dataset", "method", "fraction", "seed")
NAMED_AXES = ("backbone", "dataset", "method")
MAX_LEVEL_NAME_BYTES = 64
"""A level name is part of a cell's key, which names files and folders (at most 255 bytes each)."""
EXTERNAL_SPLITS = ("all", "train", "val", "test")


@dataclass(frozen=True)
class Cell:
    backbone: str
    dataset: str
    method: str
    fraction: float
    seed: int
    config: dict
    """The cell's full run config (plain data, validated), output_dir excluded; with `tune`, before tuning."""
    tune: dict | None = None
    """The study's search ({trials, space}) when its values replace the config's (see medpeft.study.runner)."""
    explicit: dict = field(default_factory=dict)
    """The config's values that differ from medpeft's defaults (medpeft.config.explicit): what the config hash
    covers, so that an option new in medpeft, at its default, does not change a study's cells."""

    @property
    def key(self) -> str:
        """A unique, filesystem-safe name: the run directory and the store's primary key."""
        return f"{self.tune_key}__s{self.seed}"

    @property
    def tune_key(self) -> str:
        """The name of the cell's search: every seed of a task shares it."""
        return tune_key(self.backbone, self.dataset, self.method, self.fraction)

    @property
    def config_hash(self) -> str:
        return config_hash(self.explicit, self.tune)

    @property
    def task(self) -> tuple:
        """What a comparison holds fixed: everything but the method and the seed."""
        return self.backbone, self.dataset, self.fraction


def config_hash(config: dict, tune: dict | None) -> str:
    """16 hex digits of the SHA-256 of a cell's config (and its study's search)."""
    hashed = config if tune is None else {"config": config, "tune": tune}
    return hashlib.sha256(yaml.safe_dump(hashed, sort_keys=True).encode()).hexdigest()[:16]


def tune_key(backbone: str, dataset: str, method: str, fraction: float) -> str:
    """A task's name: its search's folder (STUDY/tune/KEY) and the start of its cells' keys."""
    return f"{backbone}__{dataset}__{method}__f{fraction:g}"


@dataclass
class ReportOptions(Section):
    """How the report tests its pairwise comparisons (the study file's ``report`` section)."""

    path = "report"
    correction: Literal["holm", "bh"] = option(
        "holm", "Adjustment of the p-values across the whole pairwise table: 'holm' (Holm's step-down, family-wise "
        "error) or 'bh' (Benjamini-Hochberg, false discovery rate).")
    alpha: float = option(0.05, "Significance level of the verdicts and of DeLong's tests; the bootstrap intervals "
                          "are 1 - alpha.", gt=0, lt=0.5)
    stratify: bool = option(True, "Resample the test images within strata (each image's rarest positive label), so "
                            "that every label keeps its class counts in the resamples.")


@dataclass
class StudyEvaluation(Section):
    """How a generative study measures each cell (the study file's ``generate`` section): the arguments of
    ``medpeft generate evaluate``."""

    path = "generate"
    extractor: str = option("", "A finished classification run or MAE pretraining run on this kind of image: "
                            "the features of FID, KID, precision / recall and memorisation (and the label scores "
                            "of label fidelity).", required=True)
    n: int | None = option(None, "Generate for n test images (drawn with seed); None: all.", ge=2)
    steps: int = option(50, "Denoising steps (DDIM).", ge=1)
    guidance: float = option(7.5, "Classifier-free guidance scale.", ge=1.0)
    seed: int = option(0, "Seed of the test images drawn and of the first batch's noise.")

    def validate(self) -> None:
        if not Path(self.extractor).is_dir():
            raise ConfigError(f"generate.extractor {self.extractor!r}: no such run directory")


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    cells: list[Cell]
    report: ReportOptions = field(default_factory=ReportOptions)
    external: dict[str, dict] = field(default_factory=dict)
    """{dataset level: {"data": a data section, "split": one of EXTERNAL_SPLITS}}."""
    tune: TuneOptions | None = None
    generate: StudyEvaluation | None = None
    """A generative study's evaluation (None: a classification study)."""


def _tune_options(path: Path, tune) -> TuneOptions | None:
    """The study's ``tune`` section (None when absent); its trials are required."""
    if tune is None:
        return None
    try:
        options = build(TuneOptions, tune)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if options.trials is None:
        raise ConfigError(f"{path}: tune.trials is required: the trials of each task's search")
    return options


def _evaluation(path: Path, data: dict) -> StudyEvaluation | None:
    """A generative study's ``generate`` section (None when absent); such a study has no tune or external."""
    if data.get("generate") is None:
        return None
    for key in ("tune", "external"):
        if data.get(key) is not None:
            raise ConfigError(f"{path}: {key} does not apply to a generative study (it scores classifiers)")
    try:
        return build(StudyEvaluation, data["generate"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _validated(config: dict, generate: StudyEvaluation | None):
    """A cell's config as the run config it is (a generate config in a generative study), output_dir '-'."""
    config = {**config, "output_dir": "-"}
    return config_from_dict(config) if generate is None else load_generate_config(base=config)


def report_options(path: Path, data: dict) -> ReportOptions:
    """The ``report`` section of a study file's mapping `data` (defaults when absent)."""
    try:
        return build(ReportOptions, data.get("report"))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _external(path: Path, external, datasets: dict) -> dict[str, dict]:
    """The study's external test sets per dataset level, each data section validated (not read)."""
    if not isinstance(external, dict):
        raise ConfigError(f"{path}: external must be a mapping of dataset level -> {{data: ..., split: ...}}")
    for level, entry in external.items():
        where = f"{path}: external.{level}"
        if level not in datasets:
            raise ConfigError(f"{where}: not a level of axes.dataset (its levels: {', '.join(map(str, datasets))})")
        if not (isinstance(entry, dict) and isinstance(entry.get("data"), dict) and set(entry) <= {"data", "split"}):
            raise ConfigError(f"{where} must be {{data: <a data section>, split: {' | '.join(EXTERNAL_SPLITS)}}}")
        if entry.get("split", "all") not in EXTERNAL_SPLITS:
            raise ConfigError(f"{where}.split must be one of {', '.join(EXTERNAL_SPLITS)}, got {entry['split']!r}")
        try:
            build(DataConfig, entry["data"])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return {level: {"data": entry["data"], "split": entry.get("split", "all")} for level, entry in external.items()}


def _expand_env(value):
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def _levels(path: Path, axes: dict, axis: str) -> dict:
    levels = axes.get(axis, {"default": {}} if axis in NAMED_AXES else None)
    if axis in NAMED_AXES:
        if not isinstance(levels, dict) or not levels:
            raise ConfigError(f"{path}: axes.{axis} must be a non-empty mapping of level name -> config")
        for name, overrides in levels.items():
            if not (isinstance(name, str) and name.isprintable() and "__" not in name and "/" not in name
                    and 0 < len(name.encode()) <= MAX_LEVEL_NAME_BYTES):
                text = str(name)
                shown = f"{text[:MAX_LEVEL_NAME_BYTES]!r}..." if len(text) > MAX_LEVEL_NAME_BYTES else repr(name)
                raise ConfigError(f"{path}: axes.{axis} level {shown} must be a name of 1 to {MAX_LEVEL_NAME_BYTES} "
                                  f"bytes of printable characters without '__' or '/'")
            if not isinstance(overrides, dict | type(None)):
                raise ConfigError(f"{path}: axes.{axis}.{name} must be a mapping (a partial run config)")
        return {name: overrides or {} for name, overrides in levels.items()}
    if levels is None:
        return {1.0: {}} if axis == "fraction" else {0: {}}
    if not isinstance(levels, list) or not levels:
        raise ConfigError(f"{path}: axes.{axis} must be a non-empty list")
    if axis == "fraction":  # the range is the run config's rule (data.split.label_fraction)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in levels):
            raise ConfigError(f"{path}: axes.fraction must be numbers, got {levels}")
        return {float(v): {"data": {"split": {"label_fraction": float(v)}}} for v in levels}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in levels):
        raise ConfigError(f"{path}: axes.seed must be integers, got {levels}")
    return {v: {"train": {"seed": v}} for v in levels}


def _nest(dotted: dict) -> dict:
    """``{'method.r': 4}`` -> ``{'method': {'r': 4}}``."""
    nested: dict = {}
    for key, value in dotted.items():
        *parents, last = str(key).split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def _matches(where: dict, coordinates: dict) -> bool:
    return all(coordinates[axis] == (float(v) if axis == "fraction" else v) for axis, v in where.items())


def load_study(path: str | Path) -> Study:
    """Read, expand and validate a study file."""
    path = Path(path)
    data = read_yaml_mapping(path, "study file", "a mapping with name, base, axes, overrides")
    unknown = sorted(set(data) - {"name", "base", "axes", "overrides", "report", "external", "tune", "generate"})
    if unknown:
        raise ConfigError(f"{path}: study key '{unknown[0]}' does not exist (expected name, base, axes, overrides, "
                          f"report, external, tune, generate)")
    data = _expand_env(data)
    report, tune = report_options(path, data), _tune_options(path, data.get("tune"))
    generate = _evaluation(path, data)
    axes = data.get("axes") or {}
    if not isinstance(axes, dict) or set(axes) - set(AXES):
        raise ConfigError(f"{path}: axes must be a mapping with keys among {', '.join(AXES)}")
    base = data.get("base") or {}
    if not isinstance(base, dict) or "output_dir" in base:
        raise ConfigError(f"{path}: base must be a run config without output_dir (the study places each run)")
    overrides = data.get("overrides") or []
    for i, rule in enumerate(overrides):
        if not (isinstance(rule, dict) and set(rule) == {"where", "set"} and isinstance(rule["where"], dict)
                and set(rule["where"]) <= set(AXES) and isinstance(rule["set"], dict)):
            raise ConfigError(f"{path}: overrides[{i}] must be {{where: {{axis: level, ...}}, set: {{key: value}}}} "
                              f"with axes among {', '.join(AXES)}")
    levels = {axis: _levels(path, axes, axis) for axis in AXES}
    method_axis = "method" in axes
    if not method_axis and isinstance(base.get("method"), dict) and isinstance(base["method"].get("name"), str):
        levels["method"] = {base["method"]["name"]: {}}  # base's method, named as itself in the report
    for i, rule in enumerate(overrides):
        for axis, value in rule["where"].items():
            if (float(value) if axis == "fraction" else value) not in levels[axis]:
                raise ConfigError(f"{path}: overrides[{i}].where.{axis}: {value!r} is not a level of that axis")

    cells = []
    for combination in itertools.product(*(levels[axis].items() for axis in AXES)):
        coordinates = {axis: level for axis, (level, _) in zip(AXES, combination)}
        config = base
        for axis, (level, partial) in zip(AXES, combination):
            if axis == "method" and method_axis:  # the level's method replaces base's; named as the level
                config = {**config, "method": {"name": level, **(partial.get("method") or {})}}
                partial = {k: v for k, v in partial.items() if k != "method"}
            config = merge_dicts(config, partial)
        for rule in overrides:
            if _matches(rule["where"], coordinates):
                config = merge_dicts(config, _nest(rule["set"]))
        where = ", ".join(f"{axis}={level}" for axis, level in coordinates.items())
        try:
            run_config = _validated(config, generate)
            if tune is not None and coordinates["seed"] == next(iter(levels["seed"])):  # the task's search
                resolve_space(run_config, tune.space)
        except ConfigError as e:
            raise ConfigError(f"{path}: cell ({where}): {e}") from None
        resolved, settings = run_config.to_dict(), explicit(run_config)
        del resolved["output_dir"], settings["output_dir"]
        if generate is not None:  # the cell's numbers depend on how it is measured
            settings["generate"] = dataclasses.asdict(generate)
        cells.append(Cell(**coordinates, config=resolved, tune=tune and dataclasses.asdict(tune), explicit=settings))
    return Study(name=str(data.get("name") or path.stem), path=path, cells=cells, report=report,
                 external=_external(path, data.get("external") or {}, levels["dataset"]), tune=tune,
                 generate=generate)
