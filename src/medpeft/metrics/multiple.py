"""Adjusted p-values for a family of tests (a table of comparisons).

'holm': Holm 1979 ("A simple sequentially rejective multiple test procedure", Scand J Stat 6:65-70),
step-down, controls the family-wise error rate: with p_(1) <= ... <= p_(m), the adjusted
p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)).
'bh': Benjamini & Hochberg 1995 ("Controlling the false discovery rate", JRSS B 57:289-300),
step-up, controls the false discovery rate: adjusted p_(i) = min over j >= i of min(1, m p_(j) / j).
Both equal statsmodels' ``multipletests(method='holm' / 'fdr_bh')``. A NaN p-value (no test) stays
NaN and is not counted in m. Invalid input raises ValueError.
"""

from __future__ import annotations

import numpy as np

METHODS = {"holm": "Holm (family-wise error)", "bh": "Benjamini-Hochberg (false discovery rate)"}


def adjust_p_values(p_values, method: str) -> np.ndarray:
    """Adjusted p-values (same shape as `p_values`, flattened order kept) by `method` ('holm' or 'bh')."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    p = np.asarray(p_values, dtype=np.float64)
    tested = ~np.isnan(p)
    bad = np.flatnonzero((p.ravel() < 0) | (p.ravel() > 1))  # NaN compares False
    if bad.size:
        raise ValueError(f"p_values must be in [0, 1] (or NaN), got {p.ravel()[bad[0]]:g} at index {bad[0]}")
    order = np.argsort(p[tested], kind="stable")
    ranked = p[tested][order]
    m, rank = ranked.size, np.arange(1, ranked.size + 1)
    if method == "holm":
        adjusted = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * ranked))
    else:
        adjusted = np.minimum.accumulate(np.minimum(1.0, m * ranked / rank)[::-1])[::-1]
    out = np.full(p.shape, np.nan)
    values = np.empty(m)
    values[order] = adjusted
    out[tested] = values
    return out
