"""Metrics as pure functions over whole splits. ``UndefinedMetricWarning`` is scikit-learn's class."""

from medpeft.metrics.classification import UndefinedMetricWarning, auroc, classification_metrics

__all__ = ["UndefinedMetricWarning", "auroc", "classification_metrics"]
