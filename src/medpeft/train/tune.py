"""``medpeft tune``: a hyperparameter search over a run config with Optuna, every trial an ordinary run.

Layout of a tune directory::

    tune.sqlite    the Optuna storage (study "tune"): each trial's params, state and per-epoch val AUROC
    trials/NNNN/   each trial's run directory (NNNN: the number of the trial that started it)
    best.yaml      the config with the best trial's values and output_dir OUT/best: ``medpeft train`` runs it
    tune.json      the space, every trial (number, params, state, value: a pruned trial's is its last
                   report, Optuna's rule), the default and the best trial, and best - default (both
                   complete); best.yaml and tune.json are written at the end, atomically

The search space is the method's (``default_space``: train.lr in the method's ``lr_range``, weight decay,
epochs around the config's, and the method config's ``search_space``), changed by the user's entries
(``resolve_space``). Trial 0 is the config as given, its values enqueued, so tuned and default are two
trials of one search on one val split; the config's values must therefore be points of the space. Then
TPE samples (its first TPE_STARTUP_TRIALS at random), seeded by train.seed and the number of finished
trials: the same seed samples the same params. After each epoch's validation a trial reports its val
mean AUROC, and the median rule prunes it when it is below the median of the completed trials at that
epoch (once PRUNE_STARTUP_TRIALS have completed; from its epoch PRUNE_WARMUP_EPOCHS + 1 on, never after its
last); a trial whose training diverges (TrainingError) is pruned too, its error kept. A trial's value is
its run's val mean AUROC at its best epoch: test is never looked at. `trials` counts the trials that
completed or were pruned.

A search that is killed, interrupted or stopped by an error leaves its trial RUNNING in the storage.
Started again in the same folder, it marks that trial failed and queues its params again with its run
directory, whose run resumes from its last epoch checkpoint (the normal train resume): finished trials
never run again. Another config or space in the same folder is refused (a hash of both is kept in the
storage), and the folder's lock refuses a second search at once. Trials run one after another in this
process: tuning a DDP run is not supported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from medpeft.config import (RunConfig, Section, build, config_from_dict, dump_config, load_config, merge_dicts,
                            option, read_yaml_mapping)
from medpeft.config.schema import check_value
from medpeft.engine import rundir
from medpeft.errors import ConfigError, RunDirError, TrainingError
from medpeft.files import LOCK, locked, write_json_atomic, write_text_atomic
from medpeft.train.recipe import train

STORAGE = "tune.sqlite"
TRIALS = "trials"
BEST = "best.yaml"
SUMMARY = "tune.json"
TPE_STARTUP_TRIALS = 5
PRUNE_STARTUP_TRIALS = 2
PRUNE_WARMUP_EPOCHS = 1
KINDS = ("float", "int", "categorical")
SPEC_FORMAT = "[float|int, low, high(, log)] or [categorical, [choices]]"


@dataclass
class TuneOptions(Section):
    """A search as a file states it: the ``tune`` section of a study file, or of a config file for
    ``medpeft tune`` (which reads it; a training run refuses it by name)."""

    path = "tune"
    trials: int | None = option(None, "Trials to complete or prune.", gt=0)
    space: dict[str, Any] = option({}, f"Changes to the method's search space: KEY: {SPEC_FORMAT} adds or "
                                   f"replaces a key, KEY: null drops it.")


def load_tune_config(path: str | Path, overrides: list[str] = ()) -> tuple[RunConfig, TuneOptions]:
    """A config file for ``medpeft tune``: the run config (output_dir optional) and its ``tune`` section."""
    data = read_yaml_mapping(path, "config file", "a mapping of sections")
    try:
        options = build(TuneOptions, data.pop("tune", None))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return load_config(None, overrides, base={"output_dir": "-", **data}), options


def parse_space(items: list[str]) -> dict:
    """``['method.r=[categorical, [4, 8]]', 'train.epochs=null']`` -> space changes (values read as YAML)."""
    changes = {}
    for item in items:
        key, sep, raw = item.partition("=")
        try:
            changes[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            sep = ""
        if not (sep and key.strip()):
            raise ConfigError(f"--space {item!r} must be KEY={SPEC_FORMAT} or KEY=null")
    return changes


def default_space(config: RunConfig) -> dict:
    """The method's search space: train.lr in its lr_range (log), train.weight_decay, train.epochs from half
    to twice the config's, and the method config's own search_space."""
    epochs = config.train.epochs
    return {"train.lr": ("float", *config.method.lr_range, True), "train.weight_decay": ("float", 0.0, 0.3),
            "train.epochs": ("int", max(1, epochs // 2), 2 * epochs), **config.method.search_space}


def resolve_space(config: RunConfig, changes: dict | None = None) -> dict[str, list]:
    """The method's space with `changes` (KEY: spec adds or replaces, KEY: None drops), each entry checked
    against `config` (a config key, ordered bounds, each bound or choice a valid value of the key, the
    config's value inside) as ``[kind, low, high, log]`` or ``["categorical", [choices]]``."""
    space = {**default_space(config), **(changes or {})}
    checked = {str(key): _check_entry(config, str(key), spec) for key, spec in space.items() if spec is not None}
    if not checked:
        raise ConfigError("the tune space is empty: give at least one key to search")
    return checked


def _check_entry(config: RunConfig, key: str, spec) -> list:
    where = f"tune space '{key}'"
    kind = spec[0] if isinstance(spec, list | tuple) and spec else None
    if kind not in KINDS or len(spec) not in ((2,) if kind == "categorical" else (3, 4)):
        raise ConfigError(f"{where} must be {SPEC_FORMAT}, got {spec!r}")
    if kind == "categorical":
        points = spec[1]
        if not (isinstance(points, list) and points and all(p is None or isinstance(p, str | int | float)
                                                             for p in points)):
            raise ConfigError(f"{where}: the choices must be a non-empty list of numbers, strings, booleans or "
                              f"null, got {points!r}")
        entry = ["categorical", list(points)]
    else:
        number = int if kind == "int" else float
        low, high = (check_value(number, v, f"{where} {name}") for name, v in (("low", spec[1]), ("high", spec[2])))
        log = check_value(bool, spec[3] if len(spec) == 4 else False, f"{where} log")
        if not low < high or (log and low <= 0):
            raise ConfigError(f"{where}: expected low < high{' and low > 0 (log scale)' if log else ''}, got "
                              f"{low!r}, {high!r}")
        points, entry = [low, high], [kind, low, high, log]
    for point in points:
        try:
            trial_config(config, {key: point}, "-")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    value = _value(config, key, where)
    inside = value in points if kind == "categorical" else (
        isinstance(value, int | float) and not isinstance(value, bool) and points[0] <= value <= points[1])
    if not inside:
        raise ConfigError(f"{where}: the config's value {value!r} is not in {points} (trial 0 trains the config "
                          f"as given): widen the space or change the value")
    return entry


def _value(config: RunConfig, key: str, where: str):
    node = config.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where}: the config gives no value there (trial 0 trains the config as given)")
        node = node[part]
    return node


def trial_config(config: RunConfig, params: dict, output_dir: str | Path) -> RunConfig:
    """`config` with `params` (dotted keys) and `output_dir`, validated as any run config."""
    data = {**config.to_dict(), "output_dir": str(output_dir)}
    for key, value in params.items():
        for part in reversed(key.split(".")):
            value = {part: value}
        data = merge_dicts(data, value)
    return config_from_dict(data)


def format_params(params: dict) -> str:
    return ", ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in params.items())


def tune(config: RunConfig, out_dir: str | Path, trials: int, space: dict | None = None,
         quiet: bool = False) -> dict:
    """Search `config`'s hyperparameters in `out_dir` (config.output_dir is not used) until `trials` trials
    have completed or been pruned; resume a search there. `space`: changes to the method's space (see
    resolve_space). Writes best.yaml and tune.json; returns tune.json's content."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines would interleave with ours
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    space, out, console = resolve_space(config, space), Path(out_dir), Console(quiet=quiet)
    with locked(out, RunDirError):
        study = _open_study(out, config, space)
        _requeue(study)
        _search(study, config, space, out, trials, console, quiet)
        summary = _summary(study, space)
        if summary["best"] is not None:
            write_text_atomic(out / BEST, dump_config(trial_config(config, summary["best"]["params"], out / "best")))
        write_json_atomic(out / SUMMARY, summary)
    if summary["best"] is None:
        raise TrainingError(f"{out}: no trial completed (each was pruned or diverged; see {out / SUMMARY})")
    return summary


def _open_study(out: Path, config: RunConfig, space: dict):
    """The folder's study, made with trial 0 (the config's values) enqueued; another config's is refused."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    if not (out / STORAGE).is_file() and any(path.name != LOCK for path in out.iterdir()):
        raise RunDirError(f"{out}: exists and is not a medpeft tune directory (no {STORAGE})")
    text = json.dumps({"config": {**config.to_dict(), "output_dir": None}, "space": space}, sort_keys=True)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        study = optuna.create_study(
            storage=f"sqlite:///{(out / STORAGE).resolve()}", study_name="tune", direction="maximize",
            load_if_exists=True, pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS,
                                                                    n_warmup_steps=PRUNE_WARMUP_EPOCHS))
        saved = study.user_attrs.get("fingerprint")
    except SQLAlchemyError as e:
        raise RunDirError(f"{out / STORAGE}: not a usable Optuna storage ({str(e).splitlines()[0]})") from None
    if saved not in (None, fingerprint):
        raise ConfigError(f"{out}: holds a search of another config or space; choose another folder or delete it")
    if saved is None:
        study.set_user_attr("fingerprint", fingerprint)
    if not study.trials:
        study.enqueue_trial({key: _value(config, key, key) for key in space}, user_attrs={"default": True})
    return study


def _requeue(study) -> None:
    """Trials left RUNNING by a search that was killed or stopped: failed, their params queued again with
    their run directory (queued first: a search killed in between runs it twice rather than never)."""
    from optuna.trial import TrialState

    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.enqueue_trial(stale.params, user_attrs={**stale.user_attrs, "retry_of": stale.number})
        study.tell(stale.number, state=TrialState.FAIL)


def _search(study, config: RunConfig, space: dict, out: Path, trials: int, console: Console, quiet: bool) -> None:
    import optuna
    from optuna.trial import TrialState

    while (done := len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))) < trials:
        study.sampler = optuna.samplers.TPESampler(n_startup_trials=TPE_STARTUP_TRIALS,
                                                   seed=(config.train.seed * 1_000_003 + done) % 2**32)
        trial = study.ask()
        params = {key: _suggest(trial, key, spec) for key, spec in space.items()}
        run_dir = trial.user_attrs.get("run_dir") or f"{TRIALS}/{trial.number:04d}"
        trial.set_user_attr("run_dir", run_dir)
        console.print(f"[bold]trial {trial.number}[/bold] ({done + 1} of {trials}): {format_params(params)}")
        try:
            value = _run_trial(trial, trial_config(config, params, out / run_dir), quiet)
        except optuna.TrialPruned as e:
            study.tell(trial, state=TrialState.PRUNED)
            console.print(f"trial {trial.number} pruned: {e}")
        else:
            study.tell(trial, value)


def _suggest(trial, key: str, spec: list):
    if spec[0] == "categorical":
        return trial.suggest_categorical(key, spec[1])
    suggest = trial.suggest_int if spec[0] == "int" else trial.suggest_float
    return suggest(key, spec[1], spec[2], log=spec[3])


def _run_trial(trial, config: RunConfig, quiet: bool) -> float:
    """The trial's run (resumed, or read where it completed before the search stopped): its val mean AUROC."""
    import optuna

    run_dir = Path(config.output_dir)
    if rundir.is_complete(run_dir):
        return rundir.read_json_object(run_dir / rundir.METRICS)["val"]["mean_auroc"]

    def report(epoch: int, score: float) -> None:
        trial.report(score, epoch)
        if epoch + 1 < config.train.epochs and trial.should_prune():  # after its last epoch a run is trained
            raise optuna.TrialPruned(f"val AUROC {score:.4f} after epoch {epoch + 1}, below the median")

    try:
        return train(config, quiet=quiet, on_epoch=report)["val"]["mean_auroc"]
    except TrainingError as e:  # diverged: a bad point of the space
        trial.set_user_attr("error", str(e))
        raise optuna.TrialPruned(str(e)) from None


_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def _summary(study, space: dict) -> dict:
    """tune.json: the space, every trial, the default (trial 0 or its retry) and best trials, best - default."""
    rows = [{"number": t.number, "state": _STATES[t.state.name], "params": t.params, "value": t.value,
             **t.user_attrs} for t in study.trials]
    default = next((r for r in rows if r.get("default") and r["state"] in ("complete", "pruned")), None)
    best = max((r for r in rows if r["state"] == "complete"), key=lambda r: r["value"], default=None)
    known = best is not None and default is not None and default["state"] == "complete"
    difference = best["value"] - default["value"] if known else None
    return {"objective": "val mean AUROC at the run's best epoch", "space": space, "trials": rows,
            "default": default, "best": best, "difference": difference}
