"""``medpeft generate``: fine-tune text-to-image diffusion models with a generative PEFT method, and sample them."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medpeft.cli.app import _launch, app, console

generate_app = typer.Typer(no_args_is_help=True, help="Fine-tune text-to-image diffusion models (diffusers) with a "
                           "PEFT method, and sample them. Needs pip install 'medpeft[generate]'.")
app.add_typer(generate_app, name="generate")


@generate_app.command("train")
def generate_train(
    config: Path = typer.Argument(..., help="YAML config (model, data, prompt, method, diffusion, train, augment)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                  help="Override a key: --set method.r=4 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (overrides output_dir)."),
    devices: int = typer.Option(1, "--devices", min=1, help="Data-parallel processes to start on this machine: "
                                "one per GPU, or CPU processes (train.batch_size stays the global batch)."),
):
    """Train the method on image + prompt pairs; writes <run>/adapter. Run again to resume."""
    from medpeft.engine.distributed import Processes
    from medpeft.generate.config import load_generate_config
    from medpeft.generate.train import generate_train as run

    overrides = list(set_ or []) + ([f"output_dir={out}"] if out else [])
    generate_config = load_generate_config(config, overrides)
    if devices > 1:
        _launch(devices, ["generate", "train", str(config), *(f"--set={o}" for o in overrides)])
        return
    metrics = run(generate_config)
    if not Processes.from_env().main:
        return
    last = metrics["history"][-1]
    console.print(f"done: {metrics['epochs_run']} epochs, train loss {last['train_loss']:.4f}"
                  + ("" if last["val_loss"] is None else f", val loss {last['val_loss']:.4f}"))


@generate_app.command("sample")
def generate_sample(
    run: str = typer.Argument(..., help="A finished generate run, a diffusers model folder or a hub id."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="A prompt (repeatable): N images of each."),
    like: Optional[str] = typer.Option(None, "--like", help="train, val or test: N images of each of the run's "
                                       "images of that split, from its prompt, with its labels (a synthetic "
                                       "dataset: prompts.csv is a labels CSV for medpeft train)."),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="Images per prompt (default 4), or with --like per "
                                    "image of the split (default 1)."),
    out: Path = typer.Option(..., "--out", help="A new folder for the PNGs and prompts.csv."),
    steps: int = typer.Option(50, "--steps", min=1, help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", min=1.0, help="Classifier-free guidance scale (1 = none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first batch's noise (batch i: seed + i)."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim or dpm (DPM-Solver++)."),
):
    """Write images as PNGs, with prompts.csv (path, prompt, seed; with --like, patient_id and labels)."""
    from medpeft.errors import ConfigError
    from medpeft.generate.sample import like_split, write_samples

    if (prompt is None) == (like is None):
        raise ConfigError("give --prompt (repeatable) or --like SPLIT, not both")
    if like is not None:
        if like not in ("train", "val", "test"):
            raise ConfigError(f"--like must be train, val or test, got {like!r}")
        prompts, columns = like_split(run, like, n or 1)
        written = write_samples(run, prompts, out, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler,
                                columns=columns)
    else:
        n = n or 4
        written = write_samples(run, [p for p in prompt for _ in range(n)], out, steps=steps, guidance=guidance,
                                seed=seed, scheduler=scheduler, batch_size=n)
    console.print(f"{written} images in {out}")


@generate_app.command("evaluate")
def generate_evaluate(
    run: Path = typer.Argument(..., help="A finished generate run."),
    extractor: Path = typer.Option(..., "--extractor", help="A finished medpeft classification run on this kind "
                                   "of image (its backbone's features, its head's label scores) or an MAE "
                                   "pretraining run (its encoder's features)."),
    n: Optional[int] = typer.Option(None, "--n", min=2, help="Generate for N test images drawn with --seed "
                                    "(default: all)."),
    steps: int = typer.Option(50, "--steps", min=1, help="Denoising steps (DDIM)."),
    guidance: float = typer.Option(7.5, "--guidance", min=1.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first batch's noise."),
):
    """FID, KID, precision / recall, memorisation (MiFID) and label fidelity of generated vs real test images;
    writes RUN/evaluations/generated/metrics.json."""
    from medpeft.generate.evaluate import generate_evaluate as run_evaluation

    result = run_evaluation(run, extractor, n=n, steps=steps, guidance=guidance, seed=seed)
    fidelity = result["label_fidelity"]
    console.print(f"{result['images']} images: FID {result['fid']:.4g}, KID {result['kid']:.4g}, precision "
                  f"{result['precision']:.3f}, recall {result['recall']:.3f}, "
                  f"copied {100 * result['copied_share']:.1f}%, "
                  f"MiFID {result['mifid']:.4g}"
                  + ("" if fidelity is None or fidelity["mean_generated"] is None
                     else f", label fidelity AUROC {fidelity['mean_generated']:.3f}"))


@generate_app.command("methods")
def generate_methods(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the generative PEFT methods (method.name of a generate config)."""
    from medpeft.console import print_listing
    from medpeft.generate.methods import GENERATIVE_METHODS

    rows = [{"name": name, "description": cls.description, "reference": cls.reference}
            for name, cls in GENERATIVE_METHODS.classes.items()]
    print_listing(rows, "generative methods", as_json, {"name": "name", "description": "description",
                                                        "reference": "reference"})
