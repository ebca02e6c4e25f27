"""Run a study: expand its cells, skip the finished ones, run the rest as ordinary training runs.

Layout of a study directory::

    study.yaml       the study file as last run
    study.sqlite     the results store (medpeft.study.store)
    configs/KEY.yaml each cell's run config (with its output_dir)
    configs/KEY.external.yaml  the data section of the cell's external test set, where the study names one
    runs/KEY/        each cell's run directory
    logs/KEY.log     each cell's process output
    logs/KEY.json    each cell's peak memory, written by its process when its run is complete

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
study named its external set is not evaluated. ``executor="ray"`` sends the same cell processes to the
workers of a Ray cluster (``ray.init(address="auto")`` when one is running, else a local instance); the study
directory must then be on storage every worker sees.
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
from medpeft.study.spec import Cell, load_study
from medpeft.study.store import Store

STORE = "study.sqlite"
EXTERNAL = Path(rundir.EVALUATIONS) / "external" / rundir.METRICS
"""A cell's external evaluation, relative to its run directory."""


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


def run_cell(key: str, config_path: str, log_path: str, external: tuple[str, str, str] | None, threads: int,
             gpu: int | None = None) -> CellResult:
    """Train one cell in a child process, then with `external` (run directory, data file, split) evaluate its
    run on that data in another (a complete run is not trained again); their output goes to `log_path`, the
    training's peak memory next to it."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    steps = []
    if not (external and rundir.is_complete(Path(external[0]))):
        steps.append(("", ["-m", "medpeft.study.cell", config_path, str(threads), str(_result_path(log_path))]))
    if external:
        run_dir, data, split = external
        steps.append(("external evaluation: ", ["-m", "medpeft", "evaluate", run_dir, f"--data={data}",
                                                "--name=external", f"--split={split}"]))
    for what, arguments in steps:
        with open(log_path, "a") as log:
            proc = subprocess.run([sys.executable, *arguments], stdout=log, stderr=log, env=env,
                                  preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        if proc.returncode != 0:
            errors = [line for line in Path(log_path).read_text().splitlines() if line.strip()]
            error = errors[-1] if errors else f"exit code {proc.returncode}"
            return CellResult(key, False, error=(what + error)[:2000])
    return CellResult(key, True, peak_memory_mb=peak_memory(log_path))


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

    def submit(self, *args) -> Future:
        return self.pool.submit(self._run, *args)

    def _run(self, *args) -> CellResult:
        gpu = self.slots.get()
        try:
            return run_cell(*args, threads=self.threads, gpu=gpu)
        finally:
            self.slots.put(gpu)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _RayExecutor:
    """Each cell a Ray task that runs the same cell process on a worker with the CPUs / GPU it asked for."""

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
        self.task = ray.remote(num_cpus=self.threads, num_gpus=gpus, max_retries=0)(run_cell)

    def submit(self, *args) -> Future:
        return self.task.remote(*args, threads=self.threads).future()

    def close(self) -> None:
        pass


def run_study(study_path: str | Path, out: str | Path, jobs: int = 1, executor: str = "local",
              retry_failed: bool = False, quiet: bool = False) -> dict:
    """Run every cell of the study not yet done; return the count of cells per status."""
    console = Console(quiet=quiet)
    study = load_study(study_path)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    check_models(study.cells, study.path)
    out = Path(out)
    with locked(out, RunDirError):
        for sub in ("configs", "runs", "logs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        store = Store(out / STORE)
        try:
            store.sync(study.cells, (out / "runs").resolve())
            write_text_atomic(out / "study.yaml", Path(study_path).read_text())
            todo = [c for c in study.cells if store.status(c.key) in ("pending", "running")
                    or (retry_failed and store.status(c.key) == "failed")]
            done = len(study.cells) - len(todo)
            console.print(f"study {study.name}: {len(study.cells)} cells, {done} done or failed before, {len(todo)} "
                          f"to run ({jobs} at a time, {executor})")
            pending = [c for c in todo if not _recover(store, c, out, c.dataset in study.external)]
            if pending:
                _execute(store, pending, out, jobs, executor, console, study.external)
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


def _recover(store: Store, cell: Cell, out: Path, external: bool) -> bool:
    """A cell whose run finished (and, with `external`, was evaluated on its external test set) but was not
    recorded (runner killed in between) is recorded now."""
    run_dir = out / "runs" / cell.key
    if not rundir.is_complete(run_dir) or (external and not (run_dir / EXTERNAL).is_file()):
        return False
    store.mark_done(cell.key, rundir.read_json_object(run_dir / rundir.METRICS),
                    peak_memory(out / "logs" / f"{cell.key}.log"))
    return True


def _execute(store: Store, cells: list[Cell], out: Path, jobs: int, executor: str, console: Console,
             external: dict[str, dict]) -> None:
    """Keep `jobs` cells in flight; a cell is marked running when it is handed to a worker."""
    pool = _RayExecutor(jobs) if executor == "ray" else _LocalExecutor(jobs)
    waiting, in_flight, finished = list(cells), {}, 0
    try:
        while waiting or in_flight:
            while waiting and len(in_flight) < jobs:
                cell = waiting.pop(0)
                in_flight[_start(pool, store, cell, out, external.get(cell.dataset))] = cell
            ready, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in ready:
                cell, result = in_flight.pop(future), future.result()
                finished += 1
                _record(store, cell, result, out, f"[{finished}/{len(cells)}]", console)
    finally:
        pool.close()


def _start(pool, store: Store, cell: Cell, out: Path, external: dict | None) -> Future:
    """Write the cell's config (and its external test set's data section), mark it running, hand it over."""
    config_path = (out / "configs" / f"{cell.key}.yaml").resolve()
    run_dir = (out / "runs" / cell.key).resolve()
    write_text_atomic(config_path, yaml.safe_dump({**cell.config, "output_dir": str(run_dir)}, sort_keys=False))
    evaluation = None
    if external:
        data_path = config_path.with_suffix(".external.yaml")
        write_text_atomic(data_path, yaml.safe_dump({"data": external["data"]}, sort_keys=False))
        evaluation = (str(run_dir), str(data_path), external["split"])
    store.mark_running(cell.key)
    return pool.submit(cell.key, str(config_path), str((out / "logs" / f"{cell.key}.log").resolve()), evaluation)


def _record(store: Store, cell: Cell, result: CellResult, out: Path, counter: str, console: Console) -> None:
    if not result.ok:
        store.mark_failed(cell.key, result.error)
        console.print(f"{counter} {cell.key}: [red]failed[/red]: {result.error}")
        return
    metrics = rundir.read_json_object(out / "runs" / cell.key / rundir.METRICS)
    store.mark_done(cell.key, metrics, result.peak_memory_mb)
    test = (metrics["test"] or {}).get("mean_auroc")
    console.print(f"{counter} {cell.key}: test AUROC {'n/a' if test is None else f'{test:.4f}'} "
                  f"({metrics['wall_time_s']:.0f} s)")
