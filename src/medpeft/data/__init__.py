"""Datasets: one file per format (its reader and its DataConfig, registered under data.format), splits,
label fractions, the image cache and the torch dataset."""

from medpeft.data import chexpert, csv_reader, folder, medmnist, nih, rsna  # noqa: F401  (registration)
from medpeft.data.readers import read_dataset, read_split_dataset

__all__ = ["read_dataset", "read_split_dataset"]
