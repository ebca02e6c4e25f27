"""Label-fraction subsets: patient-level, nested, stratified, rare labels kept; hash-checked split files."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medpeft.data.label_fractions import label_fraction_subsets, read_split_file, write_split_file
from medpeft.errors import DataError

LABELS = ["common", "frequent", "mid", "uncommon", "scarce", "rare"]
PREVALENCES = [0.5, 0.3, 0.2, 0.1, 0.07, 0.04]
NIH_DIR = Path(__file__).resolve().parents[1] / "../shared/data/cxr-metadata/nih-chestxray14"


@pytest.fixture(scope="module")
def pool() -> pd.DataFrame:
    """About 3,000 images of 1,200 patients (1-5 images each), 6 labels, 5% of the labels unknown."""
    rng = np.random.default_rng(12345)
    sizes = rng.choice([1, 2, 3, 4, 5], size=1200, p=[0.3, 0.25, 0.2, 0.15, 0.1])
    patient = np.repeat(np.arange(1200), sizes)
    n = len(patient)
    # Positives cluster by patient, as follow-up images of one patient tend to share findings.
    prone = rng.random((1200, len(LABELS))) < np.array(PREVALENCES)
    values = (rng.random((n, len(LABELS))) < np.where(prone[patient], 0.8, 0.02)).astype(float)
    values[rng.random(values.shape) < 0.05] = np.nan
    table = pd.DataFrame(values, columns=LABELS)
    table.insert(0, "image_id", [f"img{i:05d}.png" for i in range(n)])
    table.insert(1, "path", table["image_id"])
    table.insert(2, "patient_id", [f"p{p:04d}" for p in patient])
    table.insert(3, "view", "PA")
    table.insert(4, "split", "train")
    return table


def prevalence_deviation(table, ids) -> float:
    """Largest absolute gap between a subset's and the pool's share of positive images, over labels."""
    subset = table[table["image_id"].isin(ids)]
    return float(((subset[LABELS] == 1).mean() - (table[LABELS] == 1).mean()).abs().max())


def random_patient_subset(table, fraction, seed) -> list[str]:
    """The baseline: whole patients in plain random order, the shortest prefix reaching the target."""
    sizes = table.groupby("patient_id").size()
    order = sizes.index.to_numpy()[np.random.default_rng(seed).permutation(len(sizes))]
    count = int(np.searchsorted(np.cumsum(sizes[order].to_numpy()), round(fraction * len(table)))) + 1
    return table.loc[table["patient_id"].isin(order[:count]), "image_id"].tolist()


def test_smaller_fractions_are_contained_in_larger_ones(pool):
    subsets = label_fraction_subsets(pool, LABELS, [0.01, 0.05, 0.1, 0.5, 1.0], seed=3)
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[1.0])
    assert set(subsets[0.05]) <= set(subsets[0.5])
    assert len(subsets[0.01]) < len(subsets[0.1]) < len(subsets[1.0])


def test_a_fraction_gives_the_same_subset_whatever_other_fractions_are_asked(pool):
    alone = label_fraction_subsets(pool, LABELS, [0.1], seed=3)[0.1]
    assert alone == label_fraction_subsets(pool, LABELS, [0.01, 0.1, 0.5], seed=3)[0.1]


def test_no_patient_is_both_inside_and_outside_a_subset(pool):
    for ids in label_fraction_subsets(pool, LABELS, [0.01, 0.1, 0.5], seed=0).values():
        inside = pool["image_id"].isin(ids)
        assert not set(pool.loc[inside, "patient_id"]) & set(pool.loc[~inside, "patient_id"])


def test_subset_sizes_reach_the_fraction_within_one_patient(pool):
    largest_patient = pool.groupby("patient_id").size().max()
    for fraction, ids in label_fraction_subsets(pool, LABELS, [0.01, 0.1, 0.25, 0.5], seed=0).items():
        assert 0 <= len(ids) - round(fraction * len(pool)) < largest_patient
        assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_fraction_one_returns_every_image(pool):
    assert label_fraction_subsets(pool, LABELS, [1.0])[1.0] == sorted(pool["image_id"])


def test_stratified_subsets_keep_prevalences_closer_than_random_patient_samples(pool):
    seeds = range(5)
    stratified = np.mean([prevalence_deviation(pool, label_fraction_subsets(pool, LABELS, [0.1], seed=s)[0.1])
                          for s in seeds])
    random = np.mean([prevalence_deviation(pool, random_patient_subset(pool, 0.1, s)) for s in seeds])
    print(f"max prevalence deviation at 10%: stratified {stratified:.4f}, random patients {random:.4f}")
    assert stratified < 0.3 * random
    assert stratified < 0.01


def test_every_label_has_positives_in_the_ten_percent_subset(pool):
    subset = pool[pool["image_id"].isin(label_fraction_subsets(pool, LABELS, [0.1], seed=0)[0.1])]
    assert ((subset[LABELS] == 1).sum() > 0).all()


def test_same_seed_gives_identical_subsets_and_another_seed_different_ones(pool):
    first = label_fraction_subsets(pool, LABELS, [0.01, 0.1], seed=7)
    assert first == label_fraction_subsets(pool, LABELS, [0.01, 0.1], seed=7)
    other = label_fraction_subsets(pool, LABELS, [0.01, 0.1], seed=8)
    assert other[0.1] != first[0.1] and other[0.01] != first[0.01]


def test_row_order_does_not_change_the_subsets(pool):
    shuffled = pool.sample(frac=1.0, random_state=0)
    assert label_fraction_subsets(shuffled, LABELS, [0.1], seed=2) == label_fraction_subsets(pool, LABELS, [0.1], seed=2)


def test_a_label_with_100_positives_held_by_ten_patients_survives_at_one_percent():
    # 100 positives in 10 of 2,000 patients: the stratified folds put them in 10 of 100 folds,
    # so the 1% prefix would usually miss them without the front-moving fix-up.
    patient = np.repeat(np.arange(2000), 10)
    table = pd.DataFrame({"image_id": [f"i{k:06d}" for k in range(len(patient))],
                          "patient_id": [f"p{p}" for p in patient]})
    table["tiny"] = np.where(patient < 10, 1.0, 0.0)
    table["bulk"] = np.where(patient % 3 == 0, 1.0, np.nan)
    for seed in range(10):
        subsets = label_fraction_subsets(table, ["tiny", "bulk"], [0.01, 0.02], seed=seed)
        inside = table[table["image_id"].isin(subsets[0.01])]
        assert (inside[["tiny", "bulk"]] == 1).any().all(), f"seed {seed}"
        assert set(subsets[0.01]) <= set(subsets[0.02])


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fractions_outside_zero_to_one_raise_naming_them(pool, fraction):
    with pytest.raises(ValueError, match=str(fraction)):
        label_fraction_subsets(pool, LABELS, [0.1, fraction])


def test_labels_missing_from_the_table_raise_naming_them(pool):
    with pytest.raises(ValueError, match="Nodule"):
        label_fraction_subsets(pool, [*LABELS, "Nodule"], [0.1])


def test_nih_train_val_pool_keeps_every_label_at_one_percent_and_is_nested():
    data_entry, train_val = NIH_DIR / "Data_Entry_2017.csv", NIH_DIR / "train_val_list.txt"
    if not (data_entry.is_file() and train_val.is_file()):
        pytest.skip(f"NIH ChestX-ray14 metadata not found in {NIH_DIR}")
    from medpeft.data.nih import NIH_LABELS, read_nih

    table = read_nih(data_entry)
    names = {line.strip() for line in train_val.read_text().splitlines() if line.strip()}
    pool = table[table["image_id"].isin(names)].reset_index(drop=True)
    labels = list(NIH_LABELS)
    assert (pool["Hernia"] == 1).sum() >= 100  # the rare label the guarantee is about
    start = time.perf_counter()
    subsets = label_fraction_subsets(pool, labels, [0.01, 0.1, 1.0], seed=0)
    print(f"NIH train_val pool: {len(pool)} images, {pool['patient_id'].nunique()} patients, "
          f"subsets in {time.perf_counter() - start:.2f} s")
    one_percent = pool[pool["image_id"].isin(subsets[0.01])]
    positives = (one_percent[labels] == 1).sum()
    assert (positives >= 1).all(), positives[positives < 1].to_dict()
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[1.0])
    assert len(subsets[1.0]) == len(pool)


def test_split_file_round_trip_returns_the_sorted_ids_and_content_hash(tmp_path):
    ids = ["c.png", "a.png", "b.png"]
    path = tmp_path / "splits" / "nih_train_1pct.txt"
    digest = write_split_file(ids, path, meta={"dataset": "nih", "fraction": 0.01})
    assert digest == hashlib.sha256(b"a.png\nb.png\nc.png\n").hexdigest()
    assert read_split_file(path) == sorted(ids)
    text = path.read_text()
    assert text.startswith("# dataset: nih\n# fraction: 0.01\n") and f"# sha256: {digest}\n" in text
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_split_file_with_an_edited_id_raises_naming_sha256_and_file(tmp_path):
    path = tmp_path / "train.txt"
    write_split_file(["a.png", "b.png", "c.png"], path)
    path.write_text(path.read_text().replace("b.png", "x.png"))
    with pytest.raises(DataError, match=r"train\.txt.*sha256"):
        read_split_file(path)


def test_split_file_with_a_dropped_line_raises(tmp_path):
    path = tmp_path / "train.txt"
    write_split_file(["a.png", "b.png", "c.png"], path)
    path.write_text(path.read_text().replace("c.png\n", ""))
    with pytest.raises(DataError, match="sha256"):
        read_split_file(path)


def test_missing_split_file_raises_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="absent.txt"):
        read_split_file(tmp_path / "absent.txt")
