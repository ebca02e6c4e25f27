"""Test helper: the same phantom images (medpeft.data.phantoms) laid out as NIH ChestX-ray14 and as CheXpert,
with random sex and age per patient and a random view (PA / AP) per image, for tests that train on one
layout and evaluate on the other."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.data.labels import CHEXPERT_LABELS
from medpeft.data.phantoms import FINDINGS, generate_phantoms

NIH_NAMES = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Effusion", "nodule": "Nodule",
             "consolidation": "Consolidation", "pneumothorax": "Pneumothorax"}
CHEXPERT_NAMES = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion", "nodule": "Lung Lesion",
                  "consolidation": "Consolidation", "pneumothorax": "Pneumothorax"}
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")  # the real file's trailing comma


def write_phantom_layouts(root, n_patients: int = 40, size: int = 64, seed: int = 0, **phantom_options) -> dict:
    """Write phantoms (`phantom_options` go to generate_phantoms) and the same image files in two layouts:

    - root/nih: Data_Entry_2017.csv (the real header; 'Cardiomegaly|Effusion' or 'No Finding', Patient ID
      as integers, Patient Age '045Y', Patient Gender M/F) and images/00000001_000.png ...;
    - root/chexpert/CheXpert-v1.0-small: train.csv and valid.csv (the last fifth of the patients, at least
      one; n_patients >= 2), Path
      'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg' (holding the phantom's PNG bytes:
      images are decoded by content), Sex Male/Female, Age, Frontal, AP/PA, the 14 observations (a phantom
      finding 1.0, or 0.0 or blank at random when absent; the others blank; No Finding 1.0 without one).

    Patient p, image j is the same file in both. Returns {format: data.csv}: {'nih': path, 'chexpert': [train
    path, valid path]}."""
    if n_patients < 2:
        raise ValueError(f"n_patients must be >= 2 (train.csv and valid.csv), got {n_patients}")
    root = Path(root)
    phantoms = pd.read_csv(generate_phantoms(root / "phantoms", n_patients, size=size, seed=seed, **phantom_options))
    rng = np.random.default_rng([seed, 1])
    patients = {pid: (rng.choice(["M", "F"]), int(rng.integers(1, 96))) for pid in phantoms["patient_id"].unique()}
    nih, chexpert = root / "nih", root / "chexpert" / "CheXpert-v1.0-small"
    (nih / "images").mkdir(parents=True, exist_ok=True)
    nih_rows, chexpert_rows = [NIH_HEADER], {"train": [], "valid": []}
    for number, (pid, images) in enumerate(phantoms.groupby("patient_id", sort=True), start=1):
        sex, age = patients[pid]
        part = "valid" if number > n_patients - max(1, n_patients // 5) else "train"
        for follow_up, row in enumerate(images.itertuples(index=False)):
            found = [name for name in FINDINGS if getattr(row, name)]
            view = rng.choice(["PA", "AP"])
            name = f"{number:08d}_{follow_up:03d}.png"
            shutil.copyfile(root / "phantoms" / row.path, nih / "images" / name)
            nih_rows.append(f"{name},{'|'.join(NIH_NAMES[f] for f in found) or 'No Finding'},{follow_up:03d},"
                            f"{number:08d},{age:03d}Y,{sex},{view},{size},{size},0.143,0.143")
            path = f"CheXpert-v1.0-small/{part}/patient{number:05d}/study{follow_up + 1}/view1_frontal.jpg"
            (root / "chexpert" / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "phantoms" / row.path, root / "chexpert" / path)
            cells = dict.fromkeys(CHEXPERT_LABELS, "")
            for finding, observation in CHEXPERT_NAMES.items():
                cells[observation] = "1.0" if finding in found else rng.choice(["0.0", ""])
            cells["No Finding"] = "" if found else "1.0"
            chexpert_rows[part].append({"Path": path, "Sex": {"M": "Male", "F": "Female"}[sex], "Age": age,
                                        "Frontal/Lateral": "Frontal", "AP/PA": view, **cells})
    (nih / "Data_Entry_2017.csv").write_text("\n".join(nih_rows) + "\n")
    files = []
    for part, rows in chexpert_rows.items():
        columns = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
        pd.DataFrame(rows, columns=columns).to_csv(chexpert / f"{part}.csv", index=False)
        files.append(str(chexpert / f"{part}.csv"))
    return {"nih": str(nih / "Data_Entry_2017.csv"), "chexpert": files}
