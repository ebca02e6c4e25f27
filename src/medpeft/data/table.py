"""The plain table every reader returns, and the checks readers share.

Columns: ``image_id`` (the image's name as the dataset writes it; split files list these),
``path`` (where the image is read from), ``patient_id``, ``view`` (PA/AP/LL/... or empty),
optionally ``split``, then one float column per label (1, 0, or NaN = unknown, masked).
No reader opens an image file.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medpeft.errors import DataError


def read_table_file(path, source_name: str = "CSV", **kwargs) -> pd.DataFrame:
    """Read a CSV as strings (blank cells stay ''), with a clear error if missing or unreadable."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: {source_name} not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None


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
    duplicated = image_ids.duplicated()
    if duplicated.any():
        row = first_row(duplicated)
        raise DataError(f"{source}: row {row}: duplicate image '{image_ids.iloc[row - 2]}'")


def names_to_targets(cells: pd.Series, labels, negatives, delimiter: str, source, column: str) -> np.ndarray:
    """Rows of delimited label names ('A|B') -> (N, K) 0/1; a name neither a label nor a negative is an error."""
    exploded = cells.str.split(delimiter, regex=False).explode().str.strip()
    known = set(labels) | set(negatives) | {""}
    unknown = ~exploded.isin(known)
    if unknown.any():
        row = int(exploded.index[np.argmax(unknown.to_numpy())])
        raise DataError(f"{source}: row {row + 2}: unknown label {exploded[unknown].iloc[0]!r} in column "
                        f"'{column}' (expected one of {list(labels)} or negatives {sorted(negatives)})")
    targets = np.zeros((len(cells), len(labels)), dtype=np.float32)
    for k, name in enumerate(labels):
        hit = exploded[exploded == name].index
        targets[hit, k] = 1.0
    return targets
