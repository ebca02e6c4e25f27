"""CheXpert (Irvin et al. 2019), v1.0 and v1.0-small: ``train.csv`` / ``valid.csv``.

Cells are 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or blank (not mentioned = negative).
What an uncertain label becomes is a policy per label: 'ones', 'zeros' or 'ignore' (NaN: masked
out of the loss and the metric).

Subgroup columns: meta:sex ('Sex': Male -> M, Female -> F, Unknown -> ''), meta:age ('Age' in years, binned
by data.age_bins), meta:frontal_lateral (Frontal / Lateral) and meta:ap_pa (the AP/PA cell of a frontal
view: AP, PA, or LL / RL where the CSV writes those; '' for laterals).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.config import DATA_FORMATS, DataConfig, option
from medpeft.config.sections import AGE_BINS
from medpeft.data.labels import CHEXPERT_COMPETITION_LABELS, CHEXPERT_LABELS
from medpeft.data.table import (
    META_PREFIX,
    bin_ages,
    check_unique_ids,
    first_row,
    keep_views,
    read_table_file,
    require_columns,
)
from medpeft.errors import ConfigError, DataError

UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore")
# Named presets; a label missing from a preset takes its 'default'.
UNCERTAINTY_PRESETS = {
    "ones": {"default": "ones"},
    "zeros": {"default": "zeros"},
    "ignore": {"default": "ignore"},
    # U-Ones where it helped in the CheXpert paper, U-Zeros elsewhere: what the MED-PEFT / MRM lists use.
    "med-peft": {"default": "zeros", "Atelectasis": "ones", "Edema": "ones", "Pleural Effusion": "ones"},
}
_VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "": 0.0}
_SEXES = {"Male": "M", "Female": "F", "Unknown": ""}


@DATA_FORMATS.register("chexpert")
@dataclass
class CheXpertData(DataConfig):
    """CheXpert: data.csv is ``train.csv`` / ``valid.csv`` (a list reads both); the 5 competition labels or
    any of the 14."""

    image_root: str | None = option(None, "Folder the CSV's Path column starts in (default: the folder above "
                                    "the dataset folder).")
    uncertainty: str | dict[str, str] = option(
        "med-peft", "Uncertain (-1) labels: a preset (ones, zeros, ignore: masked out of loss and metrics, "
        "med-peft: the MED-PEFT / MRM lists' policy) or {label: policy, default: policy}.")
    frontal_only: bool = option(False, "Drop lateral views.")
    views: list[str] | None = option(None, "Keep only these views (PA, AP, Lateral); None keeps all.")

    def default_labels(self) -> tuple[str, ...]:
        return CHEXPERT_COMPETITION_LABELS

    def known_labels(self) -> tuple[str, ...]:
        return CHEXPERT_LABELS

    def validate(self) -> None:
        super().validate()
        resolve_uncertainty(self.uncertainty, self.labels)

    def subgroups(self) -> list[str]:
        return ["sex", "age", "frontal_lateral", "ap_pa"]

    def read(self, path: str) -> pd.DataFrame:
        table = read_chexpert(path, self.labels, self.uncertainty, self.frontal_only, self.image_root, self.age_bins)
        return keep_views(table, self.views, path)


def resolve_uncertainty(uncertainty: str | dict, labels) -> dict[str, str]:
    """A preset name (its entries for labels not in `labels` unused) or a {label: policy} mapping (with
    optional 'default') -> a policy for every label; ConfigError naming data.uncertainty for an unknown
    preset, label or policy."""
    if isinstance(uncertainty, str):
        if uncertainty not in UNCERTAINTY_PRESETS:
            raise ConfigError(f"data.uncertainty preset {uncertainty!r} is unknown (expected one of "
                              f"{list(UNCERTAINTY_PRESETS)})")
        uncertainty = {k: v for k, v in UNCERTAINTY_PRESETS[uncertainty].items() if k in labels or k == "default"}
    unknown = set(uncertainty) - set(labels) - {"default"}
    if unknown:
        raise ConfigError(f"data.uncertainty names labels not in {list(labels)}: {sorted(unknown)}")
    policies = {name: uncertainty.get(name, uncertainty.get("default", "ignore")) for name in labels}
    bad = {k: v for k, v in policies.items() if v not in UNCERTAINTY_POLICIES}
    if bad:
        raise ConfigError(f"data.uncertainty policies must be one of {list(UNCERTAINTY_POLICIES)}, got {bad}")
    return policies


def read_chexpert(csv: str | Path, labels=CHEXPERT_COMPETITION_LABELS, uncertainty: str | dict = "med-peft",
                  frontal_only: bool = False, image_root: str | Path | None = None,
                  age_bins=AGE_BINS) -> pd.DataFrame:
    """The plain table of a CheXpert CSV, with the subgroup columns (ages in groups of `age_bins`).
    ``image_id`` is the CSV's Path ('CheXpert-v1.0-small/train/...'), resolved against `image_root`
    (default: the folder above the dataset folder, where the CSV's paths start)."""
    csv = Path(csv)
    labels = list(labels)
    unknown = set(labels) - set(CHEXPERT_LABELS)
    if unknown:
        raise DataError(f"CheXpert has no label {sorted(unknown)[0]!r} (labels: {list(CHEXPERT_LABELS)})")
    policies = resolve_uncertainty(uncertainty, labels)
    frame = read_table_file(csv, "CheXpert CSV")
    require_columns(frame, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *labels], csv)
    image_ids = frame["Path"].str.strip()
    check_unique_ids(image_ids, csv)
    patients = image_ids.str.extract(r"(patient\d+)", expand=False)
    if patients.isna().any():
        raise DataError(f"{csv}: row {first_row(patients.isna())}: no 'patientNNNNN' in the Path")
    frontal = frame["Frontal/Lateral"].str.strip() == "Frontal"
    root = Path(image_root) if image_root else csv.parent.parent
    table = pd.DataFrame({
        "image_id": image_ids,
        "path": [str(root / p) for p in image_ids],
        "patient_id": patients,
        "view": np.where(frontal, frame["AP/PA"].str.strip(), "Lateral"),
    })
    uncertain_value = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}
    for name in labels:
        cells = frame[name].str.strip()
        bad = ~cells.isin(list(_VALUES) + ["-1.0", "-1"])
        if bad.any():
            row = first_row(bad)
            raise DataError(f"{csv}: row {row}: column '{name}' has {cells.iloc[row - 2]!r}, "
                            f"expected 1.0, 0.0, -1.0 or blank")
        table[name] = cells.map(_VALUES).fillna(uncertain_value[policies[name]]).astype(np.float32)
    _add_subgroups(table, frame, frontal, csv, age_bins)
    if frontal_only:
        table = table[frontal.to_numpy()].reset_index(drop=True)
    return table


def _add_subgroups(table: pd.DataFrame, frame: pd.DataFrame, frontal: pd.Series, csv: Path, age_bins) -> None:
    sexes = frame["Sex"].str.strip()
    bad = ~sexes.isin(list(_SEXES))
    if bad.any():
        row = first_row(bad)
        raise DataError(f"{csv}: row {row}: column 'Sex' has {sexes.iloc[row - 2]!r}, expected one of {list(_SEXES)}")
    table[META_PREFIX + "sex"] = sexes.map(_SEXES)
    table[META_PREFIX + "age"] = bin_ages(frame["Age"], age_bins, lambda i: f"{csv}: row {i + 2}: column 'Age'")
    table[META_PREFIX + "frontal_lateral"] = frame["Frontal/Lateral"].str.strip()
    table[META_PREFIX + "ap_pa"] = frame["AP/PA"].str.strip().where(frontal, "")
