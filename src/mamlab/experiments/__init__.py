"""The registry of task families: a task's name maps to its options, defaults, model, loss and metrics.

Adding a task family is one new module here with a ``TaskSpec`` and one entry in ``TASKS``.
The functions below answer for a run's configuration (anything with ``task``, ``task_options``
and ``seed``, i.e. a ``mamlab.config.TrainConfig``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mamlab.core.losses import LossFn
from mamlab.errors import MamlabError
from mamlab.experiments.base import SPLITS, TaskSpec
from mamlab.experiments.linear import LINEAR_CLASSIFICATION, LINEAR_REGRESSION
from mamlab.experiments.omniglot import OMNIGLOT, omniglot_dataset
from mamlab.experiments.sinusoid import SINUSOID
from mamlab.tasks.base import TaskFamily

__all__ = ["TASKS", "TaskSpec", "SPLITS", "task_spec", "build_family", "build_model", "loss_for",
           "is_classification", "accuracy", "omniglot_dataset"]

TASKS: dict[str, TaskSpec] = {s.name: s for s in (SINUSOID, LINEAR_REGRESSION, LINEAR_CLASSIFICATION,
                                                  OMNIGLOT)}


def task_spec(name: str) -> TaskSpec:
    """The task family called ``name`` (one-line error naming the allowed ones)."""
    if name not in TASKS:
        raise MamlabError(f"unknown task family {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def build_family(config: Any, split: str = "train") -> TaskFamily:
    """The task distribution p(T) a config trains on (``"train"``), validates on, or is tested on."""
    if split not in SPLITS:
        raise MamlabError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return task_spec(config.task).family(config.task_options, split, config.seed)


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
