"""Moved to :mod:`mamlab.tasks.omniglot.oneshot`; this module re-exports it for old imports."""

from mamlab.tasks.omniglot.oneshot import (
    Classifier,
    OneShotRun,
    evaluate_runs,
    load_runs,
    modified_hausdorff_classifier,
    modified_hausdorff_distance,
    pixel_nearest_neighbour,
    runs_pool,
    stroke_points,
)

__all__ = [
    "Classifier",
    "OneShotRun",
    "evaluate_runs",
    "load_runs",
    "modified_hausdorff_classifier",
    "modified_hausdorff_distance",
    "pixel_nearest_neighbour",
    "runs_pool",
    "stroke_points",
]
