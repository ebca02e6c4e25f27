"""The readers' subgroup columns (meta:sex, meta:age, meta:view, ...): age groups, DataConfig.subgroups(),
and the counts on the real NIH and CheXpert label files (../shared/data/cxr-metadata; those tests skip
where it is absent), each against counts computed here with pandas on the raw CSV."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medpeft.config import DataConfig, build
from medpeft.data import read_dataset
from medpeft.data.chexpert import read_chexpert
from medpeft.data.nih import read_nih
from medpeft.data.rsna import read_rsna
from medpeft.data.table import age_group_names, bin_ages
from medpeft.errors import ConfigError, DataError

META = Path(__file__).resolve().parents[1] / "../shared/data/cxr-metadata"
real_files = pytest.mark.skipif(not META.is_dir(), reason=f"real CXR metadata not found at {META}")
EDGES = [20, 40, 60, 80]


def reference_groups(years: pd.Series, edges) -> pd.Series:
    """Age groups by pandas.cut (left-closed bins), labelled in the test: an independent binning."""
    bounds = [0, *edges, np.inf]
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(bounds[:-2], bounds[1:-1])] + [f"{edges[-1]}+"]
    return pd.cut(years, bounds, right=False, labels=names).astype(object).fillna("")


def counts(series: pd.Series) -> dict:
    return series.value_counts().to_dict()


def test_ages_in_years_and_dicom_units_fall_in_left_closed_groups():
    cells = pd.Series(["0", "19", "19.9", "20", "058Y", "006M", "011M", "030W", "003D", "080Y", "412Y", "", " 45 "])
    assert bin_ages(cells, EDGES, str).tolist() == [
        "0-19", "0-19", "0-19", "20-39", "40-59", "0-19", "0-19", "0-19", "0-19", "80+", "80+", "", "40-59"]
    assert age_group_names([18, 65]) == ["0-17", "18-64", "65+"]
    assert bin_ages(pd.Series(["17", "18", "64.9", "65Y"]), [18, 65], str).tolist() == ["0-17", "18-64", "18-64",
                                                                                        "65+"]


@pytest.mark.parametrize("cell", ["abc", "-3", "58 years", "058X", "1e2"])
def test_an_unreadable_age_names_its_file_row_and_column(cell):
    with pytest.raises(DataError, match=rf"^f.csv: row 3: column 'Age' has '{cell}', expected an age in years"):
        bin_ages(pd.Series(["40", cell]), EDGES, lambda i: f"f.csv: row {i + 2}: column 'Age'")


@pytest.mark.parametrize("bins", [[], [40, 20], [20, 20], [0, 20]])
def test_age_bins_must_be_positive_and_strictly_increasing(bins):
    with pytest.raises(ConfigError, match=r"^data\.age_bins"):
        build(DataConfig, {"format": "nih", "csv": "x.csv", "age_bins": bins})


def test_each_format_names_its_subgroup_columns():
    def subgroups(**data):
        return build(DataConfig, {"csv": "x.csv", **data}).subgroups()

    assert subgroups(format="nih") == ["sex", "age", "view"]
    assert subgroups(format="chexpert") == ["sex", "age", "frontal_lateral", "ap_pa"]
    assert subgroups(format="rsna") == ["sex", "age", "view"]
    assert subgroups(format="folder") == []


def test_a_bad_cell_in_a_subgroup_column_names_its_row(tmp_path):
    csv = tmp_path / "train.csv"
    rows = ["Path,Sex,Age,Frontal/Lateral,AP/PA,Edema",
            "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0",
            "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,female,70,Frontal,AP,1.0"]
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"train.csv: row 3: column 'Sex' has 'female', expected one of "
                                        r"\['Male', 'Female', 'Unknown'\]"):
        read_chexpert(csv, ["Edema"])
    csv.write_text("\n".join(rows).replace("female,70", "Female,seventy") + "\n")
    with pytest.raises(DataError, match=r"train.csv: row 3: column 'Age' has 'seventy'"):
        read_chexpert(csv, ["Edema"])


def test_an_uncertainty_preset_applies_to_a_subset_of_its_labels():
    from medpeft.data.chexpert import resolve_uncertainty

    # the phantoms' CheXpert labels leave out Atelectasis and Edema, which the med-peft preset names
    assert resolve_uncertainty("med-peft", ["Edema", "Cardiomegaly"]) == {"Edema": "ones", "Cardiomegaly": "zeros"}
    with pytest.raises(ConfigError, match=r"data.uncertainty names labels not in \['Edema'\]: \['Atelectasis'\]"):
        resolve_uncertainty({"Atelectasis": "ones"}, ["Edema"])


def nih_reference_years(ages: pd.Series) -> pd.Series:
    """'058Y' / '004M' / '001D' (2017) or '58' (v2020) -> years."""
    unit = ages.str[-1].where(~ages.str[-1].str.isdigit(), "Y")
    number = ages.str.rstrip("YMD").astype(float)
    return number / unit.map({"Y": 1, "M": 12, "D": 365.25})


@real_files
@pytest.mark.parametrize("name", ["Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"])
def test_nih_subgroup_counts_are_the_csvs(name):
    path = META / "nih-chestxray14" / name
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    table = read_nih(path)
    assert counts(table["meta:sex"]) == counts(raw["Patient Gender"]) == {"M": 63_340, "F": 48_780}
    assert counts(table["meta:view"]) == counts(raw["View Position"])
    assert (table["meta:view"] == table["view"]).all()
    expected = reference_groups(nih_reference_years(raw["Patient Age"]), EDGES)
    assert (table["meta:age"] == expected).all() and table["meta:age"].nunique() == 5
    fewer = read_nih(path, age_bins=[50])
    assert counts(fewer["meta:age"]) == counts(reference_groups(nih_reference_years(raw["Patient Age"]), [50]))


@real_files
@pytest.mark.parametrize("name", ["train.csv", "valid.csv"])
def test_chexpert_subgroup_counts_are_the_csvs(name):
    path = META / "chexpert" / name
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    table = read_chexpert(path)
    assert counts(table["meta:sex"]) == counts(raw["Sex"].replace({"Male": "M", "Female": "F", "Unknown": ""}))
    assert counts(table["meta:frontal_lateral"]) == counts(raw["Frontal/Lateral"])
    lateral = raw["Frontal/Lateral"] == "Lateral"
    assert counts(table["meta:ap_pa"]) == counts(raw["AP/PA"].where(~lateral, ""))
    assert (table.loc[lateral.to_numpy(), "meta:ap_pa"] == "").all()
    assert (table["meta:age"] == reference_groups(raw["Age"].astype(float), EDGES)).all()


@real_files
def test_read_dataset_carries_the_subgroup_columns_with_the_configured_age_bins():
    path = META / "chexpert" / "valid.csv"
    config = build(DataConfig, {"format": "chexpert", "csv": str(path), "age_bins": [30, 60]})
    table = read_dataset(config)
    assert [c for c in table.columns if c.startswith("meta:")] == [f"meta:{n}" for n in config.subgroups()]
    raw = pd.read_csv(path)
    assert counts(table["meta:age"]) == counts(reference_groups(raw["Age"].astype(float), [30, 60]))
    assert set(table["meta:age"]) <= {"0-29", "30-59", "60+"}


def test_phantom_layouts_give_the_same_images_targets_and_subgroups_to_both_readers(tmp_path):
    from phantom_layouts import CHEXPERT_NAMES, NIH_NAMES, write_phantom_layouts

    files = write_phantom_layouts(tmp_path, n_patients=12, size=32)
    nih = read_dataset(build(DataConfig, {"format": "nih", "csv": files["nih"]}))
    chexpert = read_dataset(build(DataConfig, {"format": "chexpert", "csv": files["chexpert"],
                                               "labels": list(CHEXPERT_NAMES.values())}))
    phantoms = pd.read_csv(tmp_path / "phantoms" / "labels.csv")
    assert len(nih) == len(chexpert) == len(phantoms)
    assert nih["patient_id"].nunique() == chexpert["patient_id"].nunique() == 12
    assert len(pd.read_csv(files["chexpert"][1])) > 0  # valid.csv holds the last patients' images
    for finding, name in NIH_NAMES.items():
        assert (nih[name].to_numpy() == phantoms[finding].to_numpy()).all()
        assert (chexpert[CHEXPERT_NAMES[finding]].to_numpy() == phantoms[finding].to_numpy()).all()
    assert phantoms[list(NIH_NAMES)].to_numpy().any() and not phantoms[list(NIH_NAMES)].to_numpy().all()
    for a, b in zip(nih["path"], chexpert["path"]):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert (nih["meta:sex"] == chexpert["meta:sex"]).all() and set(nih["meta:sex"]) == {"M", "F"}
    assert (nih["meta:age"] == chexpert["meta:age"]).all() and nih["meta:age"].nunique() > 1
    assert (nih["meta:view"] == chexpert["meta:ap_pa"]).all() and set(nih["view"]) == {"PA", "AP"}
    assert (nih.groupby("patient_id")[["meta:sex", "meta:age"]].nunique() == 1).all().all()


def write_rsna(root, headers: dict) -> Path:
    """stage_2_train_labels.csv over the patients of `headers` {patient: DICOM elements, or None: no image}."""
    from test_dicom import GRADIENT, write_dicom

    (root / "stage_2_train_images").mkdir(parents=True)
    for patient, elements in headers.items():
        if elements is not None:
            write_dicom(root / "stage_2_train_images" / f"{patient}.dcm", GRADIENT, **elements)
    rows = ["patientId,x,y,width,height,Target", *(f"{patient},,,,,0" for patient in headers)]
    (root / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    return root / "stage_2_train_labels.csv"


def test_rsna_subgroups_come_from_each_dicom_header(tmp_path):
    csv = write_rsna(tmp_path, {
        "a": {"PatientSex": "F", "PatientAge": "045Y", "ViewPosition": "PA"},
        "b": {"PatientSex": "M", "PatientAge": "006M", "ViewPosition": "AP"},
        "c": {"PatientSex": "O", "PatientAge": "081Y", "ViewPosition": "AP"},
        "d": {"PatientSex": "M"},  # no age, no view
        "e": None,  # image missing
    })
    (tmp_path / "stage_2_train_images" / "f.dcm").write_bytes(b"not a DICOM file" * 20)
    with open(csv, "a") as f:
        f.write("f,,,,,0\n")
    table = read_dataset(build(DataConfig, {"format": "rsna", "csv": str(csv), "age_bins": [18, 65]}))
    got = table.set_index("patient_id")[["view", "meta:sex", "meta:age", "meta:view"]].T.to_dict("list")
    assert got == {"a": ["PA", "F", "18-64", "PA"], "b": ["AP", "M", "0-17", "AP"], "c": ["AP", "O", "65+", "AP"],
                   "d": ["", "M", "", ""], "e": ["", "", "", ""], "f": ["", "", "", ""]}


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # pydicom's, writing and reading it
def test_an_unreadable_dicom_age_names_the_file(tmp_path):
    csv = write_rsna(tmp_path, {"a": {"PatientAge": "045Y"}, "b": {"PatientAge": "45 years"}})
    with pytest.raises(DataError, match=r"b\.dcm: DICOM PatientAge has '45 years', expected an age"):
        read_rsna(csv)


@real_files
def test_rsna_without_its_images_has_blank_subgroups():
    table = read_rsna(META / "rsna-pneumonia" / "stage_2_train_labels.csv")
    assert len(table) == 26_684
    assert (table[["view", "meta:sex", "meta:age", "meta:view"]] == "").all().all()
