"""Start-up cost of the command line: wall time and peak memory of commands that answer without training.

    python benchmarks/cli_startup.py [--before REV] [--rounds 5] [--out benchmarks/results]

Each command runs `--rounds` times as ``python -m medpeft ...`` in a fresh process; the figures are the
median wall time (s) and the median peak resident memory (MB, the child's own ru_maxrss from os.wait4).
With ``--before REV`` the same commands also run on the source of git revision REV (checked out in a
temporary worktree, put first on PYTHONPATH, same interpreter and packages), alternating with the
working tree's, so both columns share the machine's load; the table gives after / before ratios.
Writes cli_startup.json and cli_startup.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["--help"], ["train", "--help"], ["study", "--help"], ["models"], ["methods"]]


def measure(args: list[str], src: Path) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one ``python -m medpeft ARGS`` with `src` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "100"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "medpeft", *args], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"medpeft {' '.join(args)} exited {process.returncode}: {process.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="A git revision to compare against.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"after": ROOT / "src"}
        if args.before:
            subprocess.run(["git", "worktree", "add", "--detach", "-q", f"{tmp}/before", args.before], cwd=ROOT,
                           check=True)
            sources["before"] = Path(tmp) / "before" / "src"
        try:
            runs = {side: {" ".join(c): [] for c in COMMANDS} for side in sources}
            for _ in range(args.rounds):
                for command in COMMANDS:
                    for side, src in sources.items():
                        runs[side][" ".join(command)].append(measure(command, src))
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", f"{tmp}/before"], cwd=ROOT, check=True)
    rows = []
    for command in runs["after"]:
        row = {"command": f"medpeft {command}"}
        for side in sources:
            row[f"{side}_s"] = statistics.median(s for s, _ in runs[side][command])
            row[f"{side}_mb"] = statistics.median(m for _, m in runs[side][command])
        rows.append(row)
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rounds": args.rounds,
              "before": args.before, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                 "python": platform.python_version()}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cli_startup.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    before = result["before"]
    head = ["command", "after: s", "after: MB"] + (["before: s", "before: MB", "time after/before",
                                                     "memory after/before"] if before else [])
    lines = ["# Command-line start-up", "",
             f"`python benchmarks/{result['command']}`: median of {result['rounds']} fresh processes per "
             f"command, {result['machine']['cpus']} CPUs, Python {result['machine']['python']}"
             + (f"; before = revision {before}, run alternately with the working tree." if before else "."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [row["command"], f"{row['after_s']:.2f}", f"{row['after_mb']:.0f}"]
        if before:
            cells += [f"{row['before_s']:.2f}", f"{row['before_mb']:.0f}", f"{row['after_s'] / row['before_s']:.2f}",
                      f"{row['after_mb'] / row['before_mb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
