"""The registry of task families: a task's name maps to its options, defaults, model, loss and metrics.

Adding a task family is one ``TaskSpec`` here and one entry in ``TASKS``. The functions at the
end answer for a run's configuration (anything with ``task``, ``task_options`` and ``seed``, i.e.
a ``mamlab.config.TrainConfig``).

* ``sinusoid``: y = A sin(x − φ) (Finn et al. 2017, section 5.1), the 1-40-40-1 MLP, MSE.
* ``linear-regression`` / ``linear-classification``: linear models, MSE / logistic loss; regression
  tasks can mix easy and hard tasks (``hard_fraction``, ``hard_scale``, ``hard_offset``; Collins et al. 2020).
* ``omniglot``: N-way K-shot Omniglot (Lake et al. 2015; Finn et al. 2017, section 5.2), Conv4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mamlab.core.losses import LossFn
from mamlab.errors import MamlabError
from mamlab.models import MLP, Conv4
from mamlab.options import Option
from mamlab.tasks import LinearClassification, LinearRegression, Sinusoid
from mamlab.tasks.base import TaskFamily
from mamlab.tasks.finite import TaskPool

__all__ = ["TASKS", "TaskSpec", "SPLITS", "task_spec", "build_family", "build_model", "loss_for",
           "is_classification", "accuracy", "omniglot_dataset", "POOL_SEED_OFFSET"]

#: A run's finite pool of training tasks is drawn from ``POOL_SEED_OFFSET + seed``.
POOL_SEED_OFFSET = 5_000_011

#: The task distributions a spec can build: meta-training, periodic validation, meta-test.
SPLITS = ("train", "validation", "test")


def _no_check(options: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class TaskSpec:
    """A task family as an experiment: everything ``train``, ``eval`` and ``analyze`` need to know.

    Args:
        name: what ``mamlab train NAME`` calls it.
        kind: ``"regression"`` (scored by loss) or ``"classification"`` (loss and accuracy).
        options: the task's (and its model's) configuration keys.
        defaults: given the task's resolved options, the papers' run and algorithm settings
            (``{"meta_batch": 25, "inner_lr": 0.01, ...}``); flags and config files override them.
        family: ``family(options, split, seed)`` → the task distribution of ``split`` (``SPLITS``).
        model: ``model(options)`` → a freshly initialized network (uses the global torch RNG).
        loss: one task's mean loss, ``loss(prediction, target)``.
        accuracy: per-task accuracy ``[T]`` of predictions ``[T, N, ...]``, for classification.
        check: extra validation of the resolved options (one-line MamlabError).
        small_model: the network is a tiny MLP (the CLI then uses one torch thread by default).
    """

    name: str
    kind: str
    options: tuple[Option, ...]
    defaults: Callable[[Mapping[str, Any]], dict[str, Any]]
    family: Callable[[Mapping[str, Any], str, int], TaskFamily]
    model: Callable[[Mapping[str, Any]], nn.Module]
    loss: LossFn
    accuracy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    check: Callable[[Mapping[str, Any]], None] = field(default=_no_check)
    small_model: bool = False


# ---------------------------------------------------------------------- sinusoid
def _sinusoid_defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    return {"meta_batch": 25, "shots": 10, "queries": 10, "inner_lr": 0.01, "inner_steps": 1,
            "meta_lr": 0.001, "iterations": 70000}


SINUSOID = TaskSpec(
    name="sinusoid",
    kind="regression",
    options=(
        Option("amplitude", "range", [0.1, 5.0], "sinusoid amplitude range LOW,HIGH"),
        Option("phase", "range", [0.0, math.pi], "sinusoid phase range LOW,HIGH"),
        Option("x_range", "range", [-5.0, 5.0], "sinusoid input range LOW,HIGH"),
        Option("noise", "float", 0.0, "standard deviation of Gaussian noise on the targets",
               positive="nonnegative"),
        Option("hidden", "ints", [40, 40], "hidden layer sizes, e.g. 40,40", positive=True),
    ),
    defaults=_sinusoid_defaults,
    family=lambda o, split, seed: Sinusoid(tuple(o["amplitude"]), tuple(o["phase"]), tuple(o["x_range"]),
                                           o["noise"]),
    model=lambda o: MLP(1, 1, hidden=tuple(o["hidden"])),
    loss=F.mse_loss,
    small_model=True,
)


# ---------------------------------------------------------------------- linear models
def _linear_defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    return {"meta_batch": 25, "shots": 10, "queries": 10, "inner_lr": 0.05, "inner_steps": 1,
            "meta_lr": 0.01, "iterations": 2000, "val_every": 200, "checkpoint_every": 500}


def _model(options: Mapping[str, Any]) -> torch.nn.Module:
    return MLP(options["dim"], 1, hidden=tuple(options["hidden"]), bias=bool(options["hidden"]))


def _sign_accuracy(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction > 0).to(target.dtype) == target).float().flatten(1).mean(1)


_COMMON = (
    Option("dim", "int", 5, "input dimension of the linear tasks", positive=True),
    Option("weight_mean", "float", 0.0, "mean of the task weights"),
    Option("weight_std", "float", 1.0, "standard deviation of the task weights", positive="nonnegative"),
    Option("hidden", "ints", [], "hidden layer sizes (none: a linear model)", positive=True),
)

def _check_hardness(options: Mapping[str, Any]) -> None:
    if not 0.0 <= options["hard_fraction"] <= 1.0:
        raise MamlabError(f"hard_fraction must be in [0, 1], got {options['hard_fraction']!r}")
    if not math.isfinite(options["hard_offset"]):
        raise MamlabError(f"hard_offset must be a finite number, got {options['hard_offset']!r}")


LINEAR_REGRESSION = TaskSpec(
    name="linear-regression",
    kind="regression",
    options=(
        *_COMMON,
        Option("noise", "float", 0.0, "standard deviation of the target noise", positive="nonnegative"),
        Option("hard_fraction", "float", 0.0, "share of hard tasks (Collins et al. 2020; 0: none)",
               positive="nonnegative"),
        Option("hard_scale", "float", 1.0, "hard tasks' input covariance is hard_scale times I",
               positive=True),
        Option("hard_offset", "float", 0.0, "hard tasks' weights are centred at weight_mean + hard_offset "
               "(every coordinate)"),
    ),
    defaults=_linear_defaults,
    family=lambda o, split, seed: LinearRegression(o["dim"], o["weight_mean"], o["weight_std"], o["noise"],
                                                   o["hard_fraction"], o["hard_scale"], o["hard_offset"]),
    model=_model,
    loss=F.mse_loss,
    check=_check_hardness,
    small_model=True,
)

LINEAR_CLASSIFICATION = TaskSpec(
    name="linear-classification",
    kind="classification",
    options=_COMMON,
    defaults=_linear_defaults,
    family=lambda o, split, seed: LinearClassification(o["dim"], o["weight_mean"], o["weight_std"]),
    model=_model,
    loss=F.binary_cross_entropy_with_logits,
    accuracy=_sign_accuracy,
    small_model=True,
)


# ---------------------------------------------------------------------- omniglot
def _omniglot_defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    """Finn et al.'s settings: 20-way uses 5 steps of 0.1 and meta-batch 16; 5-way 1 step of 0.4."""
    common = {"shots": 1, "queries": 1, "meta_lr": 0.001, "iterations": 60000, "val_every": 500,
              "val_tasks": 32, "checkpoint_every": 500}
    if options["ways"] >= 20:
        return {**common, "meta_batch": 16, "inner_lr": 0.1, "inner_steps": 5}
    return {**common, "meta_batch": 32, "inner_lr": 0.4, "inner_steps": 1}


_DATASETS: dict[tuple, Any] = {}


def omniglot_dataset(options: Mapping[str, Any], seed: int):  # -> mamlab.tasks.omniglot.Omniglot
    """The Omniglot dataset of a run's options (loaded once per process; images are cached on disk too)."""
    from mamlab.tasks.omniglot import Omniglot

    key = (str(Path(options["data"]).resolve()), options["split"], seed, options["rotate"],
           options["validation_fraction"], options["affine"])
    if key not in _DATASETS:
        root = Path(options["data"])
        if root.is_file():  # a path to one of the archives: use the folder holding it
            root = root.parent
        _DATASETS[key] = Omniglot(root, options["split"], options["ways"], seed=seed,
                                  rotate=options["rotate"], affine=options["affine"],
                                  validation_fraction=options["validation_fraction"])
    return _DATASETS[key]


def _family(options: Mapping[str, Any], split: str, seed: int) -> TaskFamily:
    if not options["data"]:
        raise MamlabError("omniglot needs --data PATH: a folder or zip of the Omniglot release")
    data = omniglot_dataset(options, seed)
    try:
        return data.tasks(split, options["ways"])
    except MamlabError as e:
        raise MamlabError(f"Omniglot {options['split']} split, {split} characters: {e}") from None


def _check(options: Mapping[str, Any]) -> None:
    if not 0.0 < options["validation_fraction"] < 1.0:
        raise MamlabError(f"validation_fraction must be in (0, 1), got {options['validation_fraction']!r}")


def _argmax_accuracy(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.argmax(-1) == target).float().flatten(1).mean(1)


OMNIGLOT = TaskSpec(
    name="omniglot",
    kind="classification",
    options=(
        Option("data", "str", None, "Omniglot folder or zip(s)", nullable=True),
        Option("split", "str", "minimal", "Omniglot split", choices=("minimal", "vinyals", "background")),
        Option("ways", "int", 5, "N in N-way classification", positive=True),
        Option("filters", "int", 64, "Conv4 filters per layer (64 in the paper)", positive=True),
        Option("downsample", "str", "pool", "Conv4 downsampling", choices=("pool", "stride")),
        Option("rotate", "bool", True, "turn each training class by a random multiple of 90 degrees"),
        Option("affine", "bool", False, "distort each training image by a random affine map"),
        Option("validation_fraction", "float", 0.1, "share of training characters held out for validation",
               positive=True),
    ),
    defaults=_omniglot_defaults,
    family=_family,
    model=lambda o: Conv4(o["ways"], hidden=o["filters"], downsample=o["downsample"]),
    loss=F.cross_entropy,
    accuracy=_argmax_accuracy,
    check=_check,
)


# ---------------------------------------------------------------------- the registry
TASKS: dict[str, TaskSpec] = {s.name: s for s in (SINUSOID, LINEAR_REGRESSION, LINEAR_CLASSIFICATION,
                                                  OMNIGLOT)}


def task_spec(name: str) -> TaskSpec:
    """The task family called ``name`` (one-line error naming the allowed ones)."""
    if name not in TASKS:
        raise MamlabError(f"unknown task family {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def build_family(config: Any, split: str = "train") -> TaskFamily:
    """The task distribution p(T) a config trains on (``"train"``), validates on, or is tested on.

    With ``train_tasks = M`` the training split is the run's finite pool of M tasks
    (:class:`~mamlab.tasks.finite.TaskPool`, drawn from ``POOL_SEED_OFFSET + seed``); validation
    and test tasks are new tasks of the same distribution.
    """
    if split not in SPLITS:
        raise MamlabError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    family = task_spec(config.task).family(config.task_options, split, config.seed)
    pool_size = getattr(config, "train_tasks", None)
    if split != "train" or pool_size is None:
        return family
    examples = config.train_examples or config.shots + config.queries
    generator = torch.Generator().manual_seed(POOL_SEED_OFFSET + config.seed)
    pool = TaskPool(family, pool_size, examples, generator)
    pool.check(config.shots, config.queries)
    return pool


def build_model(config: Any) -> nn.Module:
    """A freshly initialized network for the config's task (uses the global torch RNG)."""
    return task_spec(config.task).model(config.task_options)


def loss_for(config: Any) -> LossFn:
    """One task's mean loss: MSE for regression, logistic or cross-entropy for classification."""
    return task_spec(config.task).loss


def is_classification(config: Any) -> bool:
    """Whether the task is scored by accuracy as well as loss."""
    return task_spec(config.task).kind == "classification"


def accuracy(config: Any, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy ``[T]`` of predictions ``[T, N, ...]`` (logits) against targets."""
    fn = task_spec(config.task).accuracy
    if fn is None:
        raise MamlabError(f"task {config.task!r} is scored by loss only; it has no accuracy")
    return fn(prediction, target)
