"""Runtime faults: Ctrl-C, two processes on one folder, exit codes, broken files inside run folders and
study stores, full or read-only disks, and what kills leave behind. Each is one line naming the file or
folder, nothing is left half-written, and running the same command again recovers."""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_VIT, interrupted_at_call
from test_study import write_study

import medpeft
from medpeft import cli
from medpeft.config import config_from_dict, load_pretrain_config
from medpeft.errors import CheckpointError, ConfigError, RunDirError
from medpeft.pretrain import pretrain
from medpeft.study.runner import run_study
from medpeft.study.spec import load_study
from medpeft.train import recipe


def medpeft_process(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "medpeft", *args], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """`medpeft ARGS` in this process: (exit code, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["medpeft", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


HOLDER = """import sys, time
from medpeft.files import locked
with locked(sys.argv[1], RuntimeError):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock (until it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def interrupted_run(run_config, tmp_path) -> Path:
    """A run stopped in its second epoch (after its steps, before its checkpoint), as a kill leaves it."""
    with interrupted_at_call(recipe, "evaluate_split", 2):
        medpeft.train(config_from_dict(run_config), quiet=True)
    return Path(run_config["output_dir"])


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_the_same_command_resumes(run_config, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**run_config, "train": {**run_config["train"], "epochs": 5}}))
    run_dir = Path(run_config["output_dir"])
    # A shell started without job control (CI in the background) hands its children SIGINT ignored, and
    # Python then keeps it ignored: give the run the default disposition a terminal gives it.
    train = medpeft_process("train", str(config), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not (run_dir / "checkpoint.pt").is_file() and time.time() < deadline:  # the first epoch is done
        time.sleep(0.02)
    assert train.poll() is None, "the run ended before it could be interrupted"
    train.send_signal(signal.SIGINT)
    _, stderr = train.communicate(timeout=60)
    assert train.returncode == 130
    assert stderr.strip().splitlines() == ["interrupted: run the same command again to resume"]
    assert not (run_dir / "metrics.json").exists()

    again = medpeft_process("train", str(config))
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert (run_dir / "metrics.json").is_file() and not (run_dir / ".lock").exists()
    assert '"event": "resume"' in (run_dir / "log.jsonl").read_text()


def test_end_of_input_is_one_line_not_an_empty_stderr(monkeypatch, capsys):
    def ended():
        raise EOFError("Ran out of input")

    monkeypatch.setattr("medpeft.methods.list_methods", ended)
    code, stderr = run_cli(monkeypatch, capsys, "methods")
    assert code == 1 and len(stderr) == 1 and "Ran out of input" in stderr[0]


def test_a_second_process_on_a_run_folder_is_refused_and_a_killed_holders_lock_is_taken_over(run_config):
    run_dir = Path(run_config["output_dir"])
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(RunDirError, match=rf"^{run_dir}: in use by process {holder.pid} "):
            medpeft.train(config_from_dict(run_config), quiet=True)
        pretraining = {key: run_config[key] for key in ("data", "output_dir")}
        with pytest.raises(RunDirError, match=rf"^{run_dir}: in use by process {holder.pid} "):
            pretrain(load_pretrain_config(base={**pretraining, "model": TINY_VIT}), quiet=True)
        assert os.listdir(run_dir) == [".lock"]  # the refused runs wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / ".lock").read_text() == f"{holder.pid}\n"  # left by the killed holder
    medpeft.train(config_from_dict(run_config), quiet=True)
    assert (run_dir / "metrics.json").is_file() and not (run_dir / ".lock").exists()


def test_a_second_study_runner_is_refused(tmp_path, squares_csv):
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={"method": {"linear_probe": {}}})
    holder = hold_lock(tmp_path / "out")
    try:
        with pytest.raises(RunDirError, match=rf"out: in use by process {holder.pid} "):
            run_study(study, tmp_path / "out", quiet=True)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_study_run_exits_1_while_a_cell_failed_and_recovered_cells_keep_their_peak_memory(tmp_path, squares_csv):
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={"method": {"linear_probe": {}, "bitfit": {}}})
    study.write_text(study.read_text().replace("epochs: 4", "epochs: 1"))
    out = tmp_path / "out"
    busy = out / "runs" / "default__default__bitfit__f1__s0"
    holder = hold_lock(busy)  # a cell's run folder in use: that cell fails, not trains twice
    try:
        runner = medpeft_process("study", "run", str(study), "--out", str(out))
        _, stderr = runner.communicate(timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert runner.returncode == 1
    expected = f"error: 1 of 2 cells failed: see {out / 'logs'} (--retry-failed runs them again)"
    assert stderr.strip().splitlines() == [expected]
    with sqlite3.connect(out / "study.sqlite") as db:
        error = db.execute("SELECT error FROM cells WHERE status = 'failed'").fetchone()[0]
    assert f"{busy}: in use by process {holder.pid}" in error

    assert run_study(study, out, retry_failed=True, quiet=True) == {"done": 2}
    with sqlite3.connect(out / "study.sqlite") as db:  # as a runner killed after the cell finished leaves it
        db.execute("UPDATE cells SET status = 'running', peak_memory_mb = NULL")
    assert run_study(study, out, quiet=True) == {"done": 2}
    with sqlite3.connect(out / "study.sqlite") as db:
        assert all(peak > 0 for peak, in db.execute("SELECT peak_memory_mb FROM cells"))


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, pickle.dumps(os.system)], ids=["empty", "garbage", "code"])
def test_a_broken_checkpoint_of_a_run_to_resume_is_one_line_naming_it(run_config, tmp_path, content):
    run_dir = interrupted_run(run_config, tmp_path)
    (run_dir / "checkpoint.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^{run_dir / 'checkpoint.pt'}: not a readable checkpoint"):
        medpeft.train(config_from_dict(run_config), quiet=True)


def test_a_zero_byte_checkpoint_through_the_cli_is_exit_2_and_one_line(run_config, tmp_path):
    run_dir = interrupted_run(run_config, tmp_path)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config))
    train = medpeft_process("train", str(config))
    _, stderr = train.communicate(timeout=120)
    assert train.returncode == 2
    assert len(stderr.strip().splitlines()) == 1 and f"{run_dir / 'checkpoint.pt'}: " in stderr


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, squares_csv):
    """A finished LoRA run (peft's adapter format) and a BitFit run (medpeft's safetensors)."""
    runs = {}
    for method in ("lora", "bitfit"):
        out = tmp_path_factory.mktemp("runs") / method
        config = {"model": TINY_VIT,
                  "data": {"csv": str(squares_csv), "patient_column": "patient", "labels": ["bright", "dark"],
                           "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
                  "method": {"name": method}, "train": {"epochs": 1, "batch_size": 8}, "output_dir": str(out)}
        medpeft.train(config_from_dict(config), quiet=True)
        runs[method] = out
    return runs


def test_every_output_of_a_run_is_an_ordinary_file(finished_runs):
    for run_dir in finished_runs.values():
        modes = {str(p.relative_to(run_dir)): oct(p.stat().st_mode & 0o777) for p in run_dir.rglob("*")}
        assert modes.pop("weights") == "0o755"
        assert modes == dict.fromkeys(modes, "0o644")


@pytest.mark.parametrize("method, name", [("lora", "adapter_model.safetensors"), ("bitfit", "adapter.safetensors")])
def test_broken_weights_and_metrics_of_a_finished_run_are_one_line_naming_the_file(finished_runs, tmp_path, method,
                                                                                   name):
    run_dir = tmp_path / method
    shutil.copytree(finished_runs[method], run_dir)
    weights = run_dir / "weights" / name
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match=rf"^{weights}: not a readable safetensors file \("):
        medpeft.evaluate(run_dir, "val")
    (run_dir / "metrics.json").write_text('{"labels": [')
    with pytest.raises(RunDirError, match=rf"^{run_dir / 'metrics.json'}: not valid JSON \("):
        medpeft.evaluate(run_dir, "val")
    (run_dir / "metrics.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match=rf"^{run_dir / 'metrics.json'}: expected a JSON object"):
        medpeft.evaluate(run_dir, "val")


def test_a_garbage_study_store_is_one_line_naming_it(tmp_path, squares_csv):
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={"method": {"linear_probe": {}}})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "study.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(RunDirError, match=rf"^{tmp_path / 'out' / 'study.sqlite'}: not a usable study store \("):
        run_study(study, tmp_path / "out", quiet=True)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_or_read_only_disk_is_one_line_naming_the_file_and_leaves_nothing(run_config, tmp_path, monkeypatch,
                                                                               capsys, code):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config))
    fsync = os.fsync

    def failing(fd):  # in the run folder only
        if os.readlink(f"/proc/self/fd/{fd}").startswith(run_config["output_dir"]):
            raise OSError(code, os.strerror(code))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    exit_code, stderr = run_cli(monkeypatch, capsys, "train", str(config))
    assert exit_code == 2
    assert stderr == [f"error: {Path(run_config['output_dir']) / 'config.yaml'}: {os.strerror(code)}"]
    assert not Path(run_config["output_dir"]).exists()


def test_a_resumed_run_removes_stale_temporaries_and_logs_each_step_once(run_config, tmp_path):
    uninterrupted = dict(run_config, output_dir=str(tmp_path / "whole"))
    medpeft.train(config_from_dict(uninterrupted), quiet=True)
    run_dir = interrupted_run(run_config, tmp_path)
    (run_dir / ".checkpoint.pt.k9x2abcd.tmp").write_bytes(b"half")
    (run_dir / ".weights.ab12cd34.tmp").mkdir()
    (run_dir / ".weights.ab12cd34.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (run_dir / "notes.txt").write_text("mine")
    medpeft.train(config_from_dict(run_config), quiet=True)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
    assert (run_dir / "notes.txt").read_text() == "mine"

    def steps(folder):
        records = [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if r["event"] == "step"], [r for r in records if r["event"] == "epoch"]

    assert steps(run_dir)[0] == steps(uninterrupted["output_dir"])[0]
    assert [r["epoch"] for r in steps(run_dir)[1]] == [0, 1]


@pytest.mark.parametrize("name, shown", [("a" * 65, f"'{'a' * 64}'..."), ("lo\0ra", r"'lo\x00ra'")])
def test_over_long_or_nul_level_names_are_refused_at_load(tmp_path, squares_csv, name, shown):
    study = write_study(tmp_path / "study.yaml", squares_csv, axes={"method": {name: {"method": {"name": "lora"}}}})
    with pytest.raises(ConfigError, match=re.escape(f"study.yaml: axes.method level {shown} must be a name")):
        load_study(study)


@pytest.mark.parametrize("content, shown", [("{", "not valid JSON"), ('{"rule": "vote"}', "expected a decision rule")])
def test_a_broken_thresholds_file_is_one_line_naming_it(finished_runs, tmp_path, content, shown):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_runs["lora"], run_dir)
    (run_dir / "thresholds.json").write_text(content)
    with pytest.raises(RunDirError, match=rf"^{run_dir / 'thresholds.json'}: {shown}"):
        medpeft.load_run(run_dir)


def test_a_broken_adalora_adapter_config_is_one_line_naming_it(tmp_path):
    from medpeft.methods import adalora

    (tmp_path / "adapter_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'adapter_config.json'}: expected a JSON object"):
        adalora.load(None, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'adapter_config.json'}: not a readable adapter config"):
        adalora.load(None, tmp_path)


def test_a_failed_adapter_write_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, not an OSError."""
    import safetensors

    from medpeft.methods import _peft

    class Model:
        def save_pretrained(self, directory):
            raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                              'message: "No space left on device" })')

    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'adapter_model.safetensors'}: not written \(Error "
                                              r"while serializing: .*No space left on device"):
        _peft.save(Model(), tmp_path)
