"""Run a study: expand its cells, skip the finished ones, run the rest as ordinary training runs.

Layout of a study directory::

    study.yaml       the study file as last run
    study.sqlite     the results store (medpeft.study.store)
    configs/KEY.yaml each cell's run config (with its output_dir)
    configs/KEY.external.yaml  the data section of the cell's external test set, where the study names one
    runs/KEY/        each cell's run directory
    logs/KEY.log     each cell's process output
    logs/KEY.json    each cell's peak memory, written by its process when its run is complete
    tune/TASK/       with the study's ``tune``: each task's search (medpeft.train.tune), TASK the cell key
                     without its seed (Cell.tune_key)
    configs/TASK.tune.yaml  the search's config: the task's first seed's cell with the study's tune section
    logs/TASK.tune.log      the search's process output

Each cell trains in its own process (``python -m medpeft.study.cell``), so cells are isolated (memory
is measured per cell, a crash fails one cell) and run side by side: ``jobs`` processes at once, each
given ``cores / jobs`` threads and, on a GPU machine, one GPU in turn (``CUDA_VISIBLE_DEVICES``). A
cell process is killed with its runner (Linux ``PR_SET_PDEATHSIG``), so a killed runner never leaves a
cell training behind; started again, it resumes that cell from its checkpoint. The runner alone writes
the store, holding the study directory's lock (a second runner there is refused); each cell's process
holds its run directory's lock. A cell whose dataset level has an external test set (the study file's
``external``) is then evaluated on it in a second process, ``medpeft evaluate RUN --data
configs/KEY.external.yaml --name external --split SPLIT`` (``RUN/evaluations/external/``), before it is
done: an error there fails the cell, and a rerun evaluates its complete run. A cell done before the
study named its external set is not evaluated. A generative study's cell trains with ``medpeft generate
train`` and is then measured the same way, by ``medpeft generate evaluate RUN`` with the study's
``generate`` settings (``RUN/evaluations/generated/``); its store row holds the run's metrics with the
evaluation's under ``generated``. ``executor="ray"`` sends the same cell processes to the
workers of a Ray cluster (``ray.init(address="auto")`` when one is running, else a local instance); the study
directory must then be on storage every worker sees.

With the study's ``tune``, the searches of the tasks of the cells to run come first: each in its own
process (``medpeft tune configs/TASK.tune.yaml --out tune/TASK``), handed to the same executor as the
cells, ``jobs`` at a time with the same threads and GPUs, its trials one after another in that process.
Then every seed of a task trains with the task's best values (tune/TASK/tune.json) over its own config,
written to configs/KEY.yaml. A finished search is reused; a killed one resumes (medpeft.train.tune); a
failed one fails its task's cells with its error, and ``retry_failed`` resumes it.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console

from medpeft.config import config_from_dict
from medpeft.engine import rundir
from medpeft.engine.assemble import check_buildable
from medpeft.errors import ConfigError, RunDirError
from medpeft.files import locked, write_text_atomic
from medpeft.generate.config import EVALUATION
from medpeft.study.spec import Cell, Study, load_study
from medpeft.study.store import Store, legacy_hashes
from medpeft.train.tune import BEST, SUMMARY, trial_config

STORE = "study.sqlite"
TUNE = "tune"
"""The folder of the tasks' searches."""
EXTERNAL = Path(rundir.EVALUATIONS) / "external" / rundir.METRICS
"""A cell's external evaluation, relative to its run directory."""
GENERATED = Path(rundir.EVALUATIONS) / EVALUATION / rundir.METRICS
"""A generative cell's evaluation, relative to its run directory."""


@dataclass(frozen=True)
class CellResult:
    key: str
    ok: bool
    peak_memory_mb: float | None = None
    error: str | None = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _result_path(log_path: str | Path) -> Path:
    return Path(log_path).with_suffix(".json")


def peak_memory(log_path: str | Path) -> float | None:
    """The peak memory of the cell process that completed the cell's run (None: killed before it said)."""
    path = _result_path(log_path)
    return rundir.read_json_object(path)["peak_memory_mb"] if path.is_file() else None


def run_cell(key: str, config_path: str, log_path: str, evaluation: tuple[str, str, list[str]] | None,
             generate: bool, threads: int, gpu: int | None = None) -> CellResult:
    """Train one cell in a child process (a generate run when `generate`), then with `evaluation` (run
    directory, what it is, medpeft's arguments) evaluate its run in another (a complete run is not trained
    again); their output goes to `log_path`, the training's peak memory next to it."""
    steps = []
    if not (evaluation and rundir.is_complete(Path(evaluation[0]))):
        steps.append(("", ["-m", "medpeft.study.cell", config_path, str(threads), str(_result_path(log_path)),
                           *(["generate"] if generate else [])]))
    if evaluation:
        steps.append((evaluation[1], ["-m", "medpeft", *evaluation[2]]))
    return _run_steps(key, steps, log_path, threads, gpu) or CellResult(key, True,
                                                                          peak_memory_mb=peak_memory(log_path))


def run_search(key: str, config_path: str, tune_dir: str, log_path: str, threads: int,
               gpu: int | None = None) -> CellResult:
    """Search one task's hyperparameters in a child process (``medpeft tune``, resuming a search in
    `tune_dir`), its output to `log_path`."""
    steps = [("search: ", ["-m", "medpeft", "tune", config_path, f"--out={tune_dir}"])]
    return _run_steps(key, steps, log_path, threads, gpu) or CellResult(key, True)


def _run_steps(key: str, steps: list[tuple[str, list[str]]], log_path: str, threads: int,
               gpu: int | None) -> CellResult | None:
    """Run each step (what it is, the arguments of python) in a child process in turn, output to `log_path`;
    the first that fails as a failed result with its last line (None when all succeed)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    for what, arguments in steps:
        with open(log_path, "a") as log:
            proc = subprocess.run([sys.executable, *arguments], stdout=log, stderr=log, env=env,
                                  preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        if proc.returncode != 0:
            errors = [line for line in Path(log_path).read_text().splitlines() if line.strip()]
            error = errors[-1] if errors else f"exit code {proc.returncode}"
            return CellResult(key, False, error=(what + error)[:2000])
    return None


class _LocalExecutor:
    """`jobs` cell processes at once on this machine, cores split between them, GPUs handed out in turn."""

    def __init__(self, jobs: int):
        import torch

        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        gpus = torch.cuda.device_count()
        self.slots: queue.Queue = queue.Queue()
        for slot in range(jobs):
            self.slots.put(slot % gpus if gpus else None)

    def submit(self, function, *args) -> Future:
        return self.pool.submit(self._run, function, *args)

    def _run(self, function, *args) -> CellResult:
        gpu = self.slots.get()
        try:
            return function(*args, threads=self.threads, gpu=gpu)
        finally:
            self.slots.put(gpu)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _RayExecutor:
    """Each cell (or search) a Ray task that runs the same process on a worker with the CPUs / GPU it asked for."""

    def __init__(self, jobs: int):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'medpeft[ray]'") from None
        import torch

        self.ray = ray
        if not ray.is_initialized():
            ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else None, include_dashboard=False,
                     log_to_driver=False)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.threads = max(1, cpus // jobs)
        gpus = 1 if torch.cuda.is_available() or ray.cluster_resources().get("GPU") else 0
        self.resources, self.tasks = dict(num_cpus=self.threads, num_gpus=gpus, max_retries=0), {}

    def submit(self, function, *args) -> Future:
        if function not in self.tasks:
            self.tasks[function] = self.ray.remote(**self.resources)(function)
        return self.tasks[function].remote(*args, threads=self.threads).future()

    def close(self) -> None:
        pass


def run_study(study_path: str | Path, out: str | Path, jobs: int = 1, executor: str = "local",
              retry_failed: bool = False, quiet: bool = False) -> dict:
    """Run every cell of the study not yet done; return the count of cells per status."""
    console = Console(quiet=quiet)
    study = load_study(study_path)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if study.generate is None:  # a generative study's models are built when they train
        check_models(study.cells, study.path)
    out = Path(out)
    with locked(out, RunDirError):
        for sub in ("configs", "runs", "logs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        store = Store(out / STORE)
        try:
            store.sync(study.cells, (out / "runs").resolve(), lambda: legacy_hashes(study.cells, out / "configs"))
            write_text_atomic(out / "study.yaml", Path(study_path).read_text())
            todo = [c for c in study.cells if store.status(c.key) in ("pending", "running")
                    or (retry_failed and store.status(c.key) == "failed")]
            done = len(study.cells) - len(todo)
            console.print(f"study {study.name}: {len(study.cells)} cells, {done} done or failed before, {len(todo)} "
                          f"to run ({jobs} at a time, {executor})")
            pending = [c for c in todo if not _recover(store, c, out, _evaluated(study, c))]
            if pending:
                _execute(store, study, pending, out, jobs, executor, console)
            counts = store.frame()["status"].value_counts().to_dict()
        finally:
            store.close()
    console.print("  ".join(f"{status}: {n}" for status, n in sorted(counts.items())))
    return counts


def check_models(cells: list[Cell], path: Path) -> None:
    """Build each distinct model of the cells on the meta device (see engine.assemble.check_buildable)."""
    seen = set()
    for cell in cells:  # a cell's config is resolved: its data.labels are filled in
        key = yaml.safe_dump([cell.config["model"], cell.config["method"], len(cell.config["data"]["labels"])])
        if key not in seen:
            seen.add(key)
            check_buildable(config_from_dict({**cell.config, "output_dir": "-"}), where=f"{path}: cell {cell.key}: ")


def _evaluated(study: Study, cell: Cell) -> Path | None:
    """Where the cell's evaluation after training is (relative to its run directory); None without one."""
    if study.generate is not None:
        return GENERATED
    return EXTERNAL if cell.dataset in study.external else None


def _metrics(run_dir: Path) -> dict:
    """A finished cell's metrics: its run's, with a generative evaluation's under ``generated``."""
    metrics = rundir.read_json_object(run_dir / rundir.METRICS)
    if (run_dir / GENERATED).is_file():
        metrics["generated"] = rundir.read_json_object(run_dir / GENERATED)
    return metrics


def _recover(store: Store, cell: Cell, out: Path, evaluated: Path | None) -> bool:
    """A cell whose run finished (and was evaluated where the study evaluates it) but was not recorded
    (runner killed in between) is recorded now."""
    run_dir = out / "runs" / cell.key
    if not rundir.is_complete(run_dir) or (evaluated and not (run_dir / evaluated).is_file()):
        return False
    store.mark_done(cell.key, _metrics(run_dir), peak_memory(out / "logs" / f"{cell.key}.log"))
    return True


def _execute(store: Store, study: Study, cells: list[Cell], out: Path, jobs: int, executor: str,
             console: Console) -> None:
    """The searches of the cells' tasks (with the study's tune), then the cells, `jobs` processes at a time;
    a cell is marked running when it is handed to a worker."""
    pool = _RayExecutor(jobs) if executor == "ray" else _LocalExecutor(jobs)
    try:
        cells, finished = _search(store, study, cells, out, pool, jobs, console), []

        def record(cell: Cell, result: CellResult) -> None:
            finished.append(cell)
            _record(store, cell, result, out, f"[{len(finished)}/{len(cells)}]", console)
        _in_flight(jobs, _longest_first(cells),
                   lambda cell: _start(pool, store, study, cell, out), record)
    finally:
        pool.close()


def _longest_first(cells: list[Cell]) -> list[Cell]:
    """The cells with the most labels first (stable otherwise): with several at a time, the longest start
    early and the short ones fill the gaps, so the slots finish together (a grid's 100% cells dominate)."""
    return sorted(cells, key=lambda cell: -cell.fraction)


def _in_flight(jobs: int, items: list, start, finish) -> None:
    """Start each item (``start(item)``: a Future), `jobs` at a time; ``finish(item, result)`` as each ends."""
    waiting, running = list(items), {}
    while waiting or running:
        while waiting and len(running) < jobs:
            item = waiting.pop(0)
            running[start(item)] = item
        ready, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in ready:
            finish(running.pop(future), future.result())


def _search(store: Store, study: Study, cells: list[Cell], out: Path, pool, jobs: int, console: Console) -> list[Cell]:
    """Run the unfinished searches of the tasks of `cells`, each with the task's first cell (its first seed);
    mark the cells of a failed search failed with its error; return the others."""
    if study.tune is None:
        return cells
    firsts: dict[str, Cell] = {}
    for cell in study.cells:
        firsts.setdefault(cell.tune_key, cell)
    needed = {cell.tune_key for cell in cells}
    todo = [c for key, c in firsts.items() if key in needed and not all(
        (out / TUNE / key / name).is_file() for name in (BEST, SUMMARY))]
    failed: dict[str, str] = {}

    def finish(cell: Cell, result: CellResult) -> None:
        if not result.ok:
            failed[cell.tune_key] = result.error
            console.print(f"search {cell.tune_key}: [red]failed[/red]: {result.error}")
            return
        summary = rundir.read_json_object(out / TUNE / cell.tune_key / SUMMARY)
        gain = "" if summary["difference"] is None else f", {summary['difference']:+.4f} over the default"
        console.print(f"search {cell.tune_key}: best val AUROC {summary['best']['value']:.4f} (trial "
                      f"{summary['best']['number']}{gain})")
    if todo:
        console.print(f"{len(todo)} searches of {study.tune.trials} trials first")
    _in_flight(jobs, _longest_first(todo), lambda cell: _start_search(pool, cell, out), finish)
    for cell in cells:
        if cell.tune_key in failed:
            store.mark_failed(cell.key, failed[cell.tune_key])
    return [cell for cell in cells if cell.tune_key not in failed]


def _start_search(pool, cell: Cell, out: Path) -> Future:
    """Write the search's config (the cell's, with the study's tune section) and hand the search over."""
    config_path = (out / "configs" / f"{cell.tune_key}.tune.yaml").resolve()
    write_text_atomic(config_path, yaml.safe_dump({**cell.config, "tune": cell.tune}, sort_keys=False))
    return pool.submit(run_search, cell.tune_key, str(config_path), str((out / TUNE / cell.tune_key).resolve()),
                       str((out / "logs" / f"{cell.tune_key}.tune.log").resolve()))


def _start(pool, store: Store, study: Study, cell: Cell, out: Path) -> Future:
    """Write the cell's config (tuned: with its task's best values; and its external test set's data
    section), mark it running, hand it over."""
    config_path = (out / "configs" / f"{cell.key}.yaml").resolve()
    run_dir = (out / "runs" / cell.key).resolve()
    config = {**cell.config, "output_dir": str(run_dir)}
    if cell.tune is not None:
        best = rundir.read_json_object(out / TUNE / cell.tune_key / SUMMARY)["best"]["params"]
        config = trial_config(config_from_dict(config), best, run_dir).to_dict()
    write_text_atomic(config_path, yaml.safe_dump(config, sort_keys=False))
    evaluation, external = None, study.external.get(cell.dataset)
    if external:
        data_path = config_path.with_suffix(".external.yaml")
        write_text_atomic(data_path, yaml.safe_dump({"data": external["data"]}, sort_keys=False))
        evaluation = (str(run_dir), "external evaluation: ", ["evaluate", str(run_dir), f"--data={data_path}",
                                                             "--name=external", f"--split={external['split']}"])
    if (options := study.generate) is not None:
        evaluation = (str(run_dir), "generated-image evaluation: ", [
            "generate", "evaluate", str(run_dir), f"--extractor={Path(options.extractor).resolve()}",
            f"--steps={options.steps}", f"--guidance={options.guidance}", f"--seed={options.seed}",
            *([f"--n={options.n}"] if options.n is not None else [])])
    store.mark_running(cell.key)
    return pool.submit(run_cell, cell.key, str(config_path), str((out / "logs" / f"{cell.key}.log").resolve()),
                       evaluation, study.generate is not None)


def _record(store: Store, cell: Cell, result: CellResult, out: Path, counter: str, console: Console) -> None:
    if not result.ok:
        store.mark_failed(cell.key, result.error)
        console.print(f"{counter} {cell.key}: [red]failed[/red]: {result.error}")
        return
    metrics = _metrics(out / "runs" / cell.key)
    store.mark_done(cell.key, metrics, result.peak_memory_mb)
    if "generated" in metrics:
        score = f"FID {metrics['generated']['fid']:.4g}"
    else:
        test = (metrics["test"] or {}).get("mean_auroc")
        score = f"test AUROC {'n/a' if test is None else f'{test:.4f}'}"
    console.print(f"{counter} {cell.key}: {score} ({metrics['wall_time_s']:.0f} s)")
