"""Command-line interface, thin over the Python API. Errors become one line on stderr and exit code 2;
Ctrl-C exits 130; a study with failed cells exits 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from medpeft.console import print_listing
from medpeft.errors import MedpeftError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Parameter-efficient fine-tuning of medical vision foundation models.")
console = Console()


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML run config."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: --set train.lr=1e-3 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (overrides output_dir)."),
    on_missing: Optional[str] = typer.Option(None, "--on-missing", help="error or skip missing/unreadable images."),
    devices: int = typer.Option(1, "--devices", min=1, help="Data-parallel processes to start on this machine: "
                                "one per GPU, or CPU processes (train.batch_size stays the global batch)."),
):
    """Fine-tune a backbone as CONFIG says; an unfinished run in the same directory resumes."""
    from medpeft import load_config, train as run_training
    from medpeft.engine.distributed import Processes
    from medpeft.metrics.display import print_metrics

    overrides = list(set_ or []) + ([f"output_dir={out}"] if out else []) + _on_missing(on_missing)
    run_config = load_config(config, overrides)
    if devices > 1:
        _launch(devices, ["train", str(config), *(f"--set={o}" for o in overrides)])
        return
    metrics = run_training(run_config)
    if Processes.from_env().main:
        print_metrics(metrics["test"] or metrics["val"], "test" if metrics["test"] else "val")


def _launch(devices: int, args: list[str]) -> None:
    """Run `medpeft ARGS` in `devices` local processes through torch's elastic launcher (torchrun)."""
    import os

    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from medpeft.errors import ConfigError, TrainingError

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--devices starts the processes itself; under a launcher (torchrun, accelerate "
                          "launch) leave it out")
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise ConfigError(f"--devices {devices}: this machine has {torch.cuda.device_count()} GPUs")
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={devices}", "-m", "medpeft", *args]))
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        raise TrainingError(f"process {rank} of {devices} failed (exit code {failure.exitcode}); "
                            f"its error is printed above") from None


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="YAML pretraining config (model, data, mae, train, augment)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: --set mae.mask_ratio=0.75 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (overrides output_dir)."),
):
    """MAE-pretrain a ViT on unlabelled images; writes <run>/mae.pth for model.weights. Resumes like train."""
    from medpeft.config import load_pretrain_config
    from medpeft.pretrain import pretrain as run_pretraining

    overrides = list(set_ or []) + ([f"output_dir={out}"] if out else [])
    run_pretraining(load_pretrain_config(config, overrides))


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finished run directory (with --zero-shot: a run config)."),
    split: Optional[str] = typer.Option(None, help="train, val, test or all (every image). Default: test, all "
                                       "with --data."),
    data: Optional[Path] = typer.Option(None, "--data", help="External validation: a YAML file whose data section "
                                        "names another dataset (any format; its labels meet the run's by name)."),
    name: Optional[str] = typer.Option(None, "--name", help="Folder under RUN/evaluations/ (default: the split, "
                                       "or the --data file's stem)."),
    calibrated: bool = typer.Option(False, "--calibrated", help="Score the temperature-scaled probabilities."),
    map_: Optional[List[str]] = typer.Option(None, "--map", help="RUN_LABEL=DATA_LABEL where the names differ "
                                             "beyond the built-in label map (repeatable)."),
    devices: int = typer.Option(1, "--devices", min=1, help="Processes to share the images between."),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="Evaluate the zero-shot classifier of the config's "
                                   "vision-language model (model.head_init: text) before any training."),
):
    """Evaluate a finished run's best weights on its own split or another dataset; writes RUN/evaluations/NAME/."""
    from medpeft.engine.distributed import Processes

    label_map = dict(_pair(m) for m in map_ or [])
    if devices > 1:
        _launch(devices, ["evaluate", str(run_dir), *([f"--split={split}"] if split else []),
                          *([f"--data={data}"] if data else []),
                          *([f"--name={name}"] if name else []), *["--calibrated"] * calibrated,
                          *(f"--map={m}" for m in map_ or []), *["--zero-shot"] * zero_shot])
        return
    from medpeft.config import load_config
    from medpeft.inference import evaluate as run_evaluation, zero_shot as run_zero_shot
    from medpeft.metrics.display import print_metrics

    metrics = (run_zero_shot(load_config(run_dir, ["model.head_init=text"]), split or "test") if zero_shot
               else run_evaluation(run_dir, split, data, name, calibrated, label_map))
    if Processes.from_env().main:
        print_metrics(metrics, (metrics.get("evaluation") or {}).get("name", split or "test"))


def _pair(text: str) -> tuple[str, str]:
    ours, sep, theirs = text.partition("=")
    if not (sep and ours.strip() and theirs.strip()):
        raise typer.BadParameter(f"--map {text!r}: expected RUN_LABEL=DATA_LABEL")
    return ours.strip(), theirs.strip()


@app.command()
def predict(
    paths: List[Path] = typer.Argument(..., help="RUN_DIR, then image files and folders (PNG, JPEG, TIFF, DICOM); "
                                                 "with --runs, only images and folders."),
    out: Path = typer.Option(..., "--out", help="CSV to write: one row per image."),
    runs: Optional[str] = typer.Option(None, "--runs", help="Comma-separated run directories fine-tuned from one "
                                                           "backbone: it is loaded once, one column group per run."),
    threshold: str = typer.Option("youden", "--threshold",
                                  help="Decision rule chosen on each run's val split: youden or sensitivity:X."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: the run's eval_batch_size."),
    workers: int = typer.Option(0, "--workers", help="Image decoding processes."),
    strict: bool = typer.Option(False, "--strict", help="Fail (writing nothing) if any input cannot be read."),
    saliency: Optional[Path] = typer.Option(None, "--saliency", help="Folder for saliency overlays of the labels "
                                                                    "called positive."),
):
    """Probabilities and decisions per label for new images; unreadable inputs are listed with the reason."""
    from medpeft.files import write_text_atomic
    from medpeft.inference import load_runs, predict as run_prediction

    run_dirs = [Path(p) for p in runs.split(",")] if runs else paths[:1]
    images = paths if runs else paths[1:]
    if not images:
        raise typer.BadParameter("give images or folders to predict on")
    loaded = load_runs(run_dirs, threshold)
    table = run_prediction(loaded, images, batch_size=batch_size, strict=strict, workers=workers, progress=True)
    write_text_atomic(out, table.to_csv(index=False))
    read = int((table["error"] == "").sum())
    console.print(f"{read} of {len(table)} images predicted by {', '.join(r.name for r in loaded)} -> {out}")
    for run in loaded:
        if run.thresholds is not None:
            rule = ", ".join(f"{k} {'n/a' if t is None else f'{t:.4f}'}" for k, t in run.thresholds.items())
            console.print(f"[dim]{run.name}: {run.rule} thresholds: {rule}[/dim]")
    if saliency is not None:
        for run in loaded:
            maps = run.explain(images, saliency / run.name if len(loaded) > 1 else saliency)
            console.print(f"{run.name}: {int(maps['file'].notna().sum())} saliency overlays -> {saliency}")


@app.command()
def export(run_dir: Path = typer.Argument(..., help="A finished run directory."),
           out: Path = typer.Option(..., "--out", help="Folder to create for the exported model.")):
    """A standalone model: merged weights as safetensors that timm loads alone, TorchScript and ONNX."""
    from medpeft.inference import load_run

    manifest = load_run(run_dir).export(out)
    sizes = ", ".join(f"{name} {size / 2**20:.1f} MB" for name, size in manifest["files"].items())
    console.print(f"exported {manifest['parameters']:,} parameters -> {out}: {sizes}")


@app.command()
def demo(out: Path = typer.Option(Path("demo-runs"), "--out", help="Folder for the phantoms, runs and report."),
         jobs: int = typer.Option(2, "--jobs", help="Fine-tuning runs at a time (the cores are shared out).")):
    """Phantom X-rays: MAE-pretrain a small ViT without labels, then compare training from scratch, linear
    probe, full fine-tuning and LoRA at 1%, 10% and 100% of the labels; writes a study report."""
    from medpeft.demo import run_demo

    run_demo(out, jobs=jobs)


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the registered PEFT methods."""
    from medpeft.methods import list_methods

    rows = [{"name": m.name, "description": m.description, "reference": m.reference,
             "families": list(m.config_cls.families), "merges": m.merge is not None} for m in list_methods()]
    print_listing(rows, "methods", as_json, {"name": "name", "families": lambda r: ", ".join(r["families"]),
                                        "merges": lambda r: "yes" if r["merges"] else "no",
                                        "description": "description", "reference": "reference"})


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the foundation models of the catalogue: a run names one as model.name, with model.weights its
    published file or folder (or 'hub')."""
    from medpeft.config.catalogue import catalogue_rows

    print_listing(catalogue_rows(), "foundation models", as_json, {
        "name": "name", "architecture": "architecture", "px": "resolution", "normalisation": "normalisation",
        "layouts": lambda r: ", ".join(r["layouts"]), "licence": "licence"})


data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets, write split files, build image caches.")
app.add_typer(data_app, name="data")


def _on_missing(value: Optional[str]) -> list[str]:
    return [f"data.on_missing={value}"] if value else []


def _data_table(config: Path, set_: Optional[List[str]], on_missing: Optional[str] = None):
    """The data section of CONFIG (its other sections are not read) and its table with the split."""
    from medpeft.config import load_data_config
    from medpeft.data import read_split_dataset

    data = load_data_config(config, list(set_ or []) + _on_missing(on_missing))
    return data, read_split_dataset(data)


@data_app.command("inspect")
def data_inspect(config: Path = typer.Argument(..., help="YAML config: only its data section is read."),
                 set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key (repeatable)."),
                 check: bool = typer.Option(False, "--check-images", help="Also decode every image as a run "
                                            "would (unusable ones: an error listing them, or skipped with "
                                            "--on-missing skip)."),
                 on_missing: Optional[str] = typer.Option(None, "--on-missing", help="error or skip unusable images."),
                 as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON.")):
    """Images, patients, views and label prevalence per split, as a run of CONFIG would see them."""
    import json

    from rich import box

    from medpeft.data.images import check_images
    from medpeft.data.summary import summarize, summary_rows

    data, table = _data_table(config, set_, on_missing)
    if check:
        table = check_images(table, data, progress=console.is_terminal)
    summary = summarize(table, data.labels)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    view = Table(title=f"{data.format}: {data.csv}", box=box.SIMPLE_HEAD, title_justify="left")
    view.add_column("", no_wrap=True)
    for name in summary["splits"]:
        view.add_column(name, justify="right", no_wrap=True)
    for name, cells in summary_rows(summary):
        view.add_row(name, *cells)
    console.print(view)
    console.print("[dim]labels: positive images and their share of the images whose label is known[/dim]")


@data_app.command("split")
def data_split(config: Path = typer.Argument(..., help="YAML run config (its data section is used)."),
               out: Path = typer.Option(..., "--out", help="Folder for the split files."),
               fractions: str = typer.Option("0.01,0.1,1", help="Label fractions of train, nested."),
               set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key (repeatable).")):
    """Write train (one file per label fraction, nested), val and test split files with content hashes."""
    from medpeft.config import SplitConfig
    from medpeft.data.label_fractions import label_fraction_subsets, write_split_file
    from medpeft.errors import ConfigError

    try:  # each as data.split.label_fraction takes it
        wanted = [SplitConfig(label_fraction=f).label_fraction for f in fractions.split(",")]
    except ConfigError as e:
        raise ConfigError(f"--fractions {fractions}: {e}") from None
    data, table = _data_table(config, set_)
    train = table[table["split"] == "train"]
    subsets = label_fraction_subsets(train, list(data.labels), wanted, data.split.seed)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": str(config), "seed": data.split.seed}
    for fraction, ids in subsets.items():
        digest = write_split_file(ids, out / f"train_{fraction:g}.txt", {**meta, "label_fraction": fraction})
        console.print(f"train {fraction:g}: {len(ids)} images  sha256 {digest[:16]}  -> {out / f'train_{fraction:g}.txt'}")
    for name in ("val", "test"):
        ids = table.loc[table["split"] == name, "image_id"].tolist()
        if ids:
            digest = write_split_file(ids, out / f"{name}.txt", meta)
            console.print(f"{name}: {len(ids)} images  sha256 {digest[:16]}  -> {out / f'{name}.txt'}")


@data_app.command("cache")
def data_cache(config: Path = typer.Argument(..., help="YAML run config (data.cache_dir must be set)."),
               set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key (repeatable)."),
               workers: int = typer.Option(2, help="Decoding processes."),
               on_missing: Optional[str] = typer.Option(None, "--on-missing",
                                                        help="error or skip missing/unreadable images.")):
    """Decode the images a run of CONFIG uses once into the memmap cache it will read."""
    from medpeft.data.cache import build_cache
    from medpeft.data.images import check_images
    from medpeft.errors import ConfigError

    from medpeft import load_config
    from medpeft.data import read_split_dataset

    run_config = load_config(config, list(set_ or []) + _on_missing(on_missing), base={"output_dir": "-"})
    table = read_split_dataset(run_config.data)
    if not run_config.data.cache_dir:
        raise ConfigError("data.cache_dir is not set: name the folder for the cache (--set data.cache_dir=DIR)")
    table = check_images(table, run_config.data, progress=console.is_terminal)
    cache = build_cache(table["image_id"].tolist(), table["path"].tolist(), run_config.model.img_size,
                        run_config.data.cache_dir, workers=workers, progress=console.is_terminal,
                        alpha=run_config.data.alpha)
    size_mb = len(cache) * cache.size * cache.size / 2**20
    console.print(f"{len(cache)} images at {cache.size}x{cache.size} ({size_mb:.1f} MB) in {cache.path}")


study_app = typer.Typer(no_args_is_help=True, help="Run a grid of runs from a study file and report it.")
app.add_typer(study_app, name="study")


@study_app.command("run")
def study_run(study: Path = typer.Argument(..., help="YAML study file."),
              out: Optional[Path] = typer.Option(None, "--out", help="Study directory (default: studies-out/NAME)."),
              jobs: int = typer.Option(1, "--jobs", help="Cells trained at once (cores split between them)."),
              executor: str = typer.Option("local", "--executor", help="local or ray."),
              retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed cells again.")):
    """Run every cell not done yet; safe to interrupt and start again."""
    from medpeft.errors import ConfigError
    from medpeft.study.runner import run_study

    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor must be local or ray, got {executor!r}")
    out = out or Path("studies-out") / study.stem
    counts = run_study(study, out, jobs=jobs, executor=executor, retry_failed=retry_failed)
    if counts.get("failed"):
        _exit(1, f"{counts['failed']} of {sum(counts.values())} cells failed: see {out / 'logs'} "
                 f"(--retry-failed runs them again)")


@study_app.command("report")
def study_report(study_dir: Path = typer.Argument(..., help="A study directory (from medpeft study run).")):
    """Write report.md, report.html, CSV and LaTeX tables and plots into STUDY_DIR/report."""
    from medpeft.study.report import write_report

    console.print(f"report: {write_report(study_dir)}")


def _one_line(error: BaseException) -> str:
    # An error raised in a DataLoader worker arrives with the worker's traceback in its message.
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    prefix, sep, rest = last.partition(": ")
    return rest if sep and prefix.startswith("medpeft.errors.") else last


def _exit(code: int, message: str, prefix: str = "[red]error:[/red] ") -> None:
    """One line on stderr, then exit with `code`."""
    from rich.markup import escape

    Console(stderr=True).print(prefix + escape(message), highlight=False, soft_wrap=True)
    sys.exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one 'warning: ...' line on stderr (Python's format adds the source line)."""
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False,
                               soft_wrap=True)


def main() -> None:
    """Every non-zero exit says why on stderr, in one line but for click's usage errors; warnings are
    'warning: ...' lines."""
    import warnings

    import click

    warnings.showwarning = _show_warning
    try:
        code = app(standalone_mode=False)  # typer returns the exit code here: 130 for Ctrl-C
    except MedpeftError as e:
        _exit(2, _one_line(e))
    except OSError as e:  # a full or read-only disk, no permission, a missing file: named by Python
        if e.filename is None:
            raise
        _exit(2, f"{e.filename}: {e.strerror}")
    except typer.Abort as e:  # typer's for an EOFError
        _exit(1, f"unexpected end of input ({_one_line(e.__cause__ or e)})")
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    if code == 130:
        _exit(130, "interrupted: run the same command again to resume", prefix="")
    sys.exit(code)


if __name__ == "__main__":
    main()
