"""The results store of a study: one SQLite database, one row per cell, every change one transaction.

A row is written when the study is read (``pending``), when its run starts (``running``, attempts + 1)
and when it ends (``done`` with its metrics, or ``failed`` with the error). A runner killed at any
moment leaves rows that are ``done`` (finished and recorded) or not; a ``running`` row is picked up
again and its run resumes from its checkpoint. The cell key is the primary key: no cell is counted twice.
An SQLite error (a damaged file, a full or read-only disk) is one RunDirError naming the store.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pandas as pd

from medpeft.config import read_yaml_mapping
from medpeft.errors import ConfigError, RunDirError
from medpeft.study.spec import Cell, config_hash

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    backbone TEXT NOT NULL, dataset TEXT NOT NULL, method TEXT NOT NULL, fraction REAL NOT NULL,
    seed INTEGER NOT NULL,
    config_hash TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    val_mean_auroc REAL, test_mean_auroc REAL,
    trainable INTEGER, trainable_percent REAL,
    wall_time_s REAL, peak_memory_mb REAL,
    metrics TEXT,
    started_at REAL, finished_at REAL
)
"""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.row_factory = sqlite3.Row
        try:
            with self._transaction():
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute(SCHEMA)
        except RunDirError:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self):
        try:
            with self.db:
                yield
        except sqlite3.DatabaseError as e:
            raise RunDirError(f"{self.path}: not a usable study store ({e})") from None

    def sync(self, cells: list[Cell], run_root: Path, legacy: Callable[[], dict[str, str]] | None = None) -> None:
        """Add the study's new cells as pending; refuse cells whose config changed since they were added.

        `legacy` (called only when a stored hash differs): cell key -> the hash an older medpeft would have
        given the cell's unchanged config; a row holding it takes the cell's hash (see legacy_hashes)."""
        known = {row["key"]: row["config_hash"] for row in self.db.execute("SELECT key, config_hash FROM cells")}
        differ = [c for c in cells if c.key in known and known[c.key] != c.config_hash]
        older = legacy() if differ and legacy is not None else {}
        changed = [c.key for c in differ if known[c.key] != older.get(c.key)]
        if changed:
            raise ConfigError(f"{self.path}: the config of {len(changed)} cell(s) changed since they were added "
                              f"(e.g. {changed[0]}); write the study to a new directory")
        with self._transaction():
            self.db.executemany("UPDATE cells SET config_hash = ? WHERE key = ?",
                                [(c.config_hash, c.key) for c in differ])
            self.db.executemany(
                "INSERT INTO cells (key, backbone, dataset, method, fraction, seed, config_hash, run_dir, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                [(c.key, c.backbone, c.dataset, c.method, c.fraction, c.seed, c.config_hash, str(run_root / c.key))
                 for c in cells if c.key not in known])

    def status(self, key: str) -> str:
        return self.db.execute("SELECT status FROM cells WHERE key = ?", (key,)).fetchone()["status"]

    def mark_running(self, key: str) -> None:
        with self._transaction():
            self.db.execute("UPDATE cells SET status = 'running', attempts = attempts + 1, error = NULL, "
                            "started_at = ? WHERE key = ?", (time.time(), key))

    def mark_done(self, key: str, metrics: dict, peak_memory_mb: float | None) -> None:
        with self._transaction():
            self.db.execute(
                "UPDATE cells SET status = 'done', error = NULL, val_mean_auroc = ?, test_mean_auroc = ?, "
                "trainable = ?, trainable_percent = ?, wall_time_s = ?, peak_memory_mb = ?, metrics = ?, "
                "finished_at = ? WHERE key = ?",
                ((metrics.get("val") or {}).get("mean_auroc"), (metrics.get("test") or {}).get("mean_auroc"),
                 metrics["parameters"]["trainable"], metrics["parameters"]["trainable_percent"],
                 metrics["wall_time_s"], peak_memory_mb, json.dumps(metrics), time.time(), key))

    def mark_failed(self, key: str, error: str) -> None:
        with self._transaction():
            self.db.execute("UPDATE cells SET status = 'failed', error = ?, finished_at = ? WHERE key = ?",
                            (error, time.time(), key))

    def frame(self) -> pd.DataFrame:
        """Every row, metrics parsed (None where absent)."""
        frame = pd.read_sql_query("SELECT * FROM cells ORDER BY rowid", self.db)
        frame["metrics"] = [json.loads(m) if isinstance(m, str) else None for m in frame["metrics"]]
        return frame


def legacy_hashes(cells: list[Cell], configs: Path) -> dict[str, str]:
    """Cell key -> the hash that medpeft 0.1 gave the cell (of its whole resolved config, defaults included)
    when its config then was the one now, but for options added to medpeft since, at their default.

    The options of then are those in the cell configs the study recorded when it started runs (`configs`,
    STUDY/configs); none recorded (no run started): {}. Options set away from their default stay in."""
    recorded = [p for p in sorted(configs.glob("*.yaml")) if not p.name.endswith(".external.yaml")]
    if not recorded:
        return {}
    known = set().union(*(_leaves(read_yaml_mapping(path, "study cell config", "a mapping of sections"))
                          for path in recorded))
    return {c.key: config_hash(_only(c.config, known | _leaves(c.explicit)), c.tune) for c in cells}


def _leaves(data: dict, prefix: str = "") -> set[str]:
    """The dotted paths of a nested mapping's values (a non-empty mapping is walked into)."""
    return set().union(*(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
                         for k, v in data.items()))


def _only(data: dict, paths: set[str], prefix: str = "") -> dict:
    """`data` with only the values at `paths` (a mapping left empty is dropped unless its own path is there)."""
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            nested = _only(value, paths, f"{path}.")
            if nested or path in paths:
                out[key] = nested
        elif path in paths:
            out[key] = value
    return out
