"""How metric values read in the console: one format everywhere."""

from __future__ import annotations


def format_score(value: float | None) -> str:
    """A metric to 4 decimals, or 'n/a' where it is undefined (e.g. AUROC of a label with one class)."""
    return "n/a" if value is None else f"{value:.4f}"
