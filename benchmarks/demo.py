"""The demo as a user runs it, timed: ``medpeft demo`` into a fresh folder, then its table and verdicts.

    python benchmarks/demo.py [--work /tmp/demo-bench] [--out benchmarks/results]

Runs ``medpeft demo --out WORK`` (WORK must not exist: every step runs) in a child process with the
machine's default threads, and writes demo.json and demo.md: the wall time of the whole command and of
its steps (phantoms, MAE pretraining, the study's cells), the table, what was printed, and the machine
(medpeft.engine.runtime.numerics: what else the numbers depend on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from medpeft.engine.runtime import numerics

ROOT = Path(__file__).resolve().parents[1]


def table_record(comparison: pd.DataFrame) -> dict:
    """The demo's table from the report's comparison.csv: {method: {fraction column: test mean AUROC (points)}}
    (tests/test_demo.py compares a fresh demo's table with it where the CPU's kernels are the same)."""
    means = comparison.set_index("method").filter(like=":mean")
    return {method: {column.removesuffix(":mean"): value for column, value in row.items()}
            for method, row in means.iterrows()}


def timed_demo(default_work: str, *options: str, columns: int) -> tuple[Path, Path, str, float]:
    """Parse --work and --out, run ``medpeft demo [OPTIONS] --out WORK`` from nothing (WORK must not exist) in
    a child process `columns` wide; return WORK, the results folder, what it printed and its seconds."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=default_work, help="A folder that does not exist yet.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    work = Path(args.work)
    if work.exists():
        raise SystemExit(f"{work} exists: the benchmark times a demo from nothing")
    start = time.perf_counter()
    printed = subprocess.run([sys.executable, "-m", "medpeft", "demo", *options, "--out", str(work)], cwd=ROOT,
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": str(columns)}).stdout
    return work, Path(args.out), printed, time.perf_counter() - start


def main() -> None:
    work, out, printed, seconds = timed_demo("/tmp/demo-bench", columns=120)
    print(printed)

    results = pd.read_csv(work / "study" / "report" / "results.csv")
    comparison = pd.read_csv(work / "study" / "report" / "comparison.csv")
    mae = json.loads((work / "mae" / "metrics.json").read_text())
    lines = printed.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if "Phantom X-rays" in line):]
    record = {
        "command": "medpeft demo --out DIR", "seconds": seconds, "mae_seconds": mae["wall_time_s"],
        "cells_seconds_summed": float(results["wall_time_s"].sum()), "cells": len(results),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "machine": {**numerics(), "platform": platform.platform()},
        "table": table_record(comparison),
        "printed": table,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    text = "\n".join([
        "# The demo, timed", "",
        f"`python benchmarks/demo.py`: `medpeft demo` from nothing on {record['machine']['cpus']} CPU cores "
        f"({record['threads']} threads): {seconds / 60:.1f} min in all; MAE pretraining "
        f"{mae['wall_time_s'] / 60:.1f} min; the study's {len(results)} cells "
        f"{record['cells_seconds_summed'] / 60:.1f} min of process time summed (2 at a time).", "",
        "What it printed:", "", "```", *table, "```", ""])
    (out / "demo.md").write_text(text)


if __name__ == "__main__":
    main()
