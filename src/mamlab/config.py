"""Training configuration: one dataclass, task-specific defaults from the papers, TOML files, validation."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamlab.algorithms.maml import EXECUTIONS
from mamlab.errors import MamlabError, check_choice, check_positive

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["TrainConfig", "TASKS", "METHODS", "resolve_config", "load_toml", "task_defaults",
           "meta_lr_at", "SCHEDULES"]

TASKS = ("sinusoid", "linear-regression", "linear-classification", "omniglot")
METHODS = ("maml", "pretrain")
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``config.json`` in the run directory."""

    task: str = "sinusoid"
    method: str = "maml"  # "maml", or "pretrain": one network trained on all tasks (Finn et al.'s baseline)
    iterations: int = 70000
    meta_batch: int = 25
    shots: int = 10
    queries: int = 10
    inner_lr: float = 0.01
    inner_steps: int = 1
    meta_lr: float = 0.001
    lr_schedule: str = "constant"  # or "cosine": β·(1 + cos(π·(i-1)/iterations))/2 at iteration i
    first_order: bool = False
    seed: int = 0
    execution: str = "auto"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    val_every: int = 1000
    val_tasks: int = 100
    checkpoint_every: int = 1000
    skip_nonfinite: bool = False
    deterministic: bool = False
    # sinusoid
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    noise: float = 0.0
    # linear
    dim: int = 5
    weight_mean: float = 0.0
    weight_std: float = 1.0
    # omniglot
    data: str | None = None
    split: str = "minimal"
    ways: int = 5
    downsample: str = "pool"
    filters: int = 64
    rotate: bool = True  # augmentation: each training class turned by a random multiple of 90 degrees
    affine: bool = False  # augmentation: each training image distorted by a random affine map
    validation_fraction: float = 0.1  # meta-training characters held out for periodic validation

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict, refusing unknown keys with a one-line error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MamlabError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        return cls(**values)

    def validate(self) -> TrainConfig:
        """Raise MamlabError on the first bad value; return self."""
        check_choice("task", self.task, TASKS)
        check_choice("method", self.method, METHODS)
        check_choice("execution", self.execution, EXECUTIONS)
        check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        for name in ("iterations", "meta_batch", "shots", "queries", "inner_steps", "val_every",
                     "val_tasks", "checkpoint_every", "dim", "ways", "filters"):
            check_positive(name, getattr(self, name), integer=True)
        for name in ("inner_lr", "meta_lr"):
            check_positive(name, getattr(self, name))
        check_positive("noise", self.noise, allow_zero=True)
        check_positive("weight_std", self.weight_std, allow_zero=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise MamlabError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.hidden, list) or not all(isinstance(h, int) and h > 0 for h in self.hidden):
            raise MamlabError(f"hidden must be a list of positive integers, got {self.hidden!r}")
        for name in ("amplitude", "phase", "x_range"):
            pair = getattr(self, name)
            if (not isinstance(pair, list | tuple) or len(pair) != 2
                    or not all(isinstance(v, int | float) and math.isfinite(v) for v in pair)
                    or pair[0] > pair[1]):
                raise MamlabError(f"{name} must be two finite numbers low <= high, got {pair!r}")
        check_choice("downsample", self.downsample, ("pool", "stride"))
        check_choice("split", self.split, ("minimal", "vinyals", "background"))
        if not 0.0 < float(self.validation_fraction) < 1.0:
            raise MamlabError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        if self.task == "omniglot" and not self.data:
            raise MamlabError("omniglot needs --data PATH: a folder or zip of the Omniglot release")
        return self


def meta_lr_at(config: TrainConfig, iteration: int) -> float:
    """The meta learning rate β of iteration ``iteration`` (1-based) under ``config.lr_schedule``."""
    if config.lr_schedule == "cosine":
        return config.meta_lr * 0.5 * (1.0 + math.cos(math.pi * (iteration - 1) / config.iterations))
    return config.meta_lr


def task_defaults(task: str, ways: int | None = None) -> dict[str, Any]:
    """The papers' settings for a task (Finn et al. 2017); for Omniglot they depend on N-way."""
    if task == "sinusoid":
        return {"meta_batch": 25, "shots": 10, "queries": 10, "inner_lr": 0.01, "inner_steps": 1,
                "meta_lr": 0.001, "iterations": 70000, "hidden": [40, 40]}
    if task in ("linear-regression", "linear-classification"):
        return {"meta_batch": 25, "shots": 10, "queries": 10, "inner_lr": 0.05, "inner_steps": 1,
                "meta_lr": 0.01, "iterations": 2000, "hidden": [], "val_every": 200,
                "checkpoint_every": 500}
    if task == "omniglot":
        if (ways or 5) >= 20:
            return {"ways": ways, "meta_batch": 16, "shots": 1, "queries": 1, "inner_lr": 0.1,
                    "inner_steps": 5, "meta_lr": 0.001, "iterations": 60000, "val_every": 500,
                    "val_tasks": 32, "checkpoint_every": 500}
        return {"ways": ways or 5, "meta_batch": 32, "shots": 1, "queries": 1, "inner_lr": 0.4,
                "inner_steps": 1, "meta_lr": 0.001, "iterations": 60000, "val_every": 500,
                "val_tasks": 32, "checkpoint_every": 500}
    check_choice("task", task, TASKS)
    return {}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file gives a one-line error naming it."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise MamlabError(f"config file {str(p)!r} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MamlabError(f"config file {str(p)!r} is not valid TOML: {str(e).splitlines()[0]}") from None


def resolve_config(task: str, file_values: dict[str, Any] | None = None,
                   overrides: dict[str, Any] | None = None, source: str = "config") -> TrainConfig:
    """Task defaults, then values from a TOML file, then explicit overrides (CLI flags), validated."""
    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_choice("task", task, TASKS)
    file_task = file_values.pop("task", task)
    if file_task != task:
        raise MamlabError(f"{source}: task {file_task!r} does not match the command's task {task!r}")
    TrainConfig.from_dict(file_values, source)  # unknown keys
    ways = overrides.get("ways", file_values.get("ways"))
    values = {"task": task, **task_defaults(task, ways), **file_values, **overrides}
    return TrainConfig.from_dict(values, source).validate()
