"""The generative demo as a user runs it, timed: ``medpeft demo --generative`` into a fresh folder.

    python benchmarks/demo_generative.py [--work /tmp/demo-generative-bench] [--out benchmarks/results]

Runs ``medpeft demo --generative --out WORK`` (WORK must not exist: every step runs) in a child process with
the machine's default threads, and writes demo_generative.json and demo_generative.md: the wall time of the
whole command and of its training steps, every method's row (from its evaluation), and what was printed.
"""

from __future__ import annotations

import json
import os
import platform


def main() -> None:
    from medpeft.demo_generative import METHODS

    from demo import timed_demo  # benchmarks/demo.py, beside this script

    work, out, printed, seconds = timed_demo("/tmp/demo-generative-bench", "--generative", columns=140)
    rows = []
    for method in METHODS:
        run = work / "runs" / method
        train = json.loads((run / "metrics.json").read_text())
        evaluation = json.loads((run / "evaluations" / "generated" / "metrics.json").read_text())
        rows.append({"method": method, "trainable_percent": train["parameters"]["trainable_percent"],
                     "train_seconds": train["wall_time_s"], **{k: evaluation[k] for k in (
                         "fid", "kid", "precision", "recall", "copied_share", "label_fidelity")}})
    lines = printed.splitlines()
    record = {"command": "medpeft demo --generative --out DIR", "seconds": seconds,
              "foundation_seconds": json.loads((work / "foundation" / "metrics.json").read_text())["wall_time_s"],
              "judge_seconds": json.loads((work / "judge" / "metrics.json").read_text())["wall_time_s"],
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows,
              "printed": lines[next(i for i, line in enumerate(lines) if "Phantom hospital B" in line):]}
    (out / "demo_generative.json").write_text(json.dumps(record, indent=2))
    (out / "demo_generative.md").write_text("\n".join([
        "# The generative demo, timed", "",
        f"`python benchmarks/demo_generative.py`: `medpeft demo --generative` from nothing on {os.cpu_count()} CPU "
        f"cores (default threads): {seconds / 60:.1f} min in all; the foundation "
        f"{record['foundation_seconds'] / 60:.1f} min, the judge {record['judge_seconds'] / 60:.1f} min, "
        f"the 8 methods' training {sum(r['train_seconds'] for r in rows) / 60:.1f} min summed.", "",
        "What it printed:", "", "```",
        *record["printed"], "```", ""]))
    print(printed)


if __name__ == "__main__":
    main()
