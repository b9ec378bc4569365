"""Linear tasks: regression y = wᵀx + ε and binary classification p(y=1) = σ(wᵀx), w per task.

With the linear model f_θ(x) = θᵀx (``mamlab.models.MLP(d, 1, hidden=(), bias=False)``) the MAML
objective is quadratic (regression) or smooth and convex (classification) in θ, and its
gradient has a closed form: the reference that ``tests/algorithms/test_maml.py`` checks against.

Task hardness (regression; Collins et al. 2020): with ``hard_fraction > 0`` each task is, with
that probability, *hard*: its inputs have covariance ``hard_scale · I`` instead of ``I`` (a small
scale means small curvature of its loss, so gradient steps make slow progress on it) and its
weights are centred at ``weight_mean + hard_offset`` in every coordinate (a distance
``|hard_offset|·√dim`` from the easy tasks' centre) instead of ``weight_mean``. The default
``hard_fraction = 0`` draws exactly the numbers the family drew before these options existed.
``mamlab.analysis.linear_theory`` computes the exact one-step MAML and ERM optima of this mixture.

Reference: L. Collins, A. Mokhtari, S. Shakkottai. Why Does MAML Outperform ERM? An
Optimization Perspective. arXiv:2010.14672, 2020.
"""

from __future__ import annotations

import math

import torch

from mamlab.errors import MamlabError, check_positive
from mamlab.tasks.base import ParametricTasks, TaskBatch

__all__ = ["LinearRegression", "LinearClassification"]


class _LinearTasks(ParametricTasks):
    """Shared sampling: task weights w ~ N(weight_mean, weight_std² I), inputs x ~ N(0, I).

    Hard tasks (probability ``hard_fraction``): w ~ N(weight_mean + hard_offset, weight_std² I),
    x ~ N(0, hard_scale · I).
    """

    kind = "regression"
    name = "linear"

    def __init__(self, dim: int = 5, weight_mean: float = 0.0, weight_std: float = 1.0,
                 noise: float = 0.0, hard_fraction: float = 0.0, hard_scale: float = 1.0,
                 hard_offset: float = 0.0) -> None:
        check_positive("dim", dim, integer=True)
        check_positive("weight_std", weight_std, allow_zero=True)
        check_positive("noise", noise, allow_zero=True)
        check_positive("hard_scale", hard_scale)
        if not (isinstance(hard_fraction, (int, float)) and 0.0 <= float(hard_fraction) <= 1.0):
            raise MamlabError(f"hard_fraction must be a number in [0, 1], got {hard_fraction!r}")
        if not (isinstance(hard_offset, (int, float)) and math.isfinite(hard_offset)):
            raise MamlabError(f"hard_offset must be a finite number, got {hard_offset!r}")
        self.dim, self.weight_mean = int(dim), float(weight_mean)
        self.weight_std, self.noise = float(weight_std), float(noise)
        self.hard_fraction, self.hard_scale = float(hard_fraction), float(hard_scale)
        self.hard_offset = float(hard_offset)
        self.in_features, self.out_features = self.dim, 1

    def sample_tasks(self, num_tasks: int,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw task weights ``{"weight": [T, dim], "input_scale": [T]}``.

        ``input_scale`` is the standard deviation of a task's inputs: 1 for easy tasks,
        √hard_scale for hard ones. With ``hard_fraction = 0`` no hardness is drawn, so the
        weights are the very numbers the family drew before the hardness options existed.
        """
        check_positive("num_tasks", num_tasks, integer=True)
        w = self.weight_mean + self.weight_std * torch.randn(num_tasks, self.dim, generator=generator)
        scale = torch.ones(num_tasks)
        if self.hard_fraction > 0:
            hard = torch.rand(num_tasks, generator=generator) < self.hard_fraction
            w = w + self.hard_offset * hard.to(w.dtype).unsqueeze(-1)
            scale = torch.where(hard, math.sqrt(self.hard_scale), 1.0)
        return {"weight": w, "input_scale": scale}

    def _targets(self, tasks: dict[str, torch.Tensor], x: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, tasks: dict[str, torch.Tensor], shots: int, queries: int,
              generator: torch.Generator | None = None) -> TaskBatch:
        """Support and query sets ``x: [T, N, dim]``, ``y: [T, N, 1]`` for given task weights.

        ``tasks`` holds ``"weight"`` and optionally ``"input_scale"`` (default 1 for every task).
        """
        check_positive("shots", shots, integer=True)
        check_positive("queries", queries, integer=True)
        num_tasks = tasks["weight"].shape[0]
        x = torch.randn(num_tasks, shots + queries, self.dim, generator=generator)
        if "input_scale" in tasks:  # x · 1.0 is x bit for bit: easy tasks' inputs are unchanged
            x = x * tasks["input_scale"].to(x.dtype).view(-1, 1, 1)
        y = self._targets(tasks, x, generator)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


class LinearRegression(_LinearTasks):
    """y = wᵀx + ε, ε ~ N(0, noise²): squared loss, model f_θ(x) = θᵀx.

    Args:
        dim: input dimension.
        weight_mean, weight_std: task weights w ~ N(weight_mean, weight_std² I) (easy tasks).
        noise: standard deviation of the target noise ε.
        hard_fraction: probability that a task is hard (0: every task is easy, the default).
        hard_scale: hard tasks' input covariance is ``hard_scale · I`` (> 0).
        hard_offset: hard tasks' weights are centred at ``weight_mean + hard_offset`` in every
            coordinate.
    """

    kind = "regression"
    name = "linear-regression"

    def _targets(self, tasks: dict[str, torch.Tensor], x: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        y = torch.einsum("tnd,td->tn", x, tasks["weight"]).unsqueeze(-1)
        if self.noise > 0:
            y = y + self.noise * torch.randn(y.shape, generator=generator)
        return y


class LinearClassification(_LinearTasks):
    """Binary labels y ~ Bernoulli(σ(wᵀx / temperature)) as 0/1 floats: logistic loss on θᵀx.

    ``temperature=0`` gives noiseless labels 1[wᵀx > 0].
    """

    kind = "classification"
    name = "linear-classification"

    def __init__(self, dim: int = 5, weight_mean: float = 0.0, weight_std: float = 1.0,
                 temperature: float = 0.0) -> None:
        super().__init__(dim, weight_mean, weight_std, noise=0.0)
        check_positive("temperature", temperature, allow_zero=True)
        self.temperature = float(temperature)

    def _targets(self, tasks: dict[str, torch.Tensor], x: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        logits = torch.einsum("tnd,td->tn", x, tasks["weight"]).unsqueeze(-1)
        if self.temperature == 0:
            return (logits > 0).to(x.dtype)
        p = torch.sigmoid(logits / self.temperature)
        return (torch.rand(p.shape, generator=generator) < p).to(x.dtype)
