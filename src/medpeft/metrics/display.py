"""How metric values read in the console: one format everywhere."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def format_score(value: float | None) -> str:
    """A metric to 4 decimals, or 'n/a' where it is undefined (e.g. AUROC of a label with one class)."""
    return "n/a" if value is None else f"{value:.4f}"


def print_metrics(metrics: dict, split: str) -> None:
    """An evaluation's metrics: per label AUROC, AUPRC, counts and, where computed, ECE raw and calibrated;
    then the worst subgroup of each subgroup column."""
    console = Console()
    calibration = metrics.get("calibration") or {}
    raw, scaled = calibration.get("raw"), calibration.get("calibrated")
    table = Table(title=f"{split}: mean AUROC {format_score(metrics['mean_auroc'])} over {metrics['n']} images")
    columns = ["label", "AUROC", "AUPRC", "positives", "negatives"] + ["ECE"] * bool(raw) + ["ECE calibrated"] * bool(scaled)
    for column in columns:
        table.add_column(column, justify="left" if column == "label" else "right")
    for name, m in metrics["per_label"].items():
        eces = [format_score(part["per_label"][name]["ece"]) for part in (raw, scaled) if part]
        table.add_row(name, format_score(m["auroc"]), format_score(m["auprc"]), str(m["positives"]),
                      str(m["negatives"]), *eces)
    console.print(table)
    if "accuracy" in metrics:
        console.print(f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro_f1']:.4f}")
    if raw:
        console.print(f"ECE over {calibration['n_bins']} {calibration['binning']} bins; Brier "
                      f"{format_score(raw['mean_brier'])}" + (f", calibrated {format_score(scaled['mean_brier'])}"
                                                              if scaled else ""))
    for column, result in (metrics.get("subgroups") or {}).items():
        groups = result["groups"]
        sizes = ", ".join(f"{value} {g['n']}" + (" (small)" if g["small"] else "") for value, g in groups.items())
        worst = (f"worst {result['worst']} AUROC {format_score(result['worst_auroc'])}, gap "
                 f"{format_score(result['gap'])}" if result["worst"] is not None else "no group large enough")
        console.print(f"{column}: {worst}; sizes {sizes}")
    evaluation = metrics.get("evaluation")
    if evaluation and evaluation["absent"]:
        console.print(f"absent from the data (not scored): {', '.join(evaluation['absent'])}")
