"""Generalization analysis: the studies (numbers), their sections (text), the pipeline (``analyze_runs``).

The confidence intervals live in ``mamlab.stats`` (re-exported here), below the evaluation
protocol that uses them, so data flows one way: tasks → algorithm → train/evaluate → analysis.
"""

from mamlab.analysis.landscape import (
    HessianEigen,
    gradient_norms_along_inner_trajectory,
    hessian_vector_product,
    top_hessian_eigenvalue,
)
from mamlab.analysis.pipeline import STUDIES, analyze_runs
from mamlab.analysis.representations import (
    capture_representations,
    head_parameter_names,
    relative_parameter_change,
    representation_layers,
)
from mamlab.analysis.similarity import canonical_correlations, cca_similarity, linear_cka
from mamlab.analysis.studies import Learner
from mamlab.stats import (
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
