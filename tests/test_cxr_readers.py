"""Readers against the real label and split files of NIH ChestX-ray14, CheXpert and RSNA Pneumonia
(../shared/data/cxr-metadata); skipped where that folder is absent."""

from pathlib import Path

import pandas as pd
import pytest

from medpeft.config import DataConfig, build
from medpeft.data import read_dataset, read_split_dataset
from medpeft.data.chexpert import read_chexpert
from medpeft.data.labels import CHEXPERT_COMPETITION_LABELS as COMPETITION_LABELS, NIH_LABELS, RSNA_CLASSES
from medpeft.data.nih import read_nih
from medpeft.data.rsna import read_rsna
from medpeft.data.split_list import label_mismatches, read_split_list
from medpeft.errors import DataError

META = Path(__file__).resolve().parents[1] / "../shared/data/cxr-metadata"
pytestmark = pytest.mark.skipif(not META.is_dir(), reason=f"real CXR metadata not found at {META}")
NIH = META / "nih-chestxray14"
SPLITS = META / "splits"


@pytest.fixture(scope="module")
def nih2017():
    return read_nih(NIH / "Data_Entry_2017.csv")


@pytest.fixture(scope="module")
def chexpert_train():
    return read_chexpert(META / "chexpert" / "train.csv", uncertainty="med-peft")


def test_nih_reader_reproduces_the_published_counts(nih2017):
    assert len(nih2017) == 112_120 and nih2017["patient_id"].nunique() == 30_805
    assert nih2017["view"].value_counts().to_dict() == {"PA": 67_310, "AP": 44_810}
    counts = nih2017[list(NIH_LABELS)].sum().astype(int).to_dict()
    assert counts == {"Infiltration": 19_870, "Effusion": 13_307, "Atelectasis": 11_535, "Nodule": 6_323,
                      "Mass": 5_746, "Pneumothorax": 5_298, "Consolidation": 4_667, "Pleural_Thickening": 3_385,
                      "Cardiomegaly": 2_772, "Emphysema": 2_516, "Edema": 2_303, "Fibrosis": 1_686,
                      "Pneumonia": 1_353, "Hernia": 227}
    assert int((nih2017[list(NIH_LABELS)].sum(axis=1) == 0).sum()) == 60_412  # No Finding


def test_nih_official_split_with_patient_disjoint_validation():
    config = {"format": "nih", "csv": str(NIH / "Data_Entry_2017.csv"),
              "split": {"files": {"train_val": str(NIH / "train_val_list.txt"), "test": str(NIH / "test_list.txt")},
                        "val_fraction": 0.1, "seed": 0}}
    table = read_split_dataset(build(DataConfig, config))
    sizes = table["split"].value_counts().to_dict()
    assert sizes["test"] == 25_596 and sizes["train"] + sizes["val"] == 86_524
    assert abs(sizes["val"] / 86_524 - 0.1) < 0.01
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    again = read_split_dataset(build(DataConfig, config))
    assert again["split"].equals(table["split"])


def test_nih_view_filter_is_explicit():
    assert len(read_dataset(build(DataConfig, {"format": "nih", "csv": str(NIH / "Data_Entry_2017.csv"),
                                                "views": ["PA"]}))) == 67_310


@pytest.mark.parametrize("repo", ["MED-PEFT", "MRM-pytorch"])
def test_nih_2017_labels_agree_with_the_med_peft_and_mrm_lists(nih2017, repo):
    sizes = {}
    for name in ("train_list", "val_list", "test_list", "train_1", "train_10"):
        listed = read_split_list(SPLITS / repo / "NIH_ChestX-ray" / f"{name}.txt", NIH_LABELS)
        assert len(label_mismatches(nih2017, listed, NIH_LABELS)) == 0
        sizes[name] = len(listed)
    assert sizes == {"train_list": 78_468, "val_list": 11_219, "test_list": 22_433, "train_1": 785, "train_10": 7_847}


def test_nih_v2020_labels_agree_with_the_medical_mae_official_lists():
    table = read_nih(NIH / "Data_Entry_2017_v2020.csv")
    total = 0
    for name, size in (("train", 75_312), ("val", 11_212), ("test", 25_596)):
        listed = read_split_list(SPLITS / "medical_mae/data_splits/chestxray" / f"{name}_official.txt", NIH_LABELS)
        assert len(listed) == size and len(label_mismatches(table, listed, NIH_LABELS)) == 0
        total += size
    assert total == 112_120
    # ...and the 2017 labels do not: the relabel changed 181 images.
    listed = read_split_list(SPLITS / "medical_mae/data_splits/chestxray/test_official.txt", NIH_LABELS)
    assert len(label_mismatches(read_nih(NIH / "Data_Entry_2017.csv"), listed, NIH_LABELS)) > 0


def test_chexpert_reader_reproduces_the_published_counts(chexpert_train):
    assert len(chexpert_train) == 223_414
    assert len(read_chexpert(META / "chexpert" / "train.csv", frontal_only=True)) == 191_027
    valid = read_chexpert(META / "chexpert" / "valid.csv")
    assert len(valid) == 234 and int(valid["view"].isin(["AP", "PA"]).sum()) == 202
    assert chexpert_train["patient_id"].str.fullmatch(r"patient\d{5}").all()


def test_chexpert_med_peft_preset_agrees_with_the_med_peft_lists(chexpert_train):
    for name, size in (("train_10", 22_341), ("train_1", 2_234)):
        listed = read_split_list(SPLITS / "MED-PEFT/CheXpert" / f"{name}.txt", COMPETITION_LABELS)
        assert len(listed) == size and len(label_mismatches(chexpert_train, listed, COMPETITION_LABELS)) == 0
    valid = read_chexpert(META / "chexpert" / "valid.csv", uncertainty="med-peft")
    listed = read_split_list(SPLITS / "MED-PEFT/CheXpert/val_list.txt", COMPETITION_LABELS)
    assert len(listed) == 234 and len(label_mismatches(valid, listed, COMPETITION_LABELS)) == 0
    # Another policy gives other labels: the agreement is not a coincidence.
    ones = read_chexpert(META / "chexpert" / "train.csv", uncertainty="ones")
    listed = read_split_list(SPLITS / "MED-PEFT/CheXpert/train_10.txt", COMPETITION_LABELS)
    assert len(label_mismatches(ones, listed, COMPETITION_LABELS)) > 0


def test_chexpert_ignore_policy_masks_uncertain_labels():
    table = read_chexpert(META / "chexpert" / "valid.csv", uncertainty={"default": "zeros", "Edema": "ignore"})
    raw = pd.read_csv(META / "chexpert" / "valid.csv")
    assert table["Edema"].isna().sum() == (raw["Edema"] == -1).sum()
    assert not table["Atelectasis"].isna().any()


def test_rsna_reader_gives_one_row_per_patient_with_max_target():
    table = read_rsna(META / "rsna-pneumonia" / "stage_2_train_labels.csv")
    assert len(table) == 26_684 and int(table["Pneumonia"].sum()) == 6_012
    three = read_rsna(META / "rsna-pneumonia" / "stage_2_train_labels.csv",
                      META / "rsna-pneumonia" / "stage_2_detailed_class_info.csv")
    assert (three[list(RSNA_CLASSES)].sum(axis=1) == 1).all()
    assert int(three["Lung Opacity"].sum()) == 6_012


def test_rsna_labels_agree_with_the_med_peft_lists():
    table = read_rsna(META / "rsna-pneumonia" / "stage_2_train_labels.csv")
    sizes = {}
    for name in ("train_list", "val_list", "train_1", "train_10"):
        listed = read_split_list(SPLITS / "MED-PEFT/RSNA_Pneumonia" / f"{name}.txt", ["Pneumonia"])
        assert len(label_mismatches(table, listed, ["Pneumonia"])) == 0
        sizes[name] = len(listed)
    assert sizes == {"train_list": 25_184, "val_list": 1_500, "train_1": 251, "train_10": 2_518}


def test_split_list_whose_labels_disagree_is_reported(tmp_path, nih2017):
    bad = tmp_path / "list.txt"
    bad.write_text("00000001_000.png 0 1 0 0 0 0 0 0 0 0 0 0 0 0 \n00000001_001.png 1 1 0 0 0 0 0 0 0 0 0 0 0 0\n")
    mismatched = label_mismatches(nih2017, read_split_list(bad, NIH_LABELS), NIH_LABELS)
    assert mismatched["image_id"].tolist() == ["00000001_001.png"]
    bad.write_text("00000001_000.png 0 1 0\n")
    with pytest.raises(DataError, match=r"list.txt: line 1: expected an image path and 14 labels"):
        read_split_list(bad, NIH_LABELS)
