"""A hospital's CSV as it comes: latin-1 text, ', '-separated findings, an image listed under two patients,
a view column, transparent and 16-bit PNGs, broken image files; read with documented keys only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import medpeft
from conftest import TINY_VIT, accel_flag
from medpeft.config import DataConfig, build, load_config, load_data_config
from medpeft.data import read_dataset, read_split_dataset
from medpeft.data import images as images_module
from medpeft.data.images import check_images
from medpeft.data.splits import draw_split
from medpeft.errors import ConfigError, DataError

FINDINGS = ["COVID-19", "ARDS", "Pneumonia"]
OTHERS = ["No Finding", "E.Coli", "Streptococcus"]


def write_hospital_dataset(root, n_patients=48, seed=0):
    """images/ and metadata.csv (latin-1): filename, patientid, sex, view, finding ('COVID-19, ARDS'),
    notes; row 3 (p01_0.png) is listed again under another patient (row 5); rgba.png has 4 transparent pixels, g16.png is
    16-bit. Findings brighten the image so a model can learn them."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_patients):
        for j in range(1 + i % 2):
            names = [f for f in FINDINGS if rng.random() < 0.4] or [str(rng.choice(OTHERS))]
            pixels = rng.normal(90, 20, (40, 40)) + 60 * ("COVID-19" in names) + 40 * ("ARDS" in names)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            name = f"p{i:02d}_{j}.png"
            if (i, j) == (3, 0):
                name = "rgba.png"
                image = image.convert("RGBA")
                for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]:
                    image.putpixel(xy, (0, 0, 0, 0))
            elif (i, j) == (5, 0):
                name = "g16.png"
                image = Image.fromarray((np.asarray(image).astype(np.uint16) * 257))
            image.save(root / "images" / name)
            rows.append({"filename": name, "patientid": f"P{i:02d}", "sex": "F" if i % 3 else "M",
                         "view": "AP" if i % 4 == 0 else "PA", "finding": ", ".join(names),
                         "notes": "reçu, opacité" if i % 5 == 0 else ""})
    rows.insert(3, {**rows[1], "patientid": "P99"})  # an image listed again under another patient
    frame = pd.DataFrame(rows)
    (root / "metadata.csv").write_bytes(frame.to_csv(index=False).encode("latin-1"))
    return root / "metadata.csv"


@pytest.fixture(scope="module")
def hospital_csv(tmp_path_factory):
    return write_hospital_dataset(tmp_path_factory.mktemp("hospital"))


def hospital_config(csv, out, **data) -> dict:
    """Every key below is documented in the README's data tables."""
    return {
        "model": dict(TINY_VIT),
        "data": {"csv": str(csv), "image_root": str(csv.parent / "images"), "encoding": "latin-1",
                 "path_column": "filename", "patient_column": "patientid", "label_column": "finding",
                 "label_delimiter": ", ", "negative_names": "rest", "labels": FINDINGS,
                 "on_duplicate": "first", "view_column": "view", "alpha": "flatten",
                 "metadata_columns": ["sex"], "split": {"val_fraction": 0.25, "test_fraction": 0.25}, **data},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.003, "accel": accel_flag()},
        "output_dir": str(out),
    }


def data_config(csv, tmp_path, overrides=(), **data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(hospital_config(csv, tmp_path / "run", **data)))
    return load_config(path, list(overrides)).data


def test_the_hospital_csv_trains_with_documented_keys_only(hospital_csv, tmp_path):
    config = hospital_config(hospital_csv, tmp_path / "run", views=["PA"])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "medpeft", "train", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 images are listed on several rows (e.g. 'p01_0.png' at rows 3 and 5)" in done.stderr
    split = pd.read_csv(tmp_path / "run" / "split.csv", dtype=str)
    assert {"rgba.png", "g16.png"} <= set(split["image_id"])  # flattened and scaled, not refused
    source = pd.read_csv(hospital_csv, encoding="latin-1", dtype=str)
    assert set(split["image_id"]) == set(source.loc[source["view"] == "PA", "filename"])  # views: [PA]
    assert split.loc[split["image_id"] == "p01_0.png", "patient_id"].tolist() == ["P01"]  # the first row
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv", dtype=str)
    sexes = dict(zip(source["filename"], source["sex"]))
    assert (predictions["meta:sex"] == predictions["image_id"].map(sexes)).all()
    assert (split["meta:sex"] == split["image_id"].map(sexes)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluated = medpeft.evaluate(tmp_path / "run", "test")  # the run's split, metadata and all, read back
    assert evaluated["n"] == (split["split"] == "test").sum()


def test_each_policy_gives_its_documented_table(hospital_csv, tmp_path):
    source = pd.read_csv(hospital_csv, encoding="latin-1", dtype=str)
    with pytest.warns(UserWarning, match="on_duplicate=first kept the first row"):
        first = read_dataset(data_config(hospital_csv, tmp_path))
    assert len(first) == len(source) - 1 and first["image_id"].is_unique
    row = first.set_index("image_id").loc["p01_0.png"]
    assert row["patient_id"] == "P01" and row["view"] == source["view"][1] and row["meta:sex"] == source["sex"][1]
    findings = source.drop_duplicates("filename").set_index("filename")["finding"]
    for label in FINDINGS:  # 'rest': E.Coli, Streptococcus and No Finding rows are all-negative
        expected = findings.str.split(", ").apply(lambda names, label=label: label in names).astype(float)
        assert (first.set_index("image_id")[label] == expected).all()
    with pytest.warns(UserWarning, match="on_duplicate=drop left them out"):
        dropped = read_dataset(data_config(hospital_csv, tmp_path, on_duplicate="drop"))
    assert "p01_0.png" not in set(dropped["image_id"]) and len(dropped) == len(source) - 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pa = read_dataset(data_config(hospital_csv, tmp_path, views=["PA"]))
    assert set(pa["view"]) == {"PA"}


@pytest.mark.parametrize(("data", "message"), [
    ({"encoding": "utf-8"}, r"metadata.csv: line {line}: byte {offset} \(0xe7\) is not valid utf-8 \(set "
                            r"data.encoding"),
    ({"on_duplicate": "error"}, r"metadata.csv: row 5: image 'p01_0.png' is listed again, first at row 3 "
                                r"\(patients 'P01' and 'P99'\); data.on_duplicate: first keeps the first row"),
    ({"negative_names": ["No Finding"]}, r"metadata.csv: row \d+: unknown label '(E.Coli|Streptococcus)' in "
                                         r"column 'finding'"),
    ({"metadata_columns": ["age"]}, r"metadata.csv: column 'age' not found \(columns: filename, patientid"),
    ({"label_column": "findings"}, r"metadata.csv: column 'findings' not found"),
])
def test_each_bad_case_is_one_line_naming_file_row_and_column(hospital_csv, tmp_path, data, message):
    raw = hospital_csv.read_bytes()
    offset = raw.index("ç".encode("latin-1"))
    message = message.format(line=raw.count(b"\n", 0, offset) + 1, offset=offset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=message) as error:
            read_dataset(data_config(hospital_csv, tmp_path, **data))
    assert "\n" not in str(error.value)


def test_transparent_pixels_are_an_image_problem_unless_flattened(hospital_csv, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = data_config(hospital_csv, tmp_path, alpha="error")
        table = read_split_dataset(data)
    with pytest.raises(DataError, match=r"metadata.csv: 1 of \d+ images cannot be used .*rgba.png: has "
                                        r"transparent pixels \(RGBA\)"):
        check_images(table, data)
    flat = images_module.load_grayscale(str(hospital_csv.parent / "images" / "rgba.png"), alpha="flatten")
    assert flat.getpixel((0, 0)) == 0 and flat.getpixel((5, 5)) > 0


@pytest.mark.parametrize(("value", "expected"), [("'|'", "|"), ("|", "|"), ("', '", ", "), (", ", ", "),
                                                 ("';'", ";")])
def test_label_delimiter_from_the_command_line(hospital_csv, tmp_path, value, expected):
    """--set data.label_delimiter='|' (quotes kept, or taken by the shell), ', ' quoted or not."""
    assert data_config(hospital_csv, tmp_path, [f"data.label_delimiter={value}"]).label_delimiter == expected


def test_an_empty_label_delimiter_in_the_yaml_file_is_one_line(hospital_csv, tmp_path):
    with pytest.raises(ConfigError, match=r"^data.label_delimiter must not be empty \(quote it"):
        data_config(hospital_csv, tmp_path, label_delimiter="")
    config = hospital_config(hospital_csv, tmp_path / "run", label_delimiter="")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "medpeft", "train", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: data.label_delimiter must not be empty")
    assert not (tmp_path / "run").exists()


def test_views_need_a_view_column(hospital_csv, tmp_path):
    with pytest.raises(ConfigError, match="data.views needs data.view_column"):
        data_config(hospital_csv, tmp_path, view_column=None, views=["PA"])


def broken_images_dataset(root):
    """The squares data plus a truncated, a zero-byte, a transparent and a multi-frame image."""
    from conftest import write_squares_dataset

    csv = write_squares_dataset(root)
    good = (root / "img000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[:len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    Image.new("RGBA", (40, 40), (120, 120, 120, 0)).save(root / "clear.png")
    frames = [Image.new("L", (40, 40), v) for v in (50, 150)]
    frames[0].save(root / "stack.tif", save_all=True, append_images=frames[1:])
    table = pd.read_csv(csv)
    broken = pd.DataFrame({"path": ["truncated.png", "empty.png", "clear.png", "stack.tif"],
                           "patient": ["q1", "q2", "q3", "q4"], "bright": 1, "dark": 0})
    pd.concat([table, broken]).to_csv(csv, index=False)
    return csv


REASONS = {"truncated.png": "unreadable image", "empty.png": "unreadable image",
           "clear.png": "has transparent pixels", "stack.tif": "a stack of 2 frames"}


@pytest.mark.slow
def test_broken_images_are_listed_at_once_or_skipped_with_reasons(tmp_path, run_config):
    csv = broken_images_dataset(tmp_path / "data")
    run_config["data"]["csv"] = str(csv)
    run_config["train"]["epochs"] = 1
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    command = [sys.executable, "-m", "medpeft", "train", str(tmp_path / "run.yaml")]
    stopped = subprocess.run(command, capture_output=True, text=True)
    assert stopped.returncode == 2 and stopped.stderr.count("\n") == 1, stopped.stderr
    assert "4 of 68 images cannot be used" in stopped.stderr
    for name, reason in REASONS.items():
        assert f"{name}: {reason}" in stopped.stderr
    assert not (tmp_path / "run").exists()  # stopped before training
    skipped = subprocess.run(command + ["--on-missing", "skip"], capture_output=True, text=True)
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 4 of 68 images (" in skipped.stderr
    for name, reason in REASONS.items():
        assert f"{name}: {reason}" in skipped.stderr
    used = set(pd.read_csv(tmp_path / "run" / "split.csv")["image_id"])
    assert len(used) == 64 and not used & set(REASONS)


def test_a_second_check_of_unchanged_files_decodes_nothing(tmp_path, monkeypatch):
    csv = broken_images_dataset(tmp_path / "data")
    table = pd.read_csv(csv, dtype=str)
    table["path"] = [str(csv.parent / p) for p in table["path"]]
    data = load_config_data(csv, tmp_path)
    calls = []
    original = images_module.image_problem
    monkeypatch.setattr(images_module, "image_problem", lambda *a: calls.append(a) or original(*a))
    with pytest.warns(UserWarning, match="skipped 4 of 68"):
        first = check_images(table, data)
    assert len(calls) == 68
    with pytest.warns(UserWarning, match="skipped 4 of 68"):
        again = check_images(table, data)
    assert len(calls) == 68 and again.equals(first)
    Image.new("L", (40, 40), 90).save(csv.parent / "clear.png")  # fixed: the changed file is decoded again
    with pytest.warns(UserWarning, match="skipped 3 of 68"):
        assert len(check_images(table, data)) == 65
    assert len(calls) == 69


def load_config_data(csv, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": dict(TINY_VIT), "method": {"name": "lora"}, "output_dir": str(tmp_path / "run"),
        "data": {"csv": str(csv), "patient_column": "patient", "labels": ["bright", "dark"], "on_missing": "skip",
                 "cache_dir": str(tmp_path / "cache")}}))
    return load_config(tmp_path / "run.yaml").data


NIH = Path(__file__).parents[2] / "shared" / "data" / "cxr-metadata" / "nih-chestxray14" / "Data_Entry_2017.csv"


@pytest.mark.skipif(not NIH.is_file(), reason=f"the real NIH metadata is not at {NIH}")
def test_data_inspect_of_nih_is_readable_at_80_columns_and_equals_its_json(tmp_path):
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": {"format": "nih", "csv": str(NIH)}}))
    command = [sys.executable, "-m", "medpeft", "data", "inspect", str(tmp_path / "data.yaml")]
    env = {**os.environ, "COLUMNS": "80"}
    shown = subprocess.run(command, capture_output=True, text=True, env=env)
    numbers = json.loads(subprocess.run(command + ["--json"], capture_output=True, text=True, check=True).stdout)
    assert shown.returncode == 0, shown.stderr
    assert "…" not in shown.stdout and max(map(len, shown.stdout.splitlines())) <= 80
    rows = {line.split("  ")[1].strip(): line for line in shown.stdout.splitlines() if line.startswith("  ")}
    assert numbers["splits"] == ["all", "train", "val", "test"] and numbers["images"]["all"] == 112120
    assert rows["images"].split()[1:] == [str(numbers["images"][s]) for s in numbers["splits"]]
    assert rows["view PA"].split()[2:] == [str(numbers["views"]["PA"][s]) for s in numbers["splits"]]
    for label, counts in numbers["labels"].items():
        shown_counts = rows[label].split()[1::2]
        assert shown_counts == [str(counts[s]["positives"]) for s in numbers["splits"]]
    assert numbers["labels"]["Hernia"]["all"] == {"positives": 227, "known": 112120}


def test_data_inspect_reads_only_the_data_section(hospital_csv, tmp_path):
    config = {"data": hospital_config(hospital_csv, tmp_path / "run")["data"]}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "medpeft", "data", "inspect", str(tmp_path / "data.yaml"),
                           "--check-images", "--json", "--set", "data.alpha=error", "--on-missing", "skip"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout)
    assert "rgba.png: has transparent pixels" in done.stderr
    assert numbers["images"]["all"] == len(pd.read_csv(hospital_csv, encoding="latin-1")) - 2  # a repeat, rgba.png


def test_a_rare_label_is_named_with_split_and_count(tmp_path):
    rows = [{"path": f"{i}.png", "patient": f"p{i}", "A": int(i % 2 == 0), "Rare": int(i in (3, 50))}
            for i in range(60)]
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": {
        "csv": str(tmp_path / "labels.csv"), "patient_column": "patient", "labels": ["A", "Rare"],
        "split": {"val_fraction": 0.2, "test_fraction": 0.2}}}))
    with pytest.warns(UserWarning, match=r"labels.csv: labels with fewer than 5 positive images in a split .*: "
                                         r"Rare [01] in train, Rare [01] in val, Rare [01] in test") as caught:
        table = read_split_dataset(load_data_config(tmp_path / "data.yaml"))
    assert "A " not in str(caught[0].message).partition("): ")[2]  # 'A' has enough in every split
    assert (table["Rare"] == 1).sum() == 2


def test_the_patient_draw_spreads_a_rare_label_over_the_splits():
    """Iterative stratification: 4 positive patients of 200 go 2 / 1 / 1 (a plain shuffle often puts all
    of them in train or none); common labels keep their prevalence in every split."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(400)],
                          "Common": (rng.random(400) < 0.3).astype(float), "Rare": 0.0})
    table.loc[[10, 100, 200, 300], "Rare"] = 1.0
    for seed in range(5):
        split = draw_split(table, ["Common", "Rare"], 0.25, 0.25, seed)
        assert sorted(table.loc[table["Rare"] == 1].assign(split=split[table["Rare"] == 1])["split"]
                      .value_counts().tolist()) == [1, 1, 2]
        for name in ("train", "val", "test"):
            assert abs(table["Common"][split == name].mean() - table["Common"].mean()) < 0.03
        patients = pd.Series(split).groupby(table["patient_id"]).nunique()
        assert (patients == 1).all()


def test_a_wrong_image_root_is_one_short_line_with_a_hint(tmp_path):
    rows = [{"path": f"{i}.png", "A": i % 2} for i in range(300)]
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    data = load_data_config(base={"data": {"csv": str(tmp_path / "labels.csv"), "labels": ["A"],
                                           "image_root": str(tmp_path / "elsewhere")}})
    table = pd.read_csv(tmp_path / "labels.csv", dtype=str)
    table["path"] = [str(tmp_path / "elsewhere" / name) for name in table["path"]]
    with pytest.raises(DataError, match=r"300 of 300 images cannot be used .*; and 250 more \(no image was found: "
                                        r"do the paths start where data.image_root says\?\)$") as error:
        check_images(table, data)
    assert str(error.value).count("image file not found") == images_module.MAX_LISTED


def write_subgroup_csv(tmp_path, ages=("17", "45.5", "", "070Y", "65")) -> Path:
    rows = ["path,finding,sex,site,notes,age"]
    rows += [f"i{i}.png,{i % 2},{' F ' if i % 2 else 'M'},{'A' if i < 3 else 'B'}, note {i},{age}"
             for i, age in enumerate(ages)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "labels.csv"


def subgroup_data(csv, **data):
    return build(DataConfig, {"csv": str(csv), "labels": ["finding"], "metadata_columns": ["notes"],
                             "subgroup_columns": ["sex", "site"], "age_column": "age", "age_bins": [18, 65], **data})


def test_subgroup_and_age_columns_are_carried_and_reported_metadata_only_carried(tmp_path):
    config = subgroup_data(write_subgroup_csv(tmp_path))
    assert config.subgroups() == ["sex", "site", "age"]
    table = read_dataset(config)
    assert [c for c in table.columns if c.startswith("meta:")] == ["meta:notes", "meta:sex", "meta:site", "meta:age"]
    assert table["meta:notes"].tolist() == [f" note {i}" for i in range(5)]  # unchanged
    assert table["meta:sex"].tolist() == ["M", "F", "M", "F", "M"]  # stripped
    assert table["meta:age"].tolist() == ["0-17", "18-64", "", "65+", "65+"]
    assert build(DataConfig, {"csv": "x.csv", "metadata_columns": ["sex"]}).subgroups() == []


@pytest.mark.parametrize("data", [{"metadata_columns": ["sex"]}, {"subgroup_columns": ["age"]},
                                  {"subgroup_columns": ["site", "site"]}])
def test_a_meta_column_named_twice_is_refused(tmp_path, data):
    with pytest.raises(ConfigError, match=r"^data.metadata_columns / subgroup_columns / age_column: meta:\w+ is "
                                          r"named twice"):
        subgroup_data(tmp_path / "labels.csv", **data)


def test_an_unreadable_age_names_file_row_and_column(tmp_path):
    csv = write_subgroup_csv(tmp_path, ages=("17", "45", "old"))
    with pytest.raises(DataError, match=r"labels.csv: row 4: column 'age' has 'old', expected an age in years"):
        read_dataset(subgroup_data(csv))
    with pytest.raises(DataError, match=r"labels.csv: column 'years' not found"):
        read_dataset(subgroup_data(csv, age_column="years"))
