"""Generalization analysis: confidence intervals, representation similarity, loss landscape, studies.

``analyze_runs`` and the studies (``mamlab.analysis.studies``) are imported on first use: they
depend on ``mamlab.evaluate``, which itself imports ``mamlab.analysis.stats``.
"""

from typing import Any

from mamlab.analysis.landscape import (
    HessianEigen,
    gradient_norms_along_inner_trajectory,
    hessian_vector_product,
    top_hessian_eigenvalue,
)
from mamlab.analysis.representations import (
    capture_representations,
    head_parameter_names,
    relative_parameter_change,
    representation_layers,
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
    "capture_representations",
    "head_parameter_names",
    "relative_parameter_change",
    "representation_layers",
    "analyze_runs",
    "STUDIES",
    "Learner",
]

_LAZY = {"analyze_runs": "mamlab.analysis.report", "STUDIES": "mamlab.analysis.studies",
         "Learner": "mamlab.analysis.studies"}


def __getattr__(name: str) -> Any:
    """Import ``analyze_runs``, ``STUDIES`` and ``Learner`` on first use (see the module docstring)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mamlab.analysis' has no attribute {name!r}")
