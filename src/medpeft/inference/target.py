"""Decision thresholds re-fitted on a small labelled sample of the site where a run is used.

Thresholds chosen on a run's own validation split lose sensitivity or specificity where the images differ
(another scanner, exposure, population): the probabilities shift while their order may hold. A sample of
the target site's images with their labels (SAMPLE.csv: a `path` column, relative paths taken from the
CSV's folder, and a 0/1 column per label) chooses the thresholds again by the same rule (youden or
sensitivity:X), on the predictor's probabilities of those images predicted as the new images will be
(the same runs, ensemble and test-time augmentation). Nothing is written to the run directories."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from medpeft.data.table import first_row, read_table_file, require_columns
from medpeft.errors import ConfigError, DataError
from medpeft.inference.inputs import UnreadableInputWarning
from medpeft.inference.run import column_prefix, predict
from medpeft.inference.tta import tta_record
from medpeft.metrics.thresholds import YOUDEN, parse_rule, select_thresholds

PATH_COLUMN = "path"
_BINARY = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}


def read_sample(csv, labels: list[str]) -> tuple[list[str], np.ndarray]:
    """The sample's image files (relative paths resolved against the CSV's folder) and (N, K) 0/1 targets of
    `labels`. DataError naming the file, and the row and column, of a missing column, an empty path, an image
    not found, a value other than 0 or 1, or a label without positives or negatives."""
    csv = Path(csv)
    table = read_table_file(csv, "sample CSV")
    require_columns(table, [PATH_COLUMN, *labels], csv)
    if table.empty:
        raise DataError(f"{csv}: no rows (expected one image per row: '{PATH_COLUMN}' and a 0/1 column per label)")
    paths = table[PATH_COLUMN].str.strip()
    files = [csv.parent / path for path in paths]
    missing = [not path or not file.is_file() for path, file in zip(paths, files)]
    if any(missing):
        row = first_row(missing)
        raise DataError(f"{csv}: row {row}: image {paths.iloc[row - 2]!r} not found (a relative path is taken "
                        f"from the CSV's folder)")
    targets = np.zeros((len(table), len(labels)))
    for k, label in enumerate(labels):
        values = table[label].str.strip()
        bad = ~values.isin(list(_BINARY))
        if bad.any():
            row = first_row(bad)
            raise DataError(f"{csv}: row {row}: column '{label}' has {values.iloc[row - 2]!r}, expected 0 or 1")
        targets[:, k] = values.map(_BINARY).to_numpy()
        for value, kind in ((1, "positives"), (0, "negatives")):
            if not (targets[:, k] == value).any():
                raise DataError(f"{csv}: column '{label}' has no {kind} in its {len(table)} rows; a threshold is "
                                f"chosen between both classes")
    return [str(file) for file in files], targets


def fit_thresholds(predictors: list, sample, rule: str = YOUDEN, tta=False, batch_size: int | None = None,
                   workers: int = 0) -> tuple[list, dict]:
    """The predictors (Runs or Ensembles) with thresholds chosen by `rule` on their probabilities of the
    sample's images (predicted with `tta`, see medpeft.inference.predict) against its labels, and a record of
    the fit: {sample, images, rule, tta: {run: views} or None, thresholds: {name: {before_rule, before, after}}}. A
    multiclass predictor decides by arg-max: ConfigError."""
    parse_rule(rule)
    for predictor in predictors:
        if predictor.thresholds is None:
            raise ConfigError(f"{', '.join(str(run.path) for run in predictor.members)}: a multiclass task decides "
                              f"by arg-max; it has no thresholds to fit")
    labels = list(dict.fromkeys(label for predictor in predictors for label in predictor.labels))
    files, targets = read_sample(sample, labels)
    with warnings.catch_warnings():  # an unreadable image is an error naming its row, below
        warnings.simplefilter("ignore", UnreadableInputWarning)
        table = predict(predictors, files, batch_size=batch_size, workers=workers, tta=tta)
    unreadable = table["error"] != ""
    if unreadable.any():
        row = first_row(unreadable)
        raise DataError(f"{sample}: row {row}: {table['error'].iloc[row - 2]}")
    fitted = []
    for predictor in predictors:
        prefix = column_prefix(predictor, len(predictors) > 1)
        probs = table[[f"{prefix}prob:{label}" for label in predictor.labels]].to_numpy(float)
        known = targets[:, [labels.index(label) for label in predictor.labels]]
        fitted.append(replace(predictor, rule=rule, thresholds=select_thresholds(known, probs, predictor.labels,
                                                                                 rule)))
    record = {"sample": str(sample), "images": len(files), "rule": rule,
              "tta": tta_record({run.name: run.config for predictor in predictors for run in predictor.members}, tta),
              "thresholds": {before.name: {"before_rule": before.rule, "before": before.thresholds,
                                           "after": after.thresholds} for before, after in zip(predictors, fitted)}}
    return fitted, record
