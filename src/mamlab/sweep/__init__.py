"""``mamlab sweep``: train a grid of runs, evaluate them on the same episodes, see how generalization scales.

* ``grid``: the sweep's specification, its runs and their names (``SweepSpec``, ``expand``);
* ``processes``: which process trains which runs under torchrun (``SweepGroup``);
* ``runner``: training, resuming, evaluation with per-run caches, ``results.json`` (``run_sweep``);
* ``fit``: power laws on log-log axes with t intervals on the slopes (``power_law_fit``);
* ``page``: the report page: the gap against M and N, slopes against theory, other grid keys.

Example:
    >>> spec = SweepSpec("linear-regression", {"train_tasks": [10, 100], "shots": [5, 10]}, seeds=2)
    >>> run_sweep(spec, "sweeps/linear")     # then open sweeps/linear/index.html
"""

from mamlab.sweep.fit import PowerLawFit, Slope, power_law_fit
from mamlab.sweep.grid import SweepRun, SweepSpec, expand, parse_grid_values
from mamlab.sweep.runner import evaluate_run, load_results, read_spec, resume_sweep, run_sweep

__all__ = ["SweepSpec", "SweepRun", "expand", "parse_grid_values", "run_sweep", "resume_sweep", "read_spec",
           "evaluate_run", "load_results", "power_law_fit", "PowerLawFit", "Slope"]
