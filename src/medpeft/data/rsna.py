"""RSNA Pneumonia Detection Challenge (2018): ``stage_2_train_labels.csv`` (one row per box, or one
row with Target 0) and ``stage_2_detailed_class_info.csv``. One image (DICOM) per patient.

Subgroup columns, from each image's DICOM header (read without its pixels when the table is read):
meta:sex (PatientSex: M, F, O), meta:age (PatientAge: '058Y', '006M', ...; binned by data.age_bins) and
meta:view (ViewPosition: PA, AP; also the table's view). They are blank for an image that is missing or
not DICOM: the image check then reports that file (data.on_missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.config import DATA_FORMATS, DataConfig, option
from medpeft.config.sections import AGE_BINS
from medpeft.data.dicom import read_header
from medpeft.data.labels import RSNA_CLASSES, RSNA_LABELS
from medpeft.data.table import META_PREFIX, bin_ages, read_table_file, require_columns
from medpeft.errors import DataError

IMAGE_FOLDER = "stage_2_train_images"
HEADER = {"sex": "PatientSex", "age": "PatientAge", "view": "ViewPosition"}
"""Each subgroup column's DICOM keyword."""


@DATA_FORMATS.register("rsna")
@dataclass
class RSNAData(DataConfig):
    """RSNA Pneumonia: data.csv is ``stage_2_train_labels.csv``; one image (DICOM) per patient, label =
    max Target, or the 3 classes with class_info."""

    image_root: str | None = option(None, "Folder holding stage_2_train_images (default: the CSV's folder).")
    class_info: str | None = option(None, "stage_2_detailed_class_info.csv, for the 3-class task (labels: "
                                    "the three classes).")

    def default_labels(self) -> tuple[str, ...]:
        return RSNA_CLASSES if self.class_info else RSNA_LABELS

    def known_labels(self) -> tuple[str, ...]:
        return self.default_labels()

    def subgroups(self) -> list[str]:
        return list(HEADER)

    def read(self, path: str) -> pd.DataFrame:
        return read_rsna(path, self.class_info, self.image_root, self.age_bins)


def read_rsna(train_labels: str | Path, detailed_class_info: str | Path | None = None,
              image_dir: str | Path | None = None, age_bins=AGE_BINS) -> pd.DataFrame:
    """The plain table, one row per patient: 'Pneumonia' = max Target over the patient's rows, or with
    `detailed_class_info` the three classes one-hot (Normal / No Lung Opacity - Not Normal / Lung Opacity);
    the subgroup columns from the DICOM headers (ages in groups of `age_bins`).

    ``image_id`` is ``stage_2_train_images/<patientId>.dcm``, as the published split lists write it;
    `image_dir` is the folder that holds ``stage_2_train_images`` (default: the CSV's folder).
    """
    train_labels = Path(train_labels)
    boxes = read_table_file(train_labels, "RSNA train labels")
    require_columns(boxes, ["patientId", "Target"], train_labels)
    bad = ~boxes["Target"].isin(["0", "1"])
    if bad.any():
        row = int(np.argmax(bad.to_numpy())) + 2
        raise DataError(f"{train_labels}: row {row}: Target is {boxes['Target'].iloc[row - 2]!r}, expected 0 or 1")
    target = boxes.assign(Target=boxes["Target"].astype(int)).groupby("patientId", sort=False)["Target"].max()
    patients = target.index.to_series()
    image_ids = IMAGE_FOLDER + "/" + patients + ".dcm"
    root = Path(image_dir) if image_dir else train_labels.parent
    paths = [str(root / i) for i in image_ids]
    subgroups = _subgroups(paths, age_bins)
    table = pd.DataFrame({"image_id": image_ids.to_numpy(), "path": paths, "patient_id": patients.to_numpy(),
                          "view": subgroups[META_PREFIX + "view"], **subgroups})
    if detailed_class_info is None:
        table["Pneumonia"] = target.to_numpy().astype(np.float32)
        return table
    info = read_table_file(detailed_class_info, "RSNA detailed class info")
    require_columns(info, ["patientId", "class"], detailed_class_info)
    classes = info.groupby("patientId")["class"].agg(lambda c: c.iloc[0] if c.nunique() == 1 else None)
    conflicting = classes[classes.isna()]
    if len(conflicting):
        raise DataError(f"{detailed_class_info}: patient {conflicting.index[0]} has more than one class")
    per_patient = classes.reindex(patients)
    if per_patient.isna().any():
        raise DataError(f"{detailed_class_info}: no class for patient {per_patient[per_patient.isna()].index[0]}")
    unknown = ~per_patient.isin(RSNA_CLASSES)
    if unknown.any():
        raise DataError(f"{detailed_class_info}: unknown class {per_patient[unknown].iloc[0]!r} "
                        f"(expected one of {list(RSNA_CLASSES)})")
    for name in RSNA_CLASSES:
        table[name] = (per_patient.to_numpy() == name).astype(np.float32)
    if not np.array_equal(table["Lung Opacity"].to_numpy(), target.to_numpy()):
        raise DataError(f"{detailed_class_info}: 'Lung Opacity' disagrees with Target in {train_labels}")
    return table


def _subgroups(paths: list[str], age_bins) -> dict[str, np.ndarray]:
    """meta:sex, meta:age and meta:view from each image's header ('' where it cannot be read)."""
    keywords = list(HEADER.values())
    blank = dict.fromkeys(keywords, "")
    headers = pd.DataFrame([read_header(path, keywords) or blank for path in paths], columns=keywords)
    headers["PatientAge"] = bin_ages(headers["PatientAge"], age_bins, lambda i: f"{paths[i]}: DICOM PatientAge")
    return {META_PREFIX + name: headers[keyword].to_numpy() for name, keyword in HEADER.items()}
