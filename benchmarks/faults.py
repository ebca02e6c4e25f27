"""Fault-injection battery: what the `medpeft` command line does when its configs, CSVs, images, run
folders, processes and disks go wrong.

    python benchmarks/faults.py [--jobs 2] [--only 4.,6.1] [--work DIR] [--out benchmarks/results]

Every case runs the real command line (``python -m medpeft ...`` in subprocesses, one thread each, their
own XDG_CACHE_HOME) on data this script writes into a temp folder: the 64 40x40 PNGs of squares of
tests/conftest.py (write_squares_dataset), its tiny ViT (TINY_VIT), LoRA r 4, 2 epochs of batch 8, a log
record per step. A case passes when every part of its expected behaviour holds; in general a user's
mistake is exit 2 with exactly one stderr line ``error: ...`` naming the file, row or key, nothing is
left half-written, and a killed or interrupted command run again finishes with the metrics of an
uninterrupted run of the same config (training is deterministic on the CPU). Cases:

     1  bad configs          2  bad CSVs              3  bad images in the dataset
     4  bad files in a run   5  bad predict inputs    6  kill -9 of train and study run
     7  Ctrl-C               8  two runners, one folder; a killed holder's lock
     9  read-only and full disks (tmpfs mounts: root only, else skipped with the reason)
    10  studies: a failing cell, a damaged store, bad cell names, markup in names and labels
    11  checkpoints given as model.weights that would run code when unpickled

Cases run `--jobs` at a time (none of them measures time: kills wait for files to appear). Writes
faults.md (the summary, then the table case | expected | observed | pass | seconds) and faults.json;
exits 1 when a case fails.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import TINY_VIT, write_squares_dataset

from medpeft.config import merge_dicts
from medpeft.files import LOCK, write_json_atomic, write_text_atomic

EPOCHS, STEPS_PER_EPOCH = 2, 4  # 32 training images (half of 64) in batches of 8
SENTINEL = "SENTINEL"
"""The file that the malicious pickles would create (in the work folder) if they ever ran."""
BOMB_SIDE = 20000
"""A 1-bit PNG of this side is ~50 KB on disk and 400 million pixels: over PIL's decompression-bomb limit."""
XSS = "<img src=x onerror=alert(1)>"


# ----------------------------------------------------------------------------- running the command line
@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        """The non-blank stderr lines."""
        return [line for line in self.err.splitlines() if line.strip()]

    def said(self) -> str:
        last = self.lines[-1] if self.lines else "(no stderr)"
        return f"exit {self.rc}: {last}"


class Skip(Exception):
    """The case cannot run here (the reason is recorded)."""


class Seen:
    """What a case observed: notes, and the parts of its expected behaviour that did not hold."""

    def __init__(self):
        self.notes: list[str] = []
        self.failures: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def check(self, ok: bool, failure: str) -> bool:
        if not ok:
            self.failures.append(failure)
        return ok

    def error_line(self, result: Result, *names: str, code: int = 2) -> None:
        """Exit `code` with exactly one stderr line, starting 'error:' and naming each of `names`."""
        self.note(result.said())
        self.check(result.rc == code, f"exit {result.rc}, expected {code}")
        if not self.check(len(result.lines) == 1, f"{len(result.lines)} stderr lines, expected 1"
                                                  + (f" (first: {result.lines[0][:300]})" if result.lines else "")):
            return
        line = result.lines[0]
        self.check(line.startswith("error:"), "the line does not start with 'error:'")
        for name in names:
            self.check(name in line, f"the line does not name {name!r}")


def step_numbers(run: Path) -> list[int]:
    """The step numbers of log.jsonl's step records (a line being written is ignored)."""
    steps = []
    try:
        text = (run / "log.jsonl").read_text()
    except FileNotFoundError:
        return steps
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "step":
            steps.append(record["step"])
    return steps


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


# ----------------------------------------------------------------------------- the lab: data, runs, mounts
class Lab:
    """The work folder: generated data, configs, the reference run, and how to call medpeft there."""

    def __init__(self, work: Path):
        self.work = work
        self.squares_csv = write_squares_dataset(work / "squares")
        self.env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"), OMP_NUM_THREADS="1", COLUMNS="200")
        self._locks: dict[str, threading.Lock] = {}
        self._made: dict[str, object] = {}
        self._guard = threading.Lock()

    # -- commands
    def command(self, *args) -> list[str]:
        return [sys.executable, "-m", "medpeft", *map(str, args)]

    def run(self, *args, timeout: float = 600) -> Result:
        proc = subprocess.run(self.command(*args), check=False, cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def start(self, *args) -> subprocess.Popen:
        """A medpeft process in its own session (a signal to its group reaches it as a Ctrl-C would)."""
        return subprocess.Popen(self.command(*args), cwd=self.work, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def signal_when(self, args, ready: Callable[[], bool], sig: int = signal.SIGKILL,
                    group: bool = False) -> tuple[Result, bool]:
        """Start `medpeft ARGS`, send `sig` as soon as `ready()` (to its process group with `group`, as a
        terminal's Ctrl-C does); (its result, whether it was still running when signalled)."""
        proc = self.start(*args)
        while proc.poll() is None and not ready():
            time.sleep(0.005)
        hit = proc.poll() is None
        if hit:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        out, err = proc.communicate(timeout=600)
        return Result(proc.returncode, out, err), hit

    # -- files
    def folder(self, name: str) -> Path:
        path = self.work / "cases" / name
        path.mkdir(parents=True)
        return path

    def config(self, **changes) -> dict:
        """The reference run config (without output_dir), with `changes` merged in section by section."""
        base = {
            "model": dict(TINY_VIT),
            "data": {"csv": str(self.squares_csv), "patient_column": "patient", "labels": ["bright", "dark"],
                     "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"epochs": EPOCHS, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0.5, "log_every_steps": 1},
        }
        return merge_dicts(base, changes)

    def write_config(self, path: Path, config: dict) -> Path:
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def once(self, name: str, make: Callable[[], object]):
        """`make()`'s result, made once however many cases ask at the same time."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._made:
                self._made[name] = make()
            return self._made[name]

    def copy_run(self, name: str, source: Path) -> Path:
        """A copy of run folder `source`; an unfinished run's config.yaml names the copy as its output_dir (a
        moved unfinished run is refused as another config's: medpeft compares output_dir too)."""
        target = self.work / "cases" / name / "run"
        shutil.copytree(source, target)
        if not (target / "metrics.json").exists():
            config = target / "config.yaml"
            config.write_text(config.read_text().replace(str(source), str(target)))
        return target

    # -- the reference run and an unfinished one
    @property
    def base_config(self) -> Path:
        return self.once("base_config", lambda: self.write_config(self.work / "config.yaml", self.config()))

    def fixed(self) -> tuple[Path, Result, Result]:
        """Case 1.18's runs, made once: (the run folder, the refused command, the same command fixed)."""
        return self.once("fixed", lambda: _fixed_config_run(self))

    def reference(self) -> tuple[Path, dict]:
        """The finished reference run (case 1.18's fixed command) and its metrics.json."""
        run = self.fixed()[0]
        if not (run / "metrics.json").is_file():
            raise RuntimeError("the reference run did not finish (case 1.18)")
        return run, json.loads((run / "metrics.json").read_text())

    def unfinished(self) -> Path:
        """A run of the reference config killed (-9) right after its first checkpoint.pt was written."""
        def make():
            run = self.work / "unfinished"
            result, hit = self.signal_when(["train", self.base_config, "--out", run],
                                           lambda: (run / "checkpoint.pt").is_file())
            if not (hit and (run / "checkpoint.pt").is_file() and not (run / "metrics.json").exists()):
                raise RuntimeError(f"could not kill a run after its first checkpoint ({result.said()})")
            return run
        return self.once("unfinished", make)

    # -- images
    @property
    def bomb(self) -> Path:
        def make():
            path = self.work / "bomb.png"
            Image.new("1", (BOMB_SIDE, BOMB_SIDE)).save(path)
            return path
        return self.once("bomb", make)

    # -- mounts
    @cached_property
    def mount_problem(self) -> str:
        """'' if this process may mount a tmpfs, else why not."""
        trial = self.work / "mount-trial"
        trial.mkdir(exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(trial)], check=False,
                              capture_output=True, text=True)
        if done.returncode:
            return f"cannot mount a tmpfs here (uid {os.getuid()}: {done.stderr.strip() or done.returncode})"
        subprocess.run(["umount", str(trial)], check=True)
        return ""

    def mount(self, path: Path, options: str) -> None:
        if self.mount_problem:
            raise Skip(self.mount_problem)
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)

    def unmount(self, path: Path) -> None:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)


def same_metrics(seen: Seen, metrics_path: Path, reference: dict) -> None:
    if not seen.check(metrics_path.is_file(), f"no {metrics_path.name} after the rerun"):
        return
    metrics = json.loads(metrics_path.read_text())
    for key in ("val", "test", "best_epoch", "epochs_run"):
        seen.check(metrics.get(key) == reference.get(key), f"metrics.json's {key} differs from the uninterrupted run's")
    seen.note(f"test AUROC {metrics['test']['mean_auroc']:.6f} (uninterrupted: {reference['test']['mean_auroc']:.6f})")


def finished_cleanly(seen: Seen, run: Path, result: Result, reference: dict) -> None:
    """A rerun that finished: exit 0, the reference metrics, one log record per step, no temporaries."""
    seen.check(result.rc == 0, f"rerun {result.said()}")
    same_metrics(seen, run / "metrics.json", reference)
    steps = step_numbers(run)
    expected = list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    seen.check(steps == expected, f"log.jsonl's steps are {steps}, expected {expected}")
    left = temporaries(run)
    seen.check(not left, f"temporaries left: {left}")


# ----------------------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    expected: str
    run: Callable[[Lab, Seen], None]


@dataclass
class Row:
    case: str
    expected: str
    observed: str = ""
    passed: bool | None = None
    """None: skipped (observed says why)."""
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


CASES: list[Case] = []


def case(id: str, expected: str):
    def register(run):
        CASES.append(Case(id, expected, run))
        return run
    return register


# 1. Bad configs ---------------------------------------------------------------
ONE_LINE = "exit 2, one stderr line 'error:' naming {}, no run folder"
BAD_CONFIGS = [  # id, what, YAML changes, --set overrides, the name the line must give
    ("1.01", "unknown key train.lrr", {"train": {"lrr": 0.1}}, [], "train.lrr"),
    ("1.02", "wrong type train.epochs: two", {"train": {"epochs": "two"}}, [], "train.epochs"),
    ("1.03", "--set method.r=-3", {}, ["method.r=-3"], "method.r"),
    ("1.04", "--set data.mean=[a,b,c]", {}, ["data.mean=[a,b,c]"], "data.mean"),
    ("1.05", "--set data.mean=[.nan,0.5,0.5]", {}, ["data.mean=[.nan,0.5,0.5]"], "data.mean"),
    ("1.06", "--set data.num_workers=-1", {}, ["data.num_workers=-1"], "data.num_workers"),
    ("1.07", "--set augment.scale=[2,1]", {}, ["augment.scale=[2,1]"], "augment.scale"),
    ("1.08", "--set train.min_lr=-5", {}, ["train.min_lr=-5"], "train.min_lr"),
    ("1.09", "--set model.img_size=30 (patch 8)", {}, ["model.img_size=30"], "model.img_size"),
    ("1.10", "data.label_delimiter: '' in the YAML", {"data": {"label_column": "findings", "label_delimiter": ""}},
     [], "data.label_delimiter"),
    ("1.11", "--set data.encoding=nope", {}, ["data.encoding=nope"], "data.encoding"),
    ("1.12", "data.views without data.view_column (csv)", {"data": {"views": ["PA"]}}, [], "data.views"),
    ("1.13", "data.format: nih with an unknown label", {"data": {"format": "nih", "labels": ["Nodules"],
                                                                "patient_column": None}}, [], "data.labels"),
]


def _bad_config(id: str, changes: dict, overrides: list[str], name: str):
    def run(lab: Lab, seen: Seen) -> None:
        folder = lab.folder(id)
        config = lab.config(**changes)
        if config["data"].get("patient_column") is None:
            config["data"].pop("patient_column")
        path = lab.write_config(folder / "config.yaml", config)
        result = lab.run("train", path, *[f"--set={o}" for o in overrides], "--out", folder / "run")
        seen.error_line(result, name)
        seen.check(not (folder / "run").exists(), "a run folder was created")
    return run


for _id, _what, _changes, _overrides, _name in BAD_CONFIGS:
    case(f"{_id} {_what}", ONE_LINE.format(_name))(_bad_config(_id, _changes, _overrides, _name))

BAD_FILES = [  # id, what, the file's text (None: no file)
    ("1.14", "YAML syntax error", "model: {name: [vit\ndata: x\n"),
    ("1.15", "config file missing", None),
    ("1.16", "empty config file", ""),
    ("1.17", "a YAML list instead of a mapping", "- model\n- data\n"),
]


def _bad_file(id: str, text: str | None):
    def run(lab: Lab, seen: Seen) -> None:
        folder = lab.folder(id)
        path = folder / "config.yaml"
        if text is not None:
            path.write_text(text)
        result = lab.run("train", path, "--out", folder / "run")
        seen.error_line(result, str(path))
        seen.check(not (folder / "run").exists(), "a run folder was created")
    return run


for _id, _what, _text in BAD_FILES:
    case(f"{_id} {_what}", ONE_LINE.format("the file"))(_bad_file(_id, _text))


def _fixed_config_run(lab: Lab) -> tuple[Path, Result, Result]:
    """train.min_lr: -5 in the YAML is refused; the same command after fixing the file makes the reference run."""
    folder = lab.work / "reference"
    folder.mkdir()
    path = lab.write_config(folder / "config.yaml", lab.config(train={"min_lr": -5}))
    run = folder / "run"
    bad = lab.run("train", path, "--out", run)
    lab.write_config(path, lab.config())
    good = lab.run("train", path, "--out", run)
    return run, bad, good


@case("1.18 train.min_lr: -5 in the YAML, then fixed", "exit 2 naming train.min_lr, no run folder; the same "
      "command after fixing the file: exit 0, metrics.json")
def _fixed(lab: Lab, seen: Seen) -> None:
    run, bad, good = lab.fixed()
    seen.error_line(bad, "train.min_lr")
    seen.note(f"then {good.said()}")
    seen.check(good.rc == 0, f"after the fix: {good.said()}")
    seen.check((run / "metrics.json").is_file(), "after the fix: no metrics.json")


# 2. Bad CSVs --------------------------------------------------------------------
def _csv_case(id: str, edit: Callable[[pd.DataFrame, Path], tuple[str | bytes | None, dict]],
              names: Callable[[Path], list[str]]):
    """A labels CSV made by `edit` (the squares table -> the file's content, config data changes)."""
    def run(lab: Lab, seen: Seen) -> None:
        folder = lab.folder(id)
        csv = folder / "labels.csv"
        table = pd.read_csv(lab.squares_csv, dtype=str)
        content, data = edit(table, csv)
        if content is not None:
            csv.write_bytes(content.encode() if isinstance(content, str) else content)
        config = lab.config(data={"csv": str(csv), "image_root": str(lab.squares_csv.parent), **data})
        result = lab.run("train", lab.write_config(folder / "config.yaml", config), "--out", folder / "run")
        seen.error_line(result, *names(csv))
        seen.check(not (folder / "run").exists(), "a run folder was created")
    return run


def _latin1(table, csv):
    table.loc[4, "patient"] = "Zoë"
    return table.to_csv(index=False).encode("latin-1"), {}


def _duplicate(table, csv):
    extra = table.iloc[[1]].assign(patient="p99")
    return pd.concat([table, extra]).to_csv(index=False), {}


def _label_names(table, csv):
    table["findings"] = ["|".join(n for n, v in (("bright", b), ("dark", d)) if v == "1") or "No Finding"
                         for b, d in zip(table["bright"], table["dark"])]
    table.loc[6, "findings"] = "brigth"
    return table.drop(columns=["bright", "dark"]).to_csv(index=False), {"label_column": "findings"}


def _not_binary(table, csv):
    table.loc[9, "dark"] = "2"
    return table.to_csv(index=False), {}


def _empty_path(table, csv):
    table.loc[3, "path"] = ""
    return table.to_csv(index=False), {}


def _two_splits(table, csv):
    table["split"] = ["train" if i < 40 else "val" if i < 52 else "test" for i in range(len(table))]
    table.loc[1, "split"] = "val"  # patient p0's second image
    return table.to_csv(index=False), {"split": {"column": "split"}}


BAD_CSVS = [
    ("2.01", "latin-1 text without data.encoding", _latin1, lambda c: [str(c), "line 6", "byte"]),
    ("2.02", "an image on two rows", _duplicate, lambda c: [str(c), "row 66", "row 3", "'p0'", "'p99'"]),
    ("2.03", "an unknown label name in data.label_column", _label_names, lambda c: [str(c), "row 8", "'findings'"]),
    ("2.04", "a 2 in a 0/1 label column", _not_binary, lambda c: [str(c), "row 11", "'dark'"]),
    ("2.05", "a label column missing", lambda t, c: (t.drop(columns="dark").to_csv(index=False), {}),
     lambda c: [str(c), "'dark'"]),
    ("2.06", "an empty file", lambda t, c: ("", {}), lambda c: [str(c)]),
    ("2.07", "a header-only file", lambda t, c: (",".join(t.columns) + "\n", {}), lambda c: [str(c)]),
    ("2.08", "an empty path cell", _empty_path, lambda c: [str(c), "row 5", "'path'"]),
    ("2.09", "a patient in two splits of a split column", _two_splits, lambda c: [str(c), "'p0'", "'split'"]),
]
for _id, _what, _edit, _names in BAD_CSVS:
    case(f"{_id} {_what}", "exit 2, one stderr line 'error:' naming the file and the row / column (or patient), "
         "no run folder")(_csv_case(_id, _edit, _names))


# 3. Bad images ------------------------------------------------------------------
def _bad_images(lab: Lab) -> tuple[Path, list[str]]:
    """The squares dataset plus one row per kind of unusable image: (labels.csv, the bad file names)."""
    def make():
        import pydicom
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        folder = lab.work / "bad-images"
        shutil.copytree(lab.squares_csv.parent, folder)
        good = (folder / "img000.png").read_bytes()
        (folder / "truncated.png").write_bytes(good[:len(good) // 2])
        (folder / "zero.png").write_bytes(b"")
        rgba = np.full((40, 40, 4), 120, np.uint8)
        rgba[:10, :10, 3] = 0
        Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
        frames = [Image.fromarray(np.full((40, 40), v, np.uint8)) for v in (50, 150)]
        frames[0].save(folder / "frames.tiff", save_all=True, append_images=frames[1:])
        Image.fromarray(np.full((4, 4), 100, np.uint8)).save(folder / "tiny.png")
        shutil.copy(lab.bomb, folder / "bomb.png")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.Modality, ds.PatientID = meta, "DX", "p-dcm"
        ds.save_as(folder / "nopixels.dcm", enforce_file_format=True)
        assert "PixelData" not in pydicom.dcmread(folder / "nopixels.dcm")
        (folder / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
        bad = ["missing.png", "truncated.png", "zero.png", "rgba.png", "frames.tiff", "tiny.png", "bomb.png",
               "nopixels.dcm", "garbage.dcm"]
        table = pd.read_csv(folder / "labels.csv", dtype=str)
        rows = pd.DataFrame({"path": bad, "patient": [f"bad{i}" for i in range(len(bad))], "bright": "1", "dark": "0"})
        pd.concat([table, rows]).to_csv(folder / "labels.csv", index=False)
        return folder / "labels.csv", bad
    return lab.once("bad-images", make)


@case("3.1 nine unusable images, data.on_missing error", "exit 2, one stderr line listing all nine with reasons, "
      "no run folder")
def _images_error(lab: Lab, seen: Seen) -> None:
    csv, bad = _bad_images(lab)
    folder = lab.folder("3.1")
    config = lab.write_config(folder / "config.yaml", lab.config(data={"csv": str(csv)}))
    result = lab.run("train", config, "--out", folder / "run")
    seen.error_line(result, str(csv), *[f"{name}: " for name in bad])
    seen.check(not (folder / "run").exists(), "a run folder was created")


@case("3.2 the same with --on-missing skip", "exit 0, each unusable image named on stderr with its reason, "
      "none of them in split.csv")
def _images_skip(lab: Lab, seen: Seen) -> None:
    csv, bad = _bad_images(lab)
    folder = lab.folder("3.2")
    config = lab.write_config(folder / "config.yaml", lab.config(data={"csv": str(csv)}, train={"epochs": 1}))
    result = lab.run("train", config, "--out", folder / "run", "--on-missing", "skip")
    seen.note(result.said())
    seen.check(result.rc == 0, f"{result.said()}")
    named = [name for name in bad if f"{name}: " in result.err]
    seen.check(len(named) == len(bad), f"stderr names {len(named)} of the {len(bad)} with a reason")
    if seen.check((folder / "run" / "split.csv").is_file(), "no split.csv"):
        ids = set(pd.read_csv(folder / "run" / "split.csv", dtype=str)["image_id"])
        seen.check(not ids & set(bad), f"split.csv holds {sorted(ids & set(bad))}")
        seen.note(f"split.csv: {len(ids)} images")


@case("3.3 data.alpha=flatten", "the RGBA image with transparent pixels is used (in split.csv); the other eight "
      "skipped")
def _images_flatten(lab: Lab, seen: Seen) -> None:
    csv, bad = _bad_images(lab)
    folder = lab.folder("3.3")
    config = lab.write_config(folder / "config.yaml", lab.config(data={"csv": str(csv), "alpha": "flatten"},
                                                                 train={"epochs": 1}))
    result = lab.run("train", config, "--out", folder / "run", "--on-missing", "skip")
    seen.note(result.said())
    seen.check(result.rc == 0, f"{result.said()}")
    if seen.check((folder / "run" / "split.csv").is_file(), "no split.csv"):
        ids = set(pd.read_csv(folder / "run" / "split.csv", dtype=str)["image_id"])
        seen.check(ids & set(bad) == {"rgba.png"}, f"of the nine, split.csv holds {sorted(ids & set(bad))}")


# 4. Bad files in run folders -----------------------------------------------------
def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(2048))


def _zero(path: Path) -> None:
    path.write_bytes(b"")


class _Touch:
    """Unpickling this runs os.system('touch SENTINEL')."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def _potent(path: Path, load: Callable[[Path], object]) -> None:
    """Check that loading the file at `path` with `load` (no safeguard) does run its code, then undo that."""
    sentinel = path.parent / SENTINEL
    load(path)
    if not sentinel.exists():
        raise RuntimeError(f"{path}: the malicious pickle did not run when loaded plainly")
    sentinel.unlink()


def _evil_pickle(path: Path) -> None:
    """A plain pickle (what torch.load reads when the file is not a zip) whose unpickling runs a command."""
    path.write_bytes(pickle.dumps({"state": _Touch(path.parent / SENTINEL)}, protocol=2))
    _potent(path, lambda p: pickle.loads(p.read_bytes()))


def _evil_torch(path: Path) -> None:
    """A torch.save zip whose pickle runs a command when torch.load(weights_only=False) reads it."""
    torch.save({"model": _Touch(path.parent / SENTINEL)}, path)
    _potent(path, lambda p: torch.load(p, weights_only=False))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _nan_weights(path: Path) -> None:
    tensors = load_file(str(path))
    name = min(tensors)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path))


def _not_yaml(path: Path) -> None:
    path.write_text("model: {name: [vit\n  : : :\n")


COMMANDS = {  # command -> (its arguments for run folder RUN and a folder F of the case, what it must not leave)
    "train": lambda lab, run, f: (["train", lab.base_config, "--out", run], [run / "metrics.json"]),
    "evaluate": lambda lab, run, f: (["evaluate", run], []),
    "predict": lambda lab, run, f: (["predict", run, lab.squares_csv.parent / "img000.png", "--out", f / "x.csv"],
                                    [f / "x.csv"]),
    "export": lambda lab, run, f: (["export", run, "--out", f / "export"], [f / "export"]),
}
RUN_FILES = [  # id, what, which run (finished / unfinished), the file, the damage, the commands
    ("4.01", "a zero-byte checkpoint.pt", "unfinished", "checkpoint.pt", _zero, ["train"]),
    ("4.02", "a checkpoint.pt of garbage bytes", "unfinished", "checkpoint.pt", _garbage, ["train"]),
    ("4.03", "a checkpoint.pt pickle that runs code", "unfinished", "checkpoint.pt", _evil_pickle, ["train"]),
    ("4.04", "truncated weights safetensors", "finished", "weights/*.safetensors", _truncate,
     ["evaluate", "predict", "export"]),
    ("4.05", "NaN in the weights", "finished", "weights/*.safetensors", _nan_weights, ["predict", "evaluate"]),
    ("4.06", "metrics.json not JSON", "finished", "metrics.json", _garbage, ["evaluate", "export"]),
    ("4.07", "thresholds.json not JSON", "finished", "thresholds.json", _garbage, ["predict", "export"]),
    ("4.08", "split.csv of garbage bytes", "finished", "split.csv", _garbage, ["evaluate"]),
    ("4.09", "split.csv of garbage bytes, resumed", "unfinished", "split.csv", _garbage, ["train"]),
    ("4.10", "config.yaml not YAML", "finished", "config.yaml", _not_yaml, ["predict", "evaluate"]),
    ("4.11", "config.yaml not YAML, resumed", "unfinished", "config.yaml", _not_yaml, ["train"]),
]


def _damaged_run(id: str, which: str, pattern: str, damage: Callable[[Path], None], commands: list[str]):
    def run(lab: Lab, seen: Seen) -> None:
        for command in commands:
            folder = lab.work / "cases" / f"{id}-{command}"
            run_dir = lab.copy_run(f"{id}-{command}", lab.unfinished() if which == "unfinished" else lab.reference()[0])
            target = min(run_dir.glob(pattern))
            damage(target)
            before = target.read_bytes()
            args, absent = COMMANDS[command](lab, run_dir, folder)
            result = lab.run(*args)
            part = Seen()
            part.error_line(result, str(target))
            for path in absent:
                part.check(not path.exists(), f"{path.name} was written")
            part.check(not temporaries(run_dir), f"temporaries left: {temporaries(run_dir)}")
            part.check(target.read_bytes() == before, f"{target.name} was changed")
            part.check(not (run_dir / SENTINEL).exists(), "the pickle ran: SENTINEL exists")
            seen.notes += [f"{command}: {n}" for n in part.notes]
            seen.failures += [f"{command}: {f}" for f in part.failures]
    return run


for _id, _what, _which, _pattern, _damage, _commands in RUN_FILES:
    case(f"{_id} {_what} ({', '.join(_commands)})",
         "exit 2, one stderr line 'error:' naming the damaged file; nothing written (no x.csv, no export "
         "folder, no metrics.json, no temporaries)" + ("; the code never runs" if "pickle" in _what else ""))(
        _damaged_run(_id, _which, _pattern, _damage, _commands))


# 5. Predict inputs --------------------------------------------------------------
@case("5.1 predict: a decompression-bomb PNG among good images", "exit 0, the CSV written, the bomb's row has "
      "its error and no probabilities, the others theirs")
def _predict_bomb(lab: Lab, seen: Seen) -> None:
    folder = lab.folder("5.1")
    images = [lab.squares_csv.parent / "img000.png", lab.bomb, lab.squares_csv.parent / "img001.png"]
    result = lab.run("predict", lab.reference()[0], *images, "--out", folder / "x.csv")
    seen.note(result.said())
    seen.check(result.rc == 0, result.said())
    if seen.check((folder / "x.csv").is_file(), "no CSV"):
        table = pd.read_csv(folder / "x.csv", keep_default_na=False)
        errors = table["error"].tolist()
        seen.check(len(table) == 3 and bool(errors[1]) and not errors[0] and not errors[2],
                   f"error column {errors}")
        seen.check(table["prob:bright"].tolist()[1] == "" and table["prob:bright"].tolist()[0] != "",
                   "probabilities of the bomb's row, or none for a good one")
        seen.note(f"bomb row: {errors[1][:120]}")


@case("5.2 predict --strict with the bomb", "exit non-zero, one stderr line 'error:' naming the bomb, no CSV")
def _predict_strict(lab: Lab, seen: Seen) -> None:
    folder = lab.folder("5.2")
    images = [lab.squares_csv.parent / "img000.png", lab.bomb]
    result = lab.run("predict", lab.reference()[0], *images, "--out", folder / "x.csv", "--strict")
    seen.error_line(result, str(lab.bomb))
    seen.check(not (folder / "x.csv").exists(), "the CSV was written")


# 6. Kills -------------------------------------------------------------------------
def _late(run: Path) -> bool:
    return max(step_numbers(run), default=0) >= EPOCHS * STEPS_PER_EPOCH - 1


KILL_POINTS = [  # id, when, ready(run folder)
    ("6.1", "right after start (its .lock appears)", lambda run: (run / LOCK).is_file()),
    ("6.2", "after the first step record in log.jsonl", lambda run: bool(step_numbers(run))),
    ("6.3", "after the first checkpoint.pt appears", None),
    ("6.4", "late in training (step 7 of 8 logged)", _late),
]
RERUN = ("the same command run again: exit 0, metrics equal to the uninterrupted run's, one log.jsonl record "
         "per step, no temporaries")


def _kill(id: str, ready):
    def run(lab: Lab, seen: Seen) -> None:
        reference = lab.reference()[1]
        if ready is None:  # the unfinished run is killed there
            run_dir = lab.copy_run(id, lab.unfinished())
            seen.note(f"killed with steps {step_numbers(run_dir)} logged")
        else:
            run_dir = lab.work / "cases" / id / "run"
            run_dir.parent.mkdir(parents=True)
            result, hit = lab.signal_when(["train", lab.base_config, "--out", run_dir], lambda: ready(run_dir))
            seen.check(hit and result.rc == -signal.SIGKILL, f"not killed in time ({result.said()})")
            seen.note(f"killed with steps {step_numbers(run_dir)} logged")
        seen.check(not (run_dir / "metrics.json").exists(), "the killed run has metrics.json")
        again = lab.run("train", lab.base_config, "--out", run_dir)
        finished_cleanly(seen, run_dir, again, reference)
    return run


for _id, _when, _ready in KILL_POINTS:
    case(f"{_id} kill -9 of train {_when}", RERUN)(_kill(_id, _ready))


def _study(lab: Lab, path: Path, base: dict, axes: dict | None = None) -> Path:
    """A study file over `base` (a run config) with `axes`; the method axis is given (LoRA r 4 by default):
    without one, a cell's method is named 'default' (reported)."""
    axes = {"method": {"lora": {"method": dict(base["method"], name="lora")}}, **(axes or {})}
    return lab.write_config(path, {"name": "faults", "base": base, "axes": axes})


@case("6.5 kill -9 of study run mid-cell", "its cell process dies with it; study run again: exit 0, the cell's "
      "metrics equal to the uninterrupted run's, one log.jsonl record per step, no temporaries")
def _kill_study(lab: Lab, seen: Seen) -> None:
    reference = lab.reference()[1]
    folder = lab.folder("6.5")
    study = _study(lab, folder / "study.yaml", lab.config())
    out = folder / "out"
    # --jobs 2: the cell gets cores / 2 = 1 thread, as the reference run had

    def cell_runs() -> list[Path]:
        return list((out / "runs").glob("*"))

    result, hit = lab.signal_when(["study", "run", study, "--out", out, "--jobs", "2"],
                                  lambda: any(step_numbers(r) for r in cell_runs()))
    seen.check(hit and result.rc == -signal.SIGKILL, f"not killed mid-cell ({result.said()})")
    run_dir = cell_runs()[0]
    holder = (run_dir / LOCK).read_text().strip() if (run_dir / LOCK).is_file() else ""
    time.sleep(1)
    seen.check(not (holder and pid_alive(int(holder))), f"the cell process {holder} outlived its runner")
    seen.note(f"killed with steps {step_numbers(run_dir)} logged")
    again = lab.run("study", "run", study, "--out", out, "--jobs", "2")
    finished_cleanly(seen, run_dir, again, reference)
    seen.check(not temporaries(out), f"temporaries left: {temporaries(out)}")


# 7. Ctrl-C ----------------------------------------------------------------------------
@case("7.1 Ctrl-C (SIGINT to the process group) of train after its first checkpoint", "exit 130, one stderr "
      "line, no metrics.json; the same command again resumes (a resume record) and finishes with the "
      "uninterrupted run's metrics")
def _ctrl_c(lab: Lab, seen: Seen) -> None:
    reference = lab.reference()[1]
    run_dir = lab.folder("7.1") / "run"
    result, hit = lab.signal_when(["train", lab.base_config, "--out", run_dir],
                                  lambda: (run_dir / "checkpoint.pt").is_file(), sig=signal.SIGINT, group=True)
    seen.note(result.said())
    seen.check(hit, "finished before the interrupt")
    seen.check(result.rc == 130, f"exit {result.rc}, expected 130")
    seen.check(len(result.lines) == 1, f"{len(result.lines)} stderr lines, expected 1")
    seen.check(not (run_dir / "metrics.json").exists(), "metrics.json written")
    again = lab.run("train", lab.base_config, "--out", run_dir)
    log = (run_dir / "log.jsonl").read_text() if (run_dir / "log.jsonl").is_file() else ""
    seen.check('"resume"' in log, "no resume record in log.jsonl")
    finished_cleanly(seen, run_dir, again, reference)


# 8. Two runners -------------------------------------------------------------------------
def _two_at_once(lab: Lab, seen: Seen, args: list, folder: Path) -> None:
    """`medpeft ARGS` started while another `medpeft ARGS` holds `folder`'s lock: refused, naming `folder`
    and the holder's process id; the holder then finishes (exit 0). The holder is paused (SIGSTOP to its
    process group) from when its pid is in the lock file until the second has ended, so that the second
    meets it however long either takes to start."""
    first, lock = lab.start(*args), folder / LOCK
    while first.poll() is None and not (lock.is_file() and lock.read_text().strip().isdigit()):
        time.sleep(0.005)
    if not seen.check(first.poll() is None, f"the first ended before it held the lock (exit {first.returncode})"):
        return
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = lab.run(*args)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    seen.error_line(second, str(folder), f"process {first.pid}")
    done = Result(first.returncode, out, err)
    seen.note(f"first: {done.said()}")
    seen.check(done.rc == 0, f"the first: {done.said()}")


@case("8.1 two train of one config at once", "the second (started while the first holds the lock): exit 2, "
      "one line naming the run folder and the first's process id; the first finishes (exit 0)")
def _two_trains(lab: Lab, seen: Seen) -> None:
    run_dir = lab.folder("8.1") / "run"
    _two_at_once(lab, seen, ["train", lab.base_config, "--out", run_dir], run_dir)


@case("8.2 two study run on one study folder at once", "the second: exit 2, one line naming the study "
      "folder and the first's process id; the first finishes (exit 0)")
def _two_studies(lab: Lab, seen: Seen) -> None:
    folder = lab.folder("8.2")
    study = _study(lab, folder / "study.yaml", lab.config(train={"epochs": 1}))
    _two_at_once(lab, seen, ["study", "run", study, "--out", folder / "out"], folder / "out")


@case("8.3 a lock left by a kill -9", "the killed run's .lock (its dead pid in it) is taken over: the same "
      "command again exits 0")
def _stale_lock(lab: Lab, seen: Seen) -> None:
    run_dir = lab.work / "cases" / "8.3" / "run"
    run_dir.parent.mkdir(parents=True)
    result, hit = lab.signal_when(["train", lab.base_config, "--out", run_dir], lambda: bool(step_numbers(run_dir)))
    lock = run_dir / LOCK
    holder = lock.read_text().strip() if lock.is_file() else ""
    seen.check(hit and holder.isdigit() and not pid_alive(int(holder)), f"no stale lock ({result.said()}, "
                                                                         f".lock {holder!r})")
    seen.note(f".lock held by the dead process {holder}")
    again = lab.run("train", lab.base_config, "--out", run_dir)
    seen.note(again.said())
    seen.check(again.rc == 0, f"rerun {again.said()}")


# 9. Disks ----------------------------------------------------------------------------------
@case("9.1 a read-only output folder (a read-only tmpfs)", "exit 2, one stderr line 'error:' naming the path")
def _read_only(lab: Lab, seen: Seen) -> None:
    disk = lab.work / "cases" / "9.1" / "disk"
    lab.mount(disk, "ro,size=1m")
    try:
        result = lab.run("train", lab.base_config, "--out", disk / "run")
        seen.error_line(result, str(disk))
    finally:
        lab.unmount(disk)


@case("9.2 a full disk (a 300 KB tmpfs, 40 KB of it free)", "exit 2, one stderr line 'error:' naming the path; "
      "with space freed the same command finishes with the uninterrupted run's metrics")
def _full(lab: Lab, seen: Seen) -> None:
    disk = lab.work / "cases" / "9.2" / "disk"
    lab.mount(disk, "size=300k")
    try:
        reference = lab.reference()[1]
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (300 - 40) * 1024)
        result = lab.run("train", lab.base_config, "--out", disk / "run")
        seen.error_line(result, str(disk))
        filler.unlink()
        again = lab.run("train", lab.base_config, "--out", disk / "run")
        finished_cleanly(seen, disk / "run", again, reference)
    finally:
        lab.unmount(disk)


# 10. Studies ---------------------------------------------------------------------------------
@case("10.1 a study whose cell fails (model.weights a missing file)", "exit 1, one stderr line summing up the "
      "failure; the other cell finishes")
def _failing_cell(lab: Lab, seen: Seen) -> None:
    folder = lab.folder("10.1")
    study = _study(lab, folder / "study.yaml", lab.config(train={"epochs": 1}),
                   {"backbone": {"ok": {}, "broken": {"model": {"weights": str(folder / "missing.pth")}}}})
    result = lab.run("study", "run", study, "--out", folder / "out")
    seen.error_line(result, "1 of 2", code=1)
    done = sorted(p.parent.name for p in (folder / "out" / "runs").glob("*/metrics.json"))
    seen.check([d.split("__")[0] for d in done] == ["ok"], f"finished cells: {done}")


@case("10.2 a study.sqlite of garbage bytes", "exit 2, one stderr line 'error:' naming study.sqlite")
def _garbage_store(lab: Lab, seen: Seen) -> None:
    folder = lab.folder("10.2")
    study = _study(lab, folder / "study.yaml", lab.config(train={"epochs": 1}))
    (folder / "out").mkdir()
    _garbage(folder / "out" / "study.sqlite")
    result = lab.run("study", "run", study, "--out", folder / "out")
    seen.error_line(result, str(folder / "out" / "study.sqlite"))


def _bad_name(id: str, name: str):
    def run(lab: Lab, seen: Seen) -> None:
        folder = lab.folder(id)
        study = _study(lab, folder / "study.yaml", lab.config(), {"method": {name: {"method": {"name": "lora"}}}})
        result = lab.run("study", "run", study, "--out", folder / "out")
        seen.error_line(result, "axes.method")
        seen.check(not (folder / "out").exists(), "a study folder was created")
    return run


case("10.3 a cell (method level) name with a NUL", "exit 2, one stderr line 'error:' naming the key "
     "(axes.method), no study folder")(_bad_name("10.3", "lo\0ra"))
case("10.4 a cell name of 250 characters", "exit 2, one stderr line 'error:' naming the key (axes.method), "
     "no study folder")(_bad_name("10.4", "x" * 250))


@case(f"10.5 a label '$bright' and a method level '{XSS}'", "study run exit 0; study report exit 0 with the "
      "per-label figure; report.md and report.html hold the name escaped (no raw '<img')")
def _markup(lab: Lab, seen: Seen) -> None:
    folder = lab.folder("10.5")
    table = pd.read_csv(lab.squares_csv, dtype=str).rename(columns={"bright": "$bright"})
    table.to_csv(folder / "labels.csv", index=False)
    base = lab.config(data={"csv": str(folder / "labels.csv"), "image_root": str(lab.squares_csv.parent),
                            "labels": ["$bright", "dark"]}, train={"epochs": 1})
    study = _study(lab, folder / "study.yaml", base, {"method": {XSS: {"method": {"name": "lora", "r": 4}}}})
    ran = lab.run("study", "run", study, "--out", folder / "out")
    if not seen.check(ran.rc == 0, f"study run {ran.said()}"):
        return
    result = lab.run("study", "report", folder / "out")
    seen.note(result.said())
    seen.check(result.rc == 0, f"study report {result.said()}")
    for name in ("report.md", "report.html"):
        path = folder / "out" / "report" / name
        if not seen.check(path.is_file(), f"no {name}"):
            continue
        text = path.read_text()
        if name == "report.md":  # a backslash makes a character text
            raw, escaped = re.search(r"(?<!\\)<img", text), "\\<img src=x onerror=alert(1)>"
        else:  # the report's figures are <img> elements of its own
            raw, escaped = "<img src=x" in text, html.escape(XSS)
        seen.check(not raw, f"{name} holds a raw '<img'")
        seen.check(escaped in text, f"{name} lacks {escaped!r}")
    # labels are named in the per-label figure only (drawing a '$' as mathtext crashed the report)
    seen.check((folder / "out" / "report" / "figures" / "heatmap_0.png").is_file(), "no per-label figure")


# 11. Malicious model.weights -----------------------------------------------------------------
def _evil_weights(id: str, write: Callable[[Path], None], suffix: str):
    def run(lab: Lab, seen: Seen) -> None:
        folder = lab.folder(id)
        weights = folder / f"evil{suffix}"
        write(weights)
        result = lab.run("train", lab.base_config, "--set", f"model.weights={weights}", "--out", folder / "run")
        seen.error_line(result, str(weights))
        seen.check(not (folder / SENTINEL).exists(), "the pickle ran: SENTINEL exists")
        seen.check(not (folder / "run").exists(), "a run folder was created")
    return run


case("11.1 model.weights: a plain pickle that runs code", "refused: exit 2, one stderr line naming the file; the "
     "code never runs, no run folder")(_evil_weights("11.1", _evil_pickle, ".pth"))
case("11.2 model.weights: a torch.save zip whose pickle runs code", "refused: exit 2, one stderr line naming the "
     "file; the code never runs, no run folder")(_evil_weights("11.2", _evil_torch, ".pt"))


# ----------------------------------------------------------------------------- running and reporting
def run_case(lab: Lab, item: Case) -> Row:
    row, seen = Row(item.id, item.expected), Seen()
    started = time.perf_counter()
    try:
        item.run(lab, seen)
        row.passed = not seen.failures
    except Skip as e:
        seen.notes, row.passed = [f"skipped: {e}"], None
    except Exception as e:  # noqa: BLE001  (the battery's own trouble (a prerequisite failed): the case fails, with why)
        seen.failures.append(f"{type(e).__name__}: {e}")
        row.passed = False
    row.seconds = time.perf_counter() - started
    row.failures = seen.failures
    row.observed = "; ".join(seen.failures + (["saw: " + "; ".join(seen.notes)] if seen.failures else seen.notes))
    mark = {True: "pass", False: "FAIL", None: "skip"}[row.passed]
    print(f"[{mark}] {row.case} ({row.seconds:.0f} s): {row.observed}", flush=True)
    return row


def summary(rows: list[Row]) -> dict:
    skipped = [r for r in rows if r.passed is None]
    return {"cases": len(rows), "passed": sum(r.passed is True for r in rows),
            "failed": sum(r.passed is False for r in rows), "skipped": len(skipped),
            "failed_cases": [r.case for r in rows if r.passed is False],
            "skipped_because": {r.case: r.observed for r in skipped}}


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return text.replace("|", "\\|").replace("<", "&lt;")


def write_results(out: Path, rows: list[Row], record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "faults.json", {**record, "rows": [asdict(r) for r in rows]})
    s = record["summary"]
    skipped = "".join(f"; skipped: {case} ({why.removeprefix('skipped: ')})" for case, why in s["skipped_because"].items())
    failed = "".join(f"; failed: {case}" for case in s["failed_cases"])
    counts = (f"**{s['cases']} cases: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped**{failed}{skipped}. "
             f"{record['wall_s']:.0f} s in all on {record['machine']['cpus']} CPU cores, {record['jobs']} cases at "
             f"a time ({record['machine']['platform']}, uid {record['machine']['uid']}).")
    setup = ("Each case runs `python -m medpeft ...` in subprocesses (one thread, their own XDG_CACHE_HOME) on "
             "data written for the run: 64 40x40 PNGs of squares, a tiny ViT (embed 32, depth 2, patch 8, "
             f"img_size 32, random weights), LoRA r 4, {EPOCHS} epochs of batch 8 ({STEPS_PER_EPOCH} steps each). "
             "The reference run is case 1.18's fixed config; kills and interrupts compare with its metrics. "
             "Seconds: the case's wall time, its own reference or prepared runs included when it made them.")
    lines = ["# Fault-injection battery of the medpeft command line", "", f"    {record['command']}", "", counts, "",
             setup, "", "| case | expected | observed | pass | s |", "| --- | --- | --- | :-: | ---: |"]
    for r in rows:
        mark = {True: "yes", False: "**no**", None: "skipped"}[r.passed]
        lines.append(f"| {_cell(r.case)} | {_cell(r.expected)} | {_cell(r.observed)} | {mark} | {r.seconds:.0f} |")
    write_text_atomic(out / "faults.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="Cases run at a time.")
    parser.add_argument("--only", default="", help="Comma-separated prefixes of case ids to run (e.g. 4.,6.1).")
    parser.add_argument("--work", default=None, help="Work folder (default: a new temp folder, removed after).")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    prefixes = [p for p in args.only.split(",") if p]
    chosen = [c for c in CASES if not prefixes or any(c.id.startswith(p) for p in prefixes)]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="medpeft-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    lab = Lab(work)
    started = time.perf_counter()
    try:
        # the reference run first: most cases need it
        first = [c for c in chosen if c.id.startswith("1.18")]
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda c: run_case(lab, c), first + [c for c in chosen if c not in first]))
    finally:
        for mount in (work / "cases" / "9.1" / "disk", work / "cases" / "9.2" / "disk"):
            lab.unmount(mount)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    order = {c.id: i for i, c in enumerate(CASES)}
    rows.sort(key=lambda r: order[r.case])
    record = {"command": " ".join(["python benchmarks/faults.py", *sys.argv[1:]]), "jobs": args.jobs,
              "wall_s": time.perf_counter() - started, "summary": summary(rows),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "uid": os.getuid()}}
    if prefixes:
        print(json.dumps(record["summary"], indent=2))
    else:
        write_results(Path(args.out), rows, record)
        print(f"-> {Path(args.out) / 'faults.md'}")
    s = record["summary"]
    print(f"{s['cases']} cases: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped "
          f"({record['wall_s']:.0f} s)")
    sys.exit(1 if s["failed"] else 0)


if __name__ == "__main__":
    main()
