"""Linear models: few-shot linear regression (MSE) and binary linear classification (logistic loss)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from mamlab.experiments.base import TaskSpec
from mamlab.models import MLP
from mamlab.options import Option
from mamlab.tasks import LinearClassification, LinearRegression

__all__ = ["LINEAR_REGRESSION", "LINEAR_CLASSIFICATION"]


def _defaults(options: Mapping[str, Any]) -> dict[str, Any]:
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

LINEAR_REGRESSION = TaskSpec(
    name="linear-regression",
    kind="regression",
    options=(*_COMMON, Option("noise", "float", 0.0, "standard deviation of the target noise",
                              positive="nonnegative")),
    defaults=_defaults,
    family=lambda o, split, seed: LinearRegression(o["dim"], o["weight_mean"], o["weight_std"], o["noise"]),
    model=_model,
    loss=F.mse_loss,
    small_model=True,
)

LINEAR_CLASSIFICATION = TaskSpec(
    name="linear-classification",
    kind="classification",
    options=_COMMON,
    defaults=_defaults,
    family=lambda o, split, seed: LinearClassification(o["dim"], o["weight_mean"], o["weight_std"]),
    model=_model,
    loss=F.binary_cross_entropy_with_logits,
    accuracy=_sign_accuracy,
    small_model=True,
)
