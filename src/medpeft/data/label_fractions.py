"""Label-fraction subsets (the 1% / 10% / 100% protocol) and hash-checked split files.

A label-fraction subset of a training pool is a set of whole patients holding about
``fraction`` of the pool's images. The subsets of one seed are nested: each is a prefix of a
single patient order, so the 1% subset lies inside the 10% one, which lies inside the pool.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.errors import DataError
from medpeft.files import write_text_atomic

N_FOLDS = 10             # per level: 10%, then 1%, then 0.1% blocks of the order are stratified
LEAF_PATIENTS = 50       # below this, folds would hold too few patients to stratify anything
GUARANTEED_FRACTION = 0.01
GUARANTEED_POSITIVES = 100


def label_fraction_subsets(table: pd.DataFrame, labels: list[str], fractions: list[float],
                           seed: int = 0) -> dict[float, list[str]]:
    """Map each fraction in (0, 1] to the sorted image_ids of its subset of `table` (any split column is ignored).

    Patients are ordered by iterative stratification (Sechidis et al. 2011) into 10 folds of equal
    image count, each fold ordered the same way in turn, so the first 10%, 1%, ... are stratified; a
    patient's label vector is the max over its images (NaN counts as 0). A subset is the shortest
    prefix of that order holding at least round(fraction * n_images) images.
    Rare-label rule: every label with >= 100 positive images in the pool has a positive image in every
    subset of fraction >= 0.01 (if the order misses one, the label's smallest positive patient is moved
    to the front). The order depends on the table and seed, not on `fractions`: nested across calls too.
    """
    missing = [c for c in ("image_id", "patient_id", *labels) if c not in table.columns]
    if missing:
        raise ValueError(f"columns not in the table: {missing}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"fractions must lie in (0, 1], got {bad}")
    inverse, positives, sizes = patient_positives(table, labels)
    order = _stratified_order(positives, sizes, np.random.default_rng(seed))
    order = _ensure_rare_labels(order, positives, sizes)
    cumulative = np.cumsum(sizes[order])
    ids = table["image_id"].astype(str).to_numpy()
    subsets = {}
    for fraction in fractions:
        count = int(np.searchsorted(cumulative, _target(fraction, len(ids)))) + 1
        chosen = np.zeros(len(sizes), dtype=bool)
        chosen[order[:count]] = True
        subsets[fraction] = sorted(ids[chosen[inverse]])
    return subsets


def _target(fraction: float, n_images: int) -> int:
    return max(1, round(fraction * n_images))


def _stratified_order(positives: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Patient indices such that blocks of 1/10, 1/100, ... of the pool are each stratified.

    The patients are split into 10 stratified folds, each fold is ordered the same way, recursively;
    fewer than LEAF_PATIENTS patients are shuffled. Returns indices into `positives`' rows.
    """
    if len(sizes) < LEAF_PATIENTS:
        return rng.permutation(len(sizes))
    fold = _stratified_folds(positives, sizes, rng)
    parts = []
    for j in range(N_FOLDS):
        members = np.flatnonzero(fold == j)
        parts.append(members[_stratified_order(positives[members], sizes[members], rng)])
    return np.concatenate(parts)


def _stratified_folds(positives: np.ndarray, sizes: np.ndarray, rng: np.random.Generator,
                      proportions=None) -> np.ndarray:
    """The fold (0 to len(proportions) - 1) of each patient, by iterative stratification (Sechidis et al.
    2011); `proportions` (default: N_FOLDS equal folds) are each fold's share, summing to 1.

    Demands are in images, so folds match the pool's image-level prevalences, not just patient counts.
    A fold of share 0 gets no patient.
    """
    proportions = np.full(N_FOLDS, 1.0 / N_FOLDS) if proportions is None else np.asarray(proportions, float)
    n_patients = len(sizes)
    label_demand = np.outer(proportions, positives.sum(0))
    size_demand = proportions * sizes.sum()
    open_folds = np.flatnonzero(proportions > 0)
    fold = np.full(n_patients, -1)
    has = positives > 0
    shuffled = rng.permutation(n_patients)
    while (fold < 0).any():
        open_ = fold < 0
        remaining = has[open_].sum(0)
        if remaining.any():
            # Rarest label first: its few patients get spread before common labels fill the folds.
            rarest = np.flatnonzero(remaining == remaining[remaining > 0].min())
            label = int(rng.choice(rarest))
            group = shuffled[open_[shuffled] & has[shuffled, label]]
            weight = positives[group, label]
        else:
            label, group = None, shuffled[open_[shuffled]]
            weight = sizes[group]
        # Heaviest patients first (ties in seeded order): late heavy patients would overshoot a fold's demand.
        group = group[np.argsort(-weight, kind="stable")]
        for p in group:
            candidates = open_folds
            if label is not None:
                demand = label_demand[candidates, label]
                candidates = candidates[demand == demand.max()]
            sizes_left = size_demand[candidates]
            candidates = candidates[sizes_left == sizes_left.max()]
            j = candidates[rng.integers(len(candidates))] if len(candidates) > 1 else candidates[0]
            fold[p] = j
            label_demand[j] -= positives[p]
            size_demand[j] -= sizes[p]
    return fold


def patient_positives(table: pd.DataFrame, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patient of each row (N,), positive images per patient and label (P, K), images per patient (P,)),
    patients in sorted order of ``patient_id``; a NaN label counts as negative."""
    patients, inverse = np.unique(table["patient_id"].astype(str).to_numpy(), return_inverse=True)
    positives = np.zeros((len(patients), len(labels)))
    np.add.at(positives, inverse, table[list(labels)].to_numpy(dtype=float) == 1.0)
    return inverse, positives, np.bincount(inverse, minlength=len(patients))


def stratified_patient_folds(table: pd.DataFrame, labels, proportions, seed: int) -> np.ndarray:
    """The fold of each row: whole patients drawn into folds of the given image shares by iterative
    stratification over `labels`, with `seed`."""
    inverse, positives, sizes = patient_positives(table, labels)
    return _stratified_folds(positives, sizes, np.random.default_rng(seed), proportions)[inverse]


def _ensure_rare_labels(order: np.ndarray, positives: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Move positive patients of labels missing from the smallest guaranteed subset to the front."""
    needed = positives.sum(0) >= GUARANTEED_POSITIVES
    target = _target(GUARANTEED_FRACTION, int(sizes.sum()))
    for _ in range(positives.shape[1] + 1):  # one move per label at most, then a last check
        count = int(np.searchsorted(np.cumsum(sizes[order]), target)) + 1
        absent = np.flatnonzero(needed & (positives[order[:count]].sum(0) == 0))
        if not len(absent):
            break
        holders = np.flatnonzero(positives[:, absent[0]] > 0)
        smallest = holders[np.argmin(sizes[holders])]  # the fewest images: displaces the least stratification
        order = np.concatenate(([smallest], order[order != smallest]))
    return order


def _ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256(("\n".join(ids) + "\n").encode()).hexdigest()


def write_split_file(image_ids, path, meta: dict | None = None) -> str:
    """Write sorted image ids, one a line, after ``# key: value`` header lines (`meta`, then ``sha256``).

    sha256 is that of "\\n".join(sorted ids) + "\\n". The file is replaced atomically; returns the hash.
    """
    ids = sorted(str(i) for i in image_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    if any(not i or i != i.strip() or i.startswith("#") or "\n" in i for i in ids):
        raise ValueError("image ids must be non-empty, without surrounding spaces, newlines or a leading '#'")
    digest = _ids_sha256(ids)
    header = {**(meta or {}), "sha256": digest}
    if any("\n" in f"{k}{v}" or ":" in str(k) for k, v in header.items()):
        raise ValueError("meta keys and values must be one line, keys without ':'")
    text = "".join(f"# {k}: {v}\n" for k, v in header.items()) + "".join(f"{i}\n" for i in ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return digest


def read_split_file(path) -> list[str]:
    """The image ids of a split file written by `write_split_file`, after checking its sha256 header."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    header = dict(line[1:].strip().partition(":")[::2] for line in lines if line.startswith("#"))
    expected = header.get("sha256", "").strip()
    if not expected:
        raise DataError(f"{path}: split file has no '# sha256:' header")
    ids = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    actual = _ids_sha256(ids)
    if actual != expected:
        raise DataError(f"{path}: sha256 of the ids is {actual}, the header says {expected} (file edited or truncated?)")
    return ids
