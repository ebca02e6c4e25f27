"""``medpeft study``: run a grid of runs from a study file and report it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medpeft.cli.app import _exit, app, console

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
