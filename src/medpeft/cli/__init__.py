"""Command-line interface, thin over the Python API. Errors become one line on stderr and exit code 2;
Ctrl-C exits 130; a study with failed cells exits 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from medpeft.cli.app import _exit, _launch, _on_missing, app, console
from medpeft.console import print_listing
from medpeft.errors import MedpeftError


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML run config."),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                  help="Override a key: --set train.lr=1e-3 (repeatable)."),
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


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="YAML pretraining config (model, data, mae, train, augment)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                  help="Override a key: --set mae.mask_ratio=0.75 (repeatable)."),
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
    map_: Optional[List[str]] = typer.Option(None, "--map", metavar="RUN_LABEL=DATA_LABEL",
                                  help="RUN_LABEL=DATA_LABEL where the names differ "
                                             "beyond the built-in label map (repeatable)."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average the logits over the views the "
                             "run's training augmentation covered (the image, a centred crop, their mirror images)."),
    ensemble_with: Optional[str] = typer.Option(None, "--ensemble-with", help="Comma-separated runs of the same "
                                                "task, backbone and split: score the mean of their and RUN_DIR's "
                                                "calibrated probabilities."),
    devices: int = typer.Option(1, "--devices", min=1, help="Processes to share the images between."),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="Evaluate the zero-shot classifier of the config's "
                                   "vision-language model (model.head_init: text) before any training."),
):
    """Evaluate a finished run's best weights on its own split or another dataset; writes RUN/evaluations/NAME/."""
    from medpeft.engine.distributed import Processes

    label_map = dict(_pair(m) for m in map_ or [])
    if zero_shot and (tta or ensemble_with):
        raise typer.BadParameter("--zero-shot scores the untrained classifier alone: not with --tta or --ensemble-with")
    if devices > 1:
        _launch(devices, ["evaluate", str(run_dir), *([f"--split={split}"] if split else []),
                          *([f"--data={data}"] if data else []),
                          *([f"--name={name}"] if name else []), *["--calibrated"] * calibrated,
                          *(f"--map={m}" for m in map_ or []), *["--zero-shot"] * zero_shot, *["--tta"] * tta,
                          *([f"--ensemble-with={ensemble_with}"] if ensemble_with else [])])
        return
    from medpeft.config import load_config
    from medpeft.inference import evaluate as run_evaluation, zero_shot as run_zero_shot
    from medpeft.metrics.display import print_metrics

    metrics = (run_zero_shot(load_config(run_dir, ["model.head_init=text"]), split or "test") if zero_shot
               else run_evaluation(run_dir, split, data, name, calibrated, label_map, tta=tta,
                                   ensemble_with=ensemble_with.split(",") if ensemble_with else None))
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
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average each run's logits over the "
                             "views its training augmentation covered (the image, a centred crop, mirror images)."),
    ensemble: bool = typer.Option(False, "--ensemble", help="One 'ensemble' column group: the mean of the runs' "
                                  "calibrated probabilities, thresholds chosen by --threshold on their common val split."),
    fit_threshold: Optional[Path] = typer.Option(None, "--fit-threshold", help="SAMPLE.csv of labelled images of "
                                                 "the target site ('path', a 0/1 column per label): choose the "
                                                 "thresholds by --threshold on it; written to OUT.thresholds.json."),
):
    """Probabilities and decisions per label for new images; unreadable inputs are listed with the reason."""
    from medpeft.files import write_json_atomic, write_text_atomic
    from medpeft.inference import fit_thresholds, load_ensemble, load_runs, predict as run_prediction

    run_dirs = [Path(p) for p in runs.split(",")] if runs else paths[:1]
    images = paths if runs else paths[1:]
    if not images:
        raise typer.BadParameter("give images or folders to predict on")
    if saliency is not None and (tta or ensemble):
        raise typer.BadParameter("--saliency explains one run's decisions on the image itself: not with --tta or "
                                 "--ensemble")
    loaded = [load_ensemble(run_dirs, threshold)] if ensemble else load_runs(run_dirs, threshold)
    fitted = None
    if fit_threshold is not None:
        loaded, fitted = fit_thresholds(loaded, fit_threshold, threshold, tta=tta, batch_size=batch_size,
                                        workers=workers)
    table = run_prediction(loaded, images, batch_size=batch_size, strict=strict, workers=workers, progress=True,
                           tta=tta)
    write_text_atomic(out, table.to_csv(index=False))
    if fitted is not None:
        write_json_atomic(out.with_name(out.stem + ".thresholds.json"), fitted)
    read = int((table["error"] == "").sum())
    by = ", ".join(run.name for predictor in loaded for run in predictor.members) + " (ensemble)" * ensemble
    console.print(f"{read} of {len(table)} images predicted by {by} -> {out}")
    _print_thresholds(loaded, fitted)
    if saliency is not None:
        for run in loaded:
            maps = run.explain(images, saliency / run.name if len(loaded) > 1 else saliency)
            console.print(f"{run.name}: {int(maps['file'].notna().sum())} saliency overlays -> {saliency}")


def _print_thresholds(predictors: list, fitted: dict | None) -> None:
    """Each predictor's thresholds; re-fitted on a sample: the val-chosen ones -> the sample's."""
    def show(t):
        return "n/a" if t is None else f"{t:.4f}"

    for predictor in predictors:
        if predictor.thresholds is None:
            continue
        if fitted is None:
            rule = ", ".join(f"{k} {show(t)}" for k, t in predictor.thresholds.items())
            console.print(f"[dim]{predictor.name}: {predictor.rule} thresholds: {rule}[/dim]")
            continue
        before = fitted["thresholds"][predictor.name]["before"]
        rule = ", ".join(f"{k} {show(before[k])} -> {show(t)}" for k, t in predictor.thresholds.items())
        console.print(f"{predictor.name}: {predictor.rule} thresholds re-fitted on {fitted['sample']} "
                      f"({fitted['images']} images), val -> sample: {rule}")


@app.command()
def export(run_dir: Path = typer.Argument(..., help="A finished run directory."),
           out: Path = typer.Option(..., "--out", help="Folder to create for the exported model.")):
    """A standalone model: merged weights as safetensors that timm loads alone, TorchScript and ONNX."""
    from medpeft.inference import load_run

    manifest = load_run(run_dir).export(out)
    sizes = ", ".join(f"{name} {_size(size)}" for name, size in manifest["files"].items())
    console.print(f"exported {manifest['parameters']:,} parameters -> {out}: {sizes}")


def _size(size: int) -> str:
    """A file size in bytes as MB (2**20 bytes), or as kB below 1 MB."""
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.1f} kB"


@app.command()
def demo(out: Optional[Path] = typer.Option(None, "--out", help="Folder for the phantoms, runs and report (default: "
                                            "demo-runs, or demo-generative with --generative)."),
         jobs: int = typer.Option(2, "--jobs", help="Fine-tuning runs at a time (the cores are shared out)."),
         generative: bool = typer.Option(False, "--generative", help="The generative demo instead: adapt a small "
                                         "text-to-image diffusion model to a new hospital with every generative "
                                         "method (needs medpeft[generate]).")):
    """Phantom X-rays: MAE-pretrain a small ViT without labels, then compare training from scratch, linear
    probe, full fine-tuning and LoRA at 1%, 10% and 100% of the labels; writes a study report. With
    --generative: the generative PEFT methods compared on adapting a diffusion model to another hospital."""
    if generative:
        from medpeft.demo_generative import run_generative_demo

        run_generative_demo(out or Path("demo-generative"))
        return
    from medpeft.demo import run_demo

    run_demo(out or Path("demo-runs"), jobs=jobs)


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


def _one_line(error: BaseException) -> str:
    # An error raised in a DataLoader worker arrives with the worker's traceback in its message.
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    prefix, sep, rest = last.partition(": ")
    return rest if sep and prefix.startswith("medpeft.errors.") else last


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


# The sub-command groups register themselves on `app`.
from medpeft.cli import data as _data, generate as _generate, study as _study, tune as _tune  # noqa: E402,F401

if __name__ == "__main__":
    main()
