"""The input checks of the metric functions, made once at their boundary (as scikit-learn's
``sklearn.utils.validation``). Each failure is a one-line ValueError naming the argument, what was
expected and what came.

A binary problem is a target array and one or more score arrays of one shape: the targets hold only
0 and 1, or also NaN (= unknown) where the caller leaves unknown rows out; the scores are finite
wherever the target is known (the scores of an unknown target are never looked at, so they may be
anything). scikit-learn's ``check_consistent_length`` and ``column_or_1d`` are not used: their
messages do not name the arguments, and ``column_or_1d`` flattens an (N, 1) array silently.
"""

from __future__ import annotations

import numpy as np


def check_binary_problem(targets, scores: dict[str, object], *, targets_name: str = "y_true",
                         allow_unknown: bool, ndims: tuple[int, ...] = (1,)) -> tuple[np.ndarray, list[np.ndarray]]:
    """`targets` and each of `scores` ({name: array}) as float64 arrays, checked.

    Checks, in order: `targets` has a number of dimensions in `ndims`; every score array has its shape;
    `targets` holds only 0 and 1 (and NaN if `allow_unknown`); every score is finite where the target
    is not NaN. Returns (targets, [scores in the order given]).
    """
    y = _as_float_array(targets, targets_name)
    if y.ndim not in ndims:
        expected = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{targets_name} must be {expected}, got shape {y.shape}")
    arrays = {name: _as_float_array(array, name) for name, array in scores.items()}
    for name, array in arrays.items():
        if array.shape != y.shape:
            extent = "length" if y.ndim == array.ndim == 1 else "shape"
            raise ValueError(f"{targets_name} {y.shape} and {name} {array.shape} must have the same {extent}")
    _check_binary_labels(y, targets_name, allow_unknown=allow_unknown)
    known = ~np.isnan(y)
    for name, array in arrays.items():
        _refuse_first(~np.isfinite(array) & known, array, f"{name} must be finite where the target is known"
                      if allow_unknown else f"{name} must be finite")
    return y, list(arrays.values())


def _check_binary_labels(y: np.ndarray, name: str, *, allow_unknown: bool) -> None:
    """Raise unless the float array `y` holds only 0 and 1 (and NaN = unknown if `allow_unknown`)."""
    valid = (y == 0) | (y == 1)
    if allow_unknown:
        valid |= np.isnan(y)
    _refuse_first(~valid, y, f"{name} must hold only {'0, 1 or NaN (unknown)' if allow_unknown else '0 and 1'}")


def _as_float_array(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric, got {error}") from None


def _refuse_first(bad: np.ndarray, values: np.ndarray, message: str) -> None:
    """Raise ValueError(message + the first bad value and its index) if any of `bad` is set."""
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = index[0] if len(index) == 1 else index
        raise ValueError(f"{message}, got {values[index]:g} at index {where}")
