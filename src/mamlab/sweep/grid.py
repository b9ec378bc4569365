"""A sweep's grid: which runs it holds, their names and configurations, and what ``sweep.json`` records.

A ``SweepSpec`` is the task family, the grid (an ordered mapping from a key to its values: a run,
task or algorithm option such as ``train_tasks``, ``shots`` or ``inner_lr``, or ``algorithm``), the
option values fixed for every run, and the number of seeds. ``expand`` turns it into one
``SweepRun`` per grid cell and seed, each with a checked ``TrainConfig``: every value goes through
the same ``Option`` machinery (``mamlab.config.resolve_config``) as ``mamlab train``, so a bad value
is a one-line error before anything runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mamlab.algorithms import ALGORITHMS
from mamlab.config import RUN_OPTIONS, TrainConfig, resolve_config
from mamlab.errors import MamlabError, check_choice, check_positive
from mamlab.experiments import TASKS
from mamlab.options import Option

__all__ = ["SweepSpec", "SweepRun", "SWEEP_FORMAT", "NOT_COMPARED", "grid_option", "parse_grid_values",
           "format_value", "expand", "spec_differences"]

SWEEP_FORMAT = 1
#: Options that may differ between the first invocation of a sweep and a resumed one: where and how
#: the runs compute, not what they compute.
NOT_COMPARED = ("device", "execution", "task_chunk")
_LIST_KINDS = ("ints", "strs", "range")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its index, folder name, grid values, seed and configuration."""

    index: int
    name: str
    values: dict[str, Any]
    seed: int
    config: TrainConfig


@dataclass
class SweepSpec:
    """Everything that defines a sweep; saved as ``DIR/sweep.json``.

    Args:
        task: the task family.
        grid: key → values, in order; a key is ``algorithm`` or an option of the run, the task or
            the algorithm(s). The runs are the Cartesian product, the last key varying fastest.
        fixed: option values shared by every run (flat keys, as ``mamlab train``'s flags give them);
            ``seed`` there is the first seed.
        algorithm: the algorithm when ``algorithm`` is not a grid key.
        seeds: seeds per grid cell: seed s (0-based) trains with ``fixed["seed"] + s``.
        eval_tasks: new tasks every run is evaluated on (the same episodes for every run).
        eval_seed: the evaluation episodes' seed.
        steps: inner steps before scoring (``None``: each run's own ``inner_steps``).
    """

    task: str
    grid: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    algorithm: str = "maml"
    seeds: int = 1
    eval_tasks: int = 200
    eval_seed: int = 0
    steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``sweep.json``)."""
        return {"format": SWEEP_FORMAT, "task": self.task, "algorithm": self.algorithm,
                "grid": {k: list(v) for k, v in self.grid.items()}, "fixed": dict(self.fixed),
                "seeds": self.seeds, "eval_tasks": self.eval_tasks, "eval_seed": self.eval_seed,
                "steps": self.steps}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "sweep.json") -> SweepSpec:
        """Read the JSON form back (one-line error on a file of another format)."""
        if not isinstance(values, Mapping) or values.get("format") != SWEEP_FORMAT:
            raise MamlabError(f"{source}: not a mamlab sweep of format {SWEEP_FORMAT}")
        try:
            return cls(task=values["task"], grid={k: list(v) for k, v in values["grid"].items()},
                       fixed=dict(values["fixed"]), algorithm=values["algorithm"], seeds=values["seeds"],
                       eval_tasks=values["eval_tasks"], eval_seed=values["eval_seed"], steps=values["steps"])
        except (KeyError, TypeError, AttributeError) as e:
            raise MamlabError(f"{source}: not a mamlab sweep ({type(e).__name__}: {e})") from None


def grid_option(key: str, task: str, algorithms: Sequence[str]) -> Option | None:
    """The ``Option`` a grid key names (``None`` for ``algorithm``); one-line error if none does."""
    if key == "algorithm":
        return None
    if key == "seed":
        raise MamlabError("seed cannot be a grid key; use --seeds S (seed s trains with --seed + s)")
    sources: list[tuple[str, Sequence[Option]]] = [("run", RUN_OPTIONS),
                                                   (f"task {task}", TASKS[task].options)]
    sources += [(f"algorithm {a}", ALGORITHMS[a].options) for a in algorithms]
    for _, options in sources:
        for o in options:
            if o.name == key:
                return o
    known = sorted(({o.name for _, opts in sources for o in opts} - {"seed"}) | {"algorithm"})
    raise MamlabError(f"unknown grid key {key!r} for task {task!r} with algorithm "
                      f"{', '.join(algorithms)}; allowed: {', '.join(known)}")


def parse_grid_values(key: str, text: str, task: str, algorithms: Sequence[str]) -> list[Any]:
    """``"0.001,0.01"`` → ``[0.001, 0.01]``, each value checked by the key's ``Option``.

    List-valued options (e.g. ``hidden``) separate their values with ``;``:
    ``hidden=40,40;80,80``.
    """
    option = grid_option(key, task, algorithms)
    is_list = option is not None and option.kind in _LIST_KINDS
    parts = [p.strip() for p in text.split(";" if is_list else ",")]
    if not parts or any(not p for p in parts):
        raise MamlabError(f"--grid {key}={text!r}: give one or more values separated by "
                          f"{'; (the values are lists)' if is_list else 'commas'}")
    if option is None:
        for p in parts:
            check_choice("algorithm", p, list(ALGORITHMS))
        values: list[Any] = parts
    else:
        values = [option.parse(p) for p in parts]
    if len({repr(v) for v in values}) != len(values):
        raise MamlabError(f"--grid {key}={text!r} repeats a value; give each value once")
    return values


def format_value(value: Any) -> str:
    """A grid value in a run's folder name: ``0.01``, ``40x40``, ``maml``, ``none``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "x".join(format_value(v) for v in value)
    return str(value)


def _algorithms(spec: SweepSpec) -> list[str]:
    return list(spec.grid.get("algorithm", [spec.algorithm]))


def expand(spec: SweepSpec) -> list[SweepRun]:
    """Every run of the sweep, each with its checked configuration (one-line error on a bad value).

    Runs are ordered by grid cell (the last grid key varying fastest), then by seed.
    """
    check_choice("task family", spec.task, list(TASKS))
    for a in _algorithms(spec):
        check_choice("algorithm", a, list(ALGORITHMS))
    check_positive("seeds", spec.seeds, integer=True)
    check_positive("eval_tasks", spec.eval_tasks, integer=True)
    if spec.eval_tasks < 2:
        raise MamlabError(f"eval_tasks must be at least 2 (confidence intervals need two), "
                          f"got {spec.eval_tasks}")
    check_positive("eval_seed", spec.eval_seed, integer=True, allow_zero=True)
    if spec.steps is not None:
        check_positive("steps", spec.steps, integer=True, allow_zero=True)
    if not spec.grid:
        raise MamlabError("the grid is empty; give --train-tasks, --shots or --grid KEY=V1,V2")
    for key, values in spec.grid.items():
        grid_option(key, spec.task, _algorithms(spec))
        if not values:
            raise MamlabError(f"grid key {key!r} has no values")
        if key in spec.fixed:
            raise MamlabError(f"{key} is both a grid key and a fixed option ({spec.fixed[key]!r}); give one")
    if "algorithm" in spec.fixed:
        raise MamlabError("give the algorithm with --algorithm or --grid algorithm=..., not as an option")
    base_seed = spec.fixed.get("seed", 0)
    check_positive("seed", base_seed, integer=True, allow_zero=True)
    runs: list[SweepRun] = []
    keys = list(spec.grid)
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        algorithm = values.get("algorithm", spec.algorithm)
        options = {k: v for k, v in values.items() if k != "algorithm"}
        for s in range(spec.seeds):
            seed = base_seed + s
            try:
                config = resolve_config(spec.task, {}, {**spec.fixed, **options, "seed": seed},
                                        source="sweep", algorithm=algorithm)
            except MamlabError as e:
                where = ",".join(f"{k}={format_value(v)}" for k, v in values.items())
                raise MamlabError(f"sweep run {where}: {str(e).removeprefix('sweep: ')}") from None
            name = ",".join([f"{k}={format_value(v)}" for k, v in values.items()] + [f"seed={seed}"])
            runs.append(SweepRun(len(runs), name, values, seed, config))
    if len({r.name for r in runs}) != len(runs):
        raise MamlabError("two grid values give the same run name; give distinct values")
    return runs


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def spec_differences(saved: SweepSpec, now: SweepSpec) -> list[str]:
    """What differs between two sweeps in what the runs train (not where, nor how they are evaluated).

    Returns:
        One phrase per difference, e.g. ``"grid shots: [5, 10] in sweep.json, [5, 20] now"``;
        empty when the runs are the same.
    """
    out = []
    for name in ("task", "seeds"):
        if not _same(getattr(saved, name), getattr(now, name)):
            out.append(f"{name}: {getattr(saved, name)!r} in sweep.json, {getattr(now, name)!r} now")
    if "algorithm" not in saved.grid and "algorithm" not in now.grid and saved.algorithm != now.algorithm:
        out.append(f"algorithm: {saved.algorithm!r} in sweep.json, {now.algorithm!r} now")
    if list(saved.grid) != list(now.grid):
        out.append(f"grid keys: {', '.join(saved.grid)} in sweep.json, {', '.join(now.grid)} now")
    else:
        for k in saved.grid:
            if saved.grid[k] != now.grid[k]:
                out.append(f"grid {k}: {saved.grid[k]!r} in sweep.json, {now.grid[k]!r} now")
    old = {k: v for k, v in saved.fixed.items() if k not in NOT_COMPARED}
    new = {k: v for k, v in now.fixed.items() if k not in NOT_COMPARED}
    for k in sorted(set(old) | set(new)):
        if k not in new:
            out.append(f"option {k}: {old[k]!r} in sweep.json, not given now")
        elif k not in old:
            out.append(f"option {k}: not in sweep.json, {new[k]!r} now")
        elif not _same(old[k], new[k]):
            out.append(f"option {k}: {old[k]!r} in sweep.json, {new[k]!r} now")
    return out
