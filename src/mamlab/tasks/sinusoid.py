"""Sinusoid regression (Finn et al. 2017, section 5.1): y = A sin(x − φ)."""

from __future__ import annotations

import math

import torch

from mamlab.errors import MamlabError, check_positive
from mamlab.tasks.base import ParametricTasks, TaskBatch

__all__ = ["Sinusoid"]


def _range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise MamlabError(f"{name} must be a finite (low, high) pair with low <= high, got {value!r}")
    return lo, hi


class Sinusoid(ParametricTasks):
    """Tasks y = A sin(x − φ), A ~ U[amplitude], φ ~ U[phase], inputs x ~ U[x_range].

    Args:
        amplitude: range of A (paper: 0.1 to 5.0).
        phase: range of φ (paper: 0 to π).
        x_range: range of the inputs (paper: −5 to 5).
        noise: standard deviation of Gaussian noise added to the targets (paper: 0).
    """

    kind = "regression"
    name = "sinusoid"

    def __init__(self, amplitude: tuple[float, float] = (0.1, 5.0),
                 phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0), noise: float = 0.0) -> None:
        self.amplitude = _range("amplitude", amplitude)
        self.phase = _range("phase", phase)
        self.x_range = _range("x_range", x_range)
        check_positive("noise", noise, allow_zero=True)
        self.noise = float(noise)
        self.in_features, self.out_features = 1, 1

    def sample_tasks(self, num_tasks: int,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw the task parameters: ``{"amplitude": [T], "phase": [T]}``."""
        check_positive("num_tasks", num_tasks, integer=True)
        u = torch.rand(2, num_tasks, generator=generator, dtype=torch.float64)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[0]
        ph = self.phase[0] + (self.phase[1] - self.phase[0]) * u[1]
        return {"amplitude": amp.float(), "phase": ph.float()}

    @staticmethod
    def function(tasks: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The noiseless targets A_i sin(x − φ_i) for inputs ``x`` shaped ``[T, N, 1]``."""
        return tasks["amplitude"].view(-1, 1, 1) * torch.sin(x - tasks["phase"].view(-1, 1, 1))

    def inputs(self, num_tasks: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Inputs ``[T, n, 1]`` drawn uniformly from ``x_range``."""
        lo, hi = self.x_range
        return lo + (hi - lo) * torch.rand(num_tasks, n, 1, generator=generator)

    def batch(self, tasks: dict[str, torch.Tensor], shots: int, queries: int,
              generator: torch.Generator | None = None) -> TaskBatch:
        """Support and query sets for given task parameters."""
        check_positive("shots", shots, integer=True)
        check_positive("queries", queries, integer=True)
        num_tasks = tasks["amplitude"].shape[0]
        x = self.inputs(num_tasks, shots + queries, generator)
        y = self.function(tasks, x)
        if self.noise > 0:
            y = y + self.noise * torch.randn(y.shape, generator=generator)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    def __repr__(self) -> str:
        return f"Sinusoid(amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range})"
