"""Dataset formats and split files through the training recipe, on small fake datasets in the real layouts."""

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import medpeft
from medpeft.config import config_from_dict
from medpeft.data.labels import NIH_LABELS
from medpeft.errors import DataError
from medpeft.train.components import prepare_table

from conftest import TINY_VIT


@pytest.fixture
def fake_nih(tmp_path):
    """Data_Entry_2017.csv (CRLF, header ending in a comma), images/, train_val_list.txt, test_list.txt."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows, names = [], []
    for patient in range(1, 41):
        for follow_up in range(2):
            name = f"{patient:08d}_{follow_up:03d}.png"
            findings = [label for label in ("Effusion", "Cardiomegaly") if rng.random() < 0.4]
            image = rng.normal(100, 20, (40, 40))
            if "Effusion" in findings:
                image[25:, :] += 80
            if "Cardiomegaly" in findings:
                image[10:30, 10:30] += 60
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(tmp_path / "images" / name)
            rows.append(f"{name},{'|'.join(findings) or 'No Finding'},{follow_up:03d},{patient:08d},058Y,M,"
                        f"{'PA' if patient % 3 else 'AP'},2500,2048,0.143,0.143")
            names.append(name)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    (tmp_path / "Data_Entry_2017.csv").write_bytes(("\r\n".join([header, *rows]) + "\r\n").encode())
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:60]) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(names[60:]) + "\n")
    return tmp_path


def nih_config(root, out, **split):
    return {"model": dict(TINY_VIT), "method": {"name": "linear_probe"},
            "data": {"format": "nih", "csv": str(root / "Data_Entry_2017.csv"), "labels": ["Cardiomegaly", "Effusion"],
                     "split": {"files": {"train_val": str(root / "train_val_list.txt"),
                                         "test": str(root / "test_list.txt")}, "val_fraction": 0.25, **split}},
            "train": {"epochs": 1, "batch_size": 8}, "output_dir": str(out)}


def test_nih_format_with_official_lists_trains_and_keeps_patients_apart(fake_nih, tmp_path):
    config = config_from_dict(nih_config(fake_nih, tmp_path / "run"))
    table = prepare_table(config)
    sizes = table["split"].value_counts().to_dict()
    assert sizes["test"] == 20 and sizes["train"] + sizes["val"] == 60 and 10 <= sizes["val"] <= 20
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(table["view"]) == {"PA", "AP"}
    metrics = medpeft.train(config, quiet=True)
    assert set(metrics["test"]["per_label"]) == {"Cardiomegaly", "Effusion"}


def test_default_labels_of_a_format_are_the_standard_set(fake_nih, tmp_path):
    raw = nih_config(fake_nih, tmp_path / "run")
    del raw["data"]["labels"]
    assert config_from_dict(raw).data.labels == list(NIH_LABELS)


def test_published_list_with_disagreeing_labels_is_refused(fake_nih, tmp_path):
    table = pd.read_csv(fake_nih / "Data_Entry_2017.csv")
    lines = [f"{name} {int('Cardiomegaly' in f)} {1 - int('Effusion' in f)}"  # Effusion flipped
             for name, f in zip(table["Image Index"], table["Finding Labels"])]
    (fake_nih / "train_list.txt").write_text("\n".join(lines[:60]) + "\n")
    raw = nih_config(fake_nih, tmp_path / "run")
    raw["data"]["split"]["files"] = {"train": str(fake_nih / "train_list.txt"), "test": str(fake_nih / "test_list.txt")}
    with pytest.raises(DataError, match=r"train_list.txt: the labels of \d+ images disagree with the dataset's"):
        prepare_table(config_from_dict(raw))


def test_patient_in_two_split_files_is_refused(fake_nih, tmp_path):
    names = (fake_nih / "train_val_list.txt").read_text().split()
    (fake_nih / "test_list.txt").write_text(names[-1] + "\n")  # the second image of a train patient
    (fake_nih / "train_val_list.txt").write_text("\n".join(names[:-1]) + "\n")
    with pytest.raises(DataError, match="is in more than one split"):
        prepare_table(config_from_dict(nih_config(fake_nih, tmp_path / "run")))


def test_missing_images_skip_with_a_count_or_fail_naming_the_image(fake_nih, tmp_path):
    (fake_nih / "images" / "00000002_001.png").unlink()
    with pytest.raises(DataError, match=r"1 of 80 images cannot be used .*00000002_001.png: image file not found"):
        prepare_table(config_from_dict(nih_config(fake_nih, tmp_path / "run")))
    raw = nih_config(fake_nih, tmp_path / "run")
    raw["data"]["on_missing"] = "skip"
    with pytest.warns(UserWarning, match=r"skipped 1 of 80 images \(\w+ 1\) that cannot be used .*00000002_001.png: "
                                         r"image file not found"):
        assert len(prepare_table(config_from_dict(raw))) == 79


def test_chexpert_ignore_policy_masks_uncertain_labels_in_training(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "CheXpert-v1.0-small"
    rows = ["Path,Sex,Age,Frontal/Lateral,AP/PA,Edema,Cardiomegaly"]
    for i in range(48):
        rel = f"CheXpert-v1.0-small/train/patient{i // 2:05d}/study1/view{i % 2 + 1}_frontal.jpg"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / rel)
        edema = ["1.0", "0.0", "-1.0", ""][i % 4]
        rows.append(f"{rel},Male,50,Frontal,AP,{edema},{['1.0', '0.0'][i % 3 == 0]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    raw = {"model": dict(TINY_VIT), "method": {"name": "full"},
           "data": {"format": "chexpert", "csv": str(root / "train.csv"), "labels": ["Edema", "Cardiomegaly"],
                    "uncertainty": {"default": "zeros", "Edema": "ignore"},
                    "split": {"val_fraction": 0.25, "test_fraction": 0.25}},
           "train": {"epochs": 1, "batch_size": 8}, "output_dir": str(tmp_path / "run")}
    metrics = medpeft.train(config_from_dict(raw), quiet=True)
    unknown = metrics["val"]["per_label"]["Edema"]["unknown"] + metrics["test"]["per_label"]["Edema"]["unknown"]
    assert unknown > 0 and metrics["val"]["per_label"]["Cardiomegaly"]["unknown"] == 0


def test_rsna_format_trains_on_dicom_images(tmp_path):
    from test_dicom import write_dicom

    rng = np.random.default_rng(2)
    (tmp_path / "stage_2_train_images").mkdir()
    rows = ["patientId,x,y,width,height,Target"]
    for i in range(40):
        pid = f"p{i:04d}"
        sick = i % 2
        pixels = rng.integers(800, 1200, (48, 48)).astype(np.uint16)
        if sick:
            pixels[10:30, 10:30] += 1500
            rows += [f"{pid},10,10,20,20,1", f"{pid},30,30,5,5,1"]  # two boxes, one patient
        else:
            rows.append(f"{pid},,,,,0")
        photometric = "MONOCHROME1" if i % 3 == 0 else "MONOCHROME2"
        write_dicom(tmp_path / "stage_2_train_images" / f"{pid}.dcm", pixels, photometric=photometric)
    (tmp_path / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    raw = {"model": dict(TINY_VIT), "method": {"name": "lora"},
           "data": {"format": "rsna", "csv": str(tmp_path / "stage_2_train_labels.csv"),
                    "split": {"val_fraction": 0.25, "test_fraction": 0.25}},
           "train": {"epochs": 1, "batch_size": 8}, "output_dir": str(tmp_path / "run")}
    config = config_from_dict(raw)
    assert config.data.labels == ["Pneumonia"]
    table = prepare_table(config)
    assert len(table) == 40 and int(table["Pneumonia"].sum()) == 20
    metrics = medpeft.train(config, quiet=True)
    assert metrics["split_sizes"]["train"] + metrics["split_sizes"]["val"] + metrics["split_sizes"]["test"] == 40


def test_data_inspect_split_and_cache_commands(fake_nih, tmp_path):
    from typer.testing import CliRunner

    from medpeft.cli import app
    from medpeft.data.label_fractions import read_split_file

    config = tmp_path / "nih.yaml"
    raw = nih_config(fake_nih, tmp_path / "run")
    del raw["output_dir"]
    config.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    inspect = runner.invoke(app, ["data", "inspect", str(config)], terminal_width=200)
    assert inspect.exit_code == 0, inspect.output
    assert "test" in inspect.output and "20" in inspect.output and "Effusion" in inspect.output
    out = tmp_path / "splits"
    done = runner.invoke(app, ["data", "split", str(config), "--out", str(out), "--fractions", "0.1,0.5,1"])
    assert done.exit_code == 0, done.output
    small, half, full = (set(read_split_file(out / f"train_{f}.txt")) for f in ("0.1", "0.5", "1"))
    assert small < half < full and len(read_split_file(out / "test.txt")) == 20
    cached = runner.invoke(app, ["data", "cache", str(config), "--set", f"data.cache_dir={tmp_path / 'cache'}",
                                 "--workers", "1"], terminal_width=200)
    assert cached.exit_code == 0, cached.output
    assert "80 images at 32x32" in cached.output and len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1
    # the written files drive a run as they are
    raw["data"]["split"] = {"files": {"train": str(out / "train_0.5.txt"), "val": str(out / "val.txt"),
                                      "test": str(out / "test.txt")}}
    raw["output_dir"] = str(tmp_path / "run")
    table = prepare_table(config_from_dict(raw))
    assert set(table.loc[table["split"] == "train", "image_id"]) == half


def test_folder_per_class_with_patient_ids_from_file_names(tmp_path):
    rng = np.random.default_rng(4)
    for label, shift in (("NORMAL", 0), ("PNEUMONIA", 70)):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(24):
            image = np.clip(rng.normal(90 + shift, 20, (32, 32)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / "train" / label / f"person{i // 2}_{label.lower()}_{i}.jpeg")
    (tmp_path / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    raw = {"model": dict(TINY_VIT), "method": {"name": "full"},
           "data": {"format": "folder", "csv": str(tmp_path / "train"), "labels": ["NORMAL", "PNEUMONIA"],
                    "task": "multiclass", "patient_pattern": r"^(person\d+)_",
                    "split": {"val_fraction": 0.25, "test_fraction": 0.25}},
           "train": {"epochs": 1, "batch_size": 8}, "output_dir": str(tmp_path / "run")}
    table = prepare_table(config_from_dict(raw))
    assert len(table) == 48 and table["patient_id"].nunique() == 12
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert table.loc[table["image_id"] == "PNEUMONIA/person0_pneumonia_1.jpeg", "PNEUMONIA"].item() == 1.0
    assert medpeft.train(config_from_dict(raw), quiet=True)["val"]["accuracy"] >= 0.0
    raw["data"]["patient_pattern"] = r"^(patient\d+)"
    with pytest.raises(DataError, match="patient_pattern .* does not match"):
        prepare_table(config_from_dict(raw))


def test_medmnist_npz_with_its_own_split(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {}
    for split, n in (("train", 40), ("val", 16), ("test", 16)):
        labels = rng.integers(0, 3, (n, 1))
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8) + (labels[:, :, None] * 60).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    raw = {"model": dict(TINY_VIT), "method": {"name": "lora"},
           "data": {"format": "medmnist", "csv": str(tmp_path / "pneumoniamnist.npz"), "labels": ["a", "b", "c"],
                    "task": "multiclass"},
           "train": {"epochs": 1, "batch_size": 8}, "output_dir": str(tmp_path / "run")}
    table = prepare_table(config_from_dict(raw))
    assert table["split"].value_counts().to_dict() == {"train": 40, "val": 16, "test": 16}
    from medpeft.data.images import load_grayscale

    first = load_grayscale(table["path"].iloc[0])
    assert first.size == (28, 28) and np.array_equal(np.asarray(first), arrays["train_images"][0])
    metrics = medpeft.train(config_from_dict(raw), quiet=True)
    assert metrics["split_sizes"] == {"train": 40, "val": 16, "test": 16}
    raw["data"]["labels"] = ["a", "b"]
    with pytest.raises(DataError, match=r"one class index in \[0, 2\)"):
        prepare_table(config_from_dict(raw))
