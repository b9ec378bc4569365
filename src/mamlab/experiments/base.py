"""What a task family brings to an experiment: its options, the papers' defaults, model, loss, metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mamlab.core.losses import LossFn
from mamlab.options import Option
from mamlab.tasks.base import TaskFamily

__all__ = ["TaskSpec", "SPLITS"]

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
