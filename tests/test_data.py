from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medpeft.config import SplitConfig
from medpeft.data.csv_reader import CSVData, read_csv_dataset
from medpeft.data.images import check_images, load_grayscale
from medpeft.data.splits import assign_splits, patient_split
from medpeft.errors import DataError


def write_csv(tmp_path, text):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_zero_one_columns_become_the_label_table(tmp_path):
    csv = write_csv(tmp_path, "path,pid,A,B\nx/1.png,p1,1,0\nx/2.png,p1,0,1\nx/3.png,p2,1,1\n")
    table = read_csv_dataset(CSVData(csv=str(csv), patient_column="pid", labels=["B", "A"]))
    assert list(table.columns) == ["image_id", "path", "patient_id", "view", "B", "A"]
    assert table[["B", "A"]].to_numpy().tolist() == [[0, 1], [1, 0], [1, 1]]
    assert table["path"].iloc[0] == str(tmp_path / "x/1.png")
    assert table["patient_id"].tolist() == ["p1", "p1", "p2"]


def test_delimited_names_with_negative_name(tmp_path):
    csv = write_csv(tmp_path, "img,findings\n1.png,Effusion|Mass\n2.png,No Finding\n3.png,Mass\n")
    table = read_csv_dataset(CSVData(csv=str(csv), path_column="img", label_column="findings",
                                        labels=["Mass", "Effusion"]))
    assert table[["Mass", "Effusion"]].to_numpy().tolist() == [[1, 1], [0, 0], [1, 0]]
    assert table["patient_id"].tolist() == ["1.png", "2.png", "3.png"]  # one patient per image by default


def test_multiclass_names_need_exactly_one_label_per_row(tmp_path):
    csv = write_csv(tmp_path, "path,subtype\n1.png,virus\n2.png,bacteria\n3.png,normal\n")
    table = read_csv_dataset(CSVData(csv=str(csv), label_column="subtype", task="multiclass",
                                        labels=["normal", "bacteria", "virus"], negative_names=[]))
    assert table[["normal", "bacteria", "virus"]].to_numpy().argmax(1).tolist() == [2, 1, 0]
    bad = write_csv(tmp_path, "path,subtype\n1.png,virus\n2.png,\n")
    with pytest.raises(DataError, match="row 3: a multiclass row needs exactly one label, got 0"):
        read_csv_dataset(CSVData(csv=str(bad), label_column="subtype", task="multiclass",
                                    labels=["normal", "virus"], negative_names=[]))


@pytest.mark.parametrize("text, config, message", [
    ("img,A\n1.png,1\n", {"labels": ["A"]}, "column 'path' not found"),
    ("path,A\n1.png,1\n", {"labels": ["A", "B"]}, "column 'B' not found"),
    ("path,A\n1.png,1\n2.png,yes\n", {"labels": ["A"]}, "row 3: column 'A' has 'yes', expected 0 or 1"),
    ("path,A\n1.png,1\n1.png,0\n", {"labels": ["A"]}, "row 3: image '1.png' is listed again, first at row 2"),
    ("path,f\n1.png,A|Zebra\n", {"labels": ["A"], "label_column": "f"}, "row 2: unknown label 'Zebra'"),
])
def test_bad_csv_names_file_row_and_expectation(tmp_path, text, config, message):
    csv = write_csv(tmp_path, text)
    with pytest.raises(DataError, match=f"labels.csv: {message}"):
        read_csv_dataset(CSVData(csv=str(csv), **config))


def test_missing_csv_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="missing.csv: labels CSV not found"):
        read_csv_dataset(CSVData(csv=str(tmp_path / "missing.csv"), labels=["A"]))


def test_patient_split_keeps_patients_on_one_side_and_is_seeded():
    patients = pd.Series([f"p{i // 3}" for i in range(300)])
    a = patient_split(patients, 0.2, 0.2, seed=0)
    assert (pd.DataFrame({"p": patients, "s": a}).groupby("p")["s"].nunique() == 1).all()
    assert np.array_equal(a, patient_split(patients, 0.2, 0.2, seed=0))
    assert not np.array_equal(a, patient_split(patients, 0.2, 0.2, seed=1))
    for name, fraction in (("val", 0.2), ("test", 0.2), ("train", 0.6)):
        assert abs((a == name).mean() - fraction) < 0.03


def test_split_column_is_checked_for_values_and_patient_leaks():
    table = pd.DataFrame({"patient_id": ["a", "a", "b"], "split": ["train", "val", "val"]})
    with pytest.raises(DataError, match=r"patient 'a' is in more than one split \(train, val\)"):
        assign_splits(table, SplitConfig(column="fold"), "x.csv")
    table["split"] = ["train", "train", "valid"]
    with pytest.raises(DataError, match="row 4: split column 'fold' has 'valid'"):
        assign_splits(table, SplitConfig(column="fold"), "x.csv")


def test_images_of_any_mode_decode_to_8_bit_gray(tmp_path):
    gray16 = np.full((8, 8), 257 * 128, dtype=np.uint16)  # 16-bit value of 8-bit 128
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    Image.new("RGBA", (8, 8), (200, 200, 200, 255)).save(tmp_path / "rgba.png")  # opaque: alpha carries nothing
    Image.new("RGB", (8, 8), (10, 10, 10)).save(tmp_path / "rgb.jpg")
    assert load_grayscale(str(tmp_path / "g16.png")).getpixel((0, 0)) == 128
    assert load_grayscale(str(tmp_path / "rgba.png")).getpixel((0, 0)) == 200
    Image.new("RGBA", (8, 8), (200, 200, 200, 0)).save(tmp_path / "clear.png")
    with pytest.raises(DataError, match="clear.png: has transparent pixels"):
        load_grayscale(str(tmp_path / "clear.png"))
    assert abs(load_grayscale(str(tmp_path / "rgb.jpg")).getpixel((0, 0)) - 10) <= 2


def test_missing_and_unreadable_images_are_named_or_skipped(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    table = pd.DataFrame({"image_id": ["ok.png", "gone.png", "bad.png"], "split": ["train", "val", "train"],
                          "path": [str(tmp_path / n) for n in ("ok.png", "gone.png", "bad.png")]})
    data = CSVData(csv="labels.csv", labels=["A"], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"labels.csv: 2 of 3 images cannot be used \(data.on_missing=skip leaves "
                                        r"them out\): .*gone.png: image file not found; .*bad.png: unreadable"):
        check_images(table, data)
    with pytest.warns(UserWarning, match=r"skipped 2 of 3 images \(train 1, val 1\)"):
        kept = check_images(table, replace(data, on_missing="skip"))
    assert kept["image_id"].tolist() == ["ok.png"]
    with pytest.raises(DataError, match="bad.png: unreadable image"):
        load_grayscale(str(tmp_path / "bad.png"))
