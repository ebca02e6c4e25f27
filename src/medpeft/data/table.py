"""The plain table every reader returns, and the checks readers share.

Columns: ``image_id`` (the image's name as the dataset writes it; split files list these),
``path`` (where the image is read from), ``patient_id``, ``view`` (PA/AP/LL/... or empty),
optionally ``split``, then one float column per label (1, 0, or NaN = unknown, masked), then
optionally metadata columns ``meta:NAME`` (strings, '' = unknown; carried to split.csv and predictions.csv;
those named by ``DataConfig.subgroups()`` are reported per subgroup). An age column holds age groups
(`bin_ages`). No reader opens an image file, except the RSNA reader, which reads each DICOM's header.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import numpy as np
import pandas as pd

from medpeft.errors import DataError

META_PREFIX = "meta:"
_YEARS_PER_UNIT = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def read_table_file(path, source_name: str = "CSV", encoding: str = "utf-8", **kwargs) -> pd.DataFrame:
    """Read a CSV as strings (blank cells stay ''), with a clear error if missing or unreadable.

    `encoding` is a Python codec name; UTF-8 files may start with a byte-order mark (Excel writes one)."""
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: {source_name} not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: {_decode_problem(Path(path), encoding)}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None


def _decode_problem(path: Path, encoding: str) -> str:
    """Where the file stops being `encoding`: line and byte offset in the whole file (pandas reports an
    offset inside its read buffer)."""
    raw = path.read_bytes()
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return (f"line {line}: byte {e.start} (0x{raw[e.start]:02x}) is not valid {encoding.removesuffix('-sig')} "
                f"(set data.encoding to the file's encoding, e.g. latin-1 or cp1252)")
    return f"not valid {encoding}"


def require_columns(frame: pd.DataFrame, columns, source) -> None:
    for column in columns:
        if column not in frame.columns:
            raise DataError(f"{source}: column '{column}' not found (columns: {', '.join(map(str, frame.columns))})")


def first_row(mask) -> int:
    """File line (header = line 1) of the first data row where `mask` is true."""
    return int(np.argmax(np.asarray(mask))) + 2


def keep_views(table: pd.DataFrame, views: list[str] | None, source) -> pd.DataFrame:
    """The rows whose view is one of `views` (None keeps all); DataError if none is left."""
    if views is None:
        return table
    table = table[table["view"].isin(views)].reset_index(drop=True)
    if table.empty:
        raise DataError(f"{source}: no images with views {views}")
    return table


def check_unique_ids(image_ids: pd.Series, source) -> None:
    """DataError at the first image listed twice."""
    duplicated = image_ids.duplicated()
    if duplicated.any():
        row = first_row(duplicated)
        raise DataError(f"{source}: row {row}: duplicate image '{image_ids.iloc[row - 2]}'")


def names_to_targets(cells: pd.Series, labels, negatives, delimiter: str, source, column: str,
                     rows=None) -> np.ndarray:
    """Rows of delimited label names ('A|B') -> (N, K) 0/1; names are stripped of surrounding spaces.

    `negatives`: names meaning 'none of the labels' (a name neither a label nor a negative is an error),
    or None: every name that is not a label is negative. `rows`: the file line of each cell (default:
    the cell's position + 2)."""
    exploded = cells.str.split(delimiter, regex=False).explode().str.strip()
    known = set(labels) | set(negatives or ()) | {""}
    unknown = ~exploded.isin(known)
    if negatives is not None and unknown.any():
        position = int(exploded.index[np.argmax(unknown.to_numpy())])
        row = rows[position] if rows is not None else position + 2
        raise DataError(f"{source}: row {row}: unknown label {exploded[unknown].iloc[0]!r} in column "
                        f"'{column}' (expected one of {list(labels)} or negatives {sorted(negatives)})")
    targets = np.zeros((len(cells), len(labels)), dtype=np.float32)
    for k, name in enumerate(labels):
        hit = exploded[exploded == name].index
        targets[hit, k] = 1.0
    return targets


def age_group_names(edges) -> list[str]:
    """The groups of the age `edges` (years): [20, 40] gives '0-19', '20-39', '40+'."""
    return [f"{lo}-{hi - 1}" for lo, hi in zip([0, *edges], edges)] + [f"{edges[-1]}+"]


def bin_ages(cells: pd.Series, edges, place) -> pd.Series:
    """Age cells -> their group of `age_group_names(edges)`: group i holds edges[i-1] <= age < edges[i]; a
    blank cell stays ''.

    A cell is years ('58', '58.5') or a DICOM age string ('058Y', '006M', '010W', '003D'), converted to
    years; it is binned as written (no upper limit). Any other cell is a DataError starting with
    ``place(i)``, the location of cell i (its file, row and column)."""
    text = cells.astype(str).str.strip()
    parts = text.str.extract(r"^(\d+(?:\.\d+)?)([YMWD]?)$")
    bad = (text != "") & parts[0].isna()
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise DataError(f"{place(i)} has {text.iloc[i]!r}, expected an age in years (58, 58.5) or a DICOM age "
                        f"(058Y, 006M, 010W, 003D)")
    years = parts[0].astype(float) * parts[1].map(_YEARS_PER_UNIT)
    names = np.array(age_group_names(edges))[np.searchsorted(edges, years.fillna(0).to_numpy(), side="right")]
    return pd.Series(np.where(text == "", "", names), index=cells.index)
