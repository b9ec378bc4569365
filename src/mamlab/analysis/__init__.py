"""Generalization analysis: confidence intervals, representation similarity, loss landscape."""

from mamlab.analysis.landscape import (
    HessianEigen,
    gradient_norms_along_inner_trajectory,
    hessian_vector_product,
    top_hessian_eigenvalue,
)
from mamlab.analysis.similarity import canonical_correlations, cca_similarity, linear_cka
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
    "HessianEigen",
    "hessian_vector_product",
    "top_hessian_eigenvalue",
    "gradient_norms_along_inner_trajectory",
    "linear_cka",
    "cca_similarity",
    "canonical_correlations",
    "Estimate",
    "estimate",
    "mean_ci",
    "normal_quantile",
    "paired_difference_ci",
    "t_quantile",
    "unpaired_difference_ci",
]
