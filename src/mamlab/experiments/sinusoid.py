"""Sinusoid regression (Finn et al. 2017, section 5.1): y = A sin(x − φ), the 1-40-40-1 MLP, MSE."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F

from mamlab.experiments.base import TaskSpec
from mamlab.models import MLP
from mamlab.options import Option
from mamlab.tasks import Sinusoid

__all__ = ["SINUSOID"]


def _defaults(options: Mapping[str, Any]) -> dict[str, Any]:
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
    defaults=_defaults,
    family=lambda o, split, seed: Sinusoid(tuple(o["amplitude"]), tuple(o["phase"]), tuple(o["x_range"]),
                                           o["noise"]),
    model=lambda o: MLP(1, 1, hidden=tuple(o["hidden"])),
    loss=F.mse_loss,
    small_model=True,
)
