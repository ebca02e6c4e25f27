"""``medpeft tune``: search a run config's hyperparameters with Optuna (medpeft.train.tune)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medpeft.cli.app import app, console


@app.command()
def tune(
    config: Path = typer.Argument(..., help="YAML run config (output_dir not needed); its `tune` section, "
                                  "{trials: N, space: {...}}, is read by this command alone."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Trials to complete or prune (default: "
                                         "the config's tune.trials)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Tune directory (default: tune-runs/<config stem>)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                  help="Override a key of the run config: --set "
                                             "train.epochs=5 (repeatable)."),
    space: Optional[List[str]] = typer.Option(None, "--space", metavar="KEY=SPEC",
                                  help="Change the search space: KEY=\\[float, LOW, "
                                              "HIGH, LOG], KEY=\\[int, LOW, HIGH], KEY=\\[categorical, \\[A, B]], "
                                              "or KEY=null to drop a key (repeatable)."),
):
    """Search the hyperparameters of CONFIG's method (trial 0: CONFIG as given; then TPE with median pruning,
    on val AUROC), write the best as a runnable config; an interrupted search resumes."""
    from rich import box
    from rich.table import Table

    from medpeft.errors import ConfigError
    from medpeft.metrics.display import format_score
    from medpeft.train.tune import BEST, format_params, load_tune_config, parse_space, tune as run_tune

    run_config, options = load_tune_config(config, list(set_ or []))
    trials = trials or options.trials
    if trials is None:
        raise ConfigError(f"{config}: give the number of trials: --trials N (or tune.trials in the file)")
    out = out or Path("tune-runs") / config.stem
    summary = run_tune(run_config, out, trials, {**options.space, **parse_space(list(space or []))})
    view = Table(title=f"{out}: val mean AUROC of each trial", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("trial", "state", "val AUROC", "params"):
        view.add_column(name, justify="right" if name != "params" else "left")
    for row in summary["trials"]:
        tag = " (default)" if row.get("default") else f" (retry of {row['retry_of']})" if "retry_of" in row else ""
        view.add_row(f"{row['number']}{tag}", row["state"], format_score(row["value"]), format_params(row["params"]))
    console.print(view)
    best, difference = summary["best"], summary["difference"]
    console.print(f"best: trial {best['number']}, val AUROC {format_score(best['value'])}"
                  + ("" if difference is None else f" ({difference:+.4f} over the default)"))
    console.print(f"best config: {out / BEST} (medpeft train {out / BEST})")
