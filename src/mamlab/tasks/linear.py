"""Linear tasks: regression y = wᵀx + ε and binary classification p(y=1) = σ(wᵀx), w per task.

With the linear model f_θ(x) = θᵀx (``mamlab.models.MLP(d, 1, hidden=(), bias=False)``) the MAML
objective is quadratic (regression) or smooth and convex (classification) in θ, and its
gradient has a closed form: the reference that ``tests/algorithms/test_maml.py`` checks against.
"""

from __future__ import annotations

import torch

from mamlab.errors import check_positive
from mamlab.tasks.base import ParametricTasks, TaskBatch

__all__ = ["LinearRegression", "LinearClassification"]


class _LinearTasks(ParametricTasks):
    """Shared sampling: task weights w ~ N(weight_mean, weight_std² I), inputs x ~ N(0, I)."""

    kind = "regression"
    name = "linear"

    def __init__(self, dim: int = 5, weight_mean: float = 0.0, weight_std: float = 1.0,
                 noise: float = 0.0) -> None:
        check_positive("dim", dim, integer=True)
        check_positive("weight_std", weight_std, allow_zero=True)
        check_positive("noise", noise, allow_zero=True)
        self.dim, self.weight_mean = int(dim), float(weight_mean)
        self.weight_std, self.noise = float(weight_std), float(noise)
        self.in_features, self.out_features = self.dim, 1

    def sample_tasks(self, num_tasks: int,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw task weights ``{"weight": [T, dim]}``."""
        check_positive("num_tasks", num_tasks, integer=True)
        w = self.weight_mean + self.weight_std * torch.randn(num_tasks, self.dim, generator=generator)
        return {"weight": w}

    def _targets(self, tasks: dict[str, torch.Tensor], x: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, tasks: dict[str, torch.Tensor], shots: int, queries: int,
              generator: torch.Generator | None = None) -> TaskBatch:
        """Support and query sets ``x: [T, N, dim]``, ``y: [T, N, 1]`` for given task weights."""
        check_positive("shots", shots, integer=True)
        check_positive("queries", queries, integer=True)
        num_tasks = tasks["weight"].shape[0]
        x = torch.randn(num_tasks, shots + queries, self.dim, generator=generator)
        y = self._targets(tasks, x, generator)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


class LinearRegression(_LinearTasks):
    """y = wᵀx + ε, ε ~ N(0, noise²): squared loss, model f_θ(x) = θᵀx."""

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
