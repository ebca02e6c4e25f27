"""Label names of the standard chest X-ray datasets, defined once (no imports: config and readers use them)."""

# NIH ChestX-ray14 in the order of CheXNet, MRM, MED-PEFT and medical MAE.
NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NIH_NO_FINDING = "No Finding"

# CheXpert: all 14 observations in the CSV's order, and the 5 competition tasks in the split lists' order.
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
CHEXPERT_COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

# RSNA Pneumonia: the binary task, and the three classes of stage_2_detailed_class_info.csv.
RSNA_LABELS = ("Pneumonia",)
RSNA_CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")

# The same findings under each dataset's name: one row per finding, '' where a dataset lacks it. 'chexpert'
# is also MIMIC-CXR's (its CheXpert-labeller names); 'rsna' holds the binary task and the three classes;
# 'phantoms' the built-in phantoms' findings. Only the same finding meets: NIH's Nodule and Mass are not
# CheXpert's broader Lung Lesion, nor NIH's Infiltration its Lung Opacity.
LABEL_MAP_DATASETS = ("nih", "chexpert", "rsna", "phantoms")
LABEL_MAP = (
    ("Atelectasis", "Atelectasis", "", ""),
    ("Cardiomegaly", "Cardiomegaly", "", "cardiomegaly"),
    ("Effusion", "Pleural Effusion", "", "pleural_effusion"),
    ("Infiltration", "", "", ""),
    ("Mass", "", "", ""),
    ("Nodule", "", "", "nodule"),
    ("Pneumonia", "Pneumonia", "Pneumonia", ""),
    ("Pneumothorax", "Pneumothorax", "", "pneumothorax"),
    ("Consolidation", "Consolidation", "", "consolidation"),
    ("Edema", "Edema", "", ""),
    ("Emphysema", "", "", ""),
    ("Fibrosis", "", "", ""),
    ("Pleural_Thickening", "", "", ""),
    ("Hernia", "", "", ""),
    ("No Finding", "No Finding", "Normal", ""),
    ("", "Enlarged Cardiomediastinum", "", ""),
    ("", "Lung Opacity", "Lung Opacity", ""),
    ("", "Lung Lesion", "", ""),
    ("", "Pleural Other", "", ""),
    ("", "Fracture", "", ""),
    ("", "Support Devices", "", ""),
)


def _key(name: str) -> str:
    """A label name compared without case, '_' / '-' as spaces and repeated spaces."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def match_labels(labels, available, overrides: dict | None = None) -> dict:
    """Each of `labels` (a run's) -> the name of the same finding among `available` (another dataset's
    labels), or None where it has none. `overrides` {label: name} come first; then the same name (compared
    by `_key`); then a row of LABEL_MAP holding both names. ValueError when a label meets two names."""
    by_key = {_key(name): name for name in available}
    matched = {}
    for label in labels:
        if overrides and label in overrides:
            matched[label] = overrides[label]
            continue
        if _key(label) in by_key:
            matched[label] = by_key[_key(label)]
            continue
        found = {by_key[_key(name)] for row in LABEL_MAP if _key(label) in map(_key, row)
                 for name in row if name and _key(name) in by_key}
        if len(found) > 1:
            raise ValueError(f"label {label!r} matches several labels: {', '.join(sorted(found))}")
        matched[label] = found.pop() if found else None
    return matched
