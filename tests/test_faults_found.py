"""Faults that benchmarks/faults.py found in the command line, each reproduced here on its own."""

import pandas as pd
import pytest

from medpeft.config import SplitConfig
from medpeft.data.splits import assign_splits
from medpeft.errors import DataError


def test_a_patient_in_two_splits_of_a_split_column_is_named_with_the_column_and_rows():
    table = pd.DataFrame({"patient_id": ["a", "b", "a", "b"], "split": ["train", "val", "val", "val"]})
    with pytest.raises(DataError, match=r"^x.csv: patient 'a' is in more than one split \(train, val\): split "
                                        r"column 'fold' has 'train' at row 2 and 'val' at row 4$"):
        assign_splits(table, SplitConfig(column="fold"), "x.csv")
