"""Generalization analysis: confidence intervals, representation similarity, loss landscape."""

from mamlab.analysis.stats import (
    Estimate,
    estimate,
    mean_ci,
    normal_quantile,
    paired_difference_ci,
    t_quantile,
    unpaired_difference_ci,
)

__all__ = [
    "Estimate",
    "estimate",
    "mean_ci",
    "normal_quantile",
    "paired_difference_ci",
    "t_quantile",
    "unpaired_difference_ci",
]
