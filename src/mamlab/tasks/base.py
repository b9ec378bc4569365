"""The TaskFamily protocol and parametric task families; ``TaskBatch`` (from ``mamlab.core.batch``)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from mamlab.core.batch import TaskBatch
from mamlab.errors import check_positive

__all__ = ["TaskBatch", "TaskFamily", "ParametricTasks"]


@runtime_checkable
class TaskFamily(Protocol):
    """A distribution p(T) over tasks that can draw seeded meta-batches."""

    kind: str  # "regression" or "classification"

    def sample(self, num_tasks: int, shots: int, queries: int,
               generator: torch.Generator | None = None) -> TaskBatch:
        """Draw ``num_tasks`` tasks with ``shots`` support and ``queries`` query examples each."""
        ...


class ParametricTasks:
    """A task family defined by per-task parameters: ``sample = batch(sample_tasks(...))``.

    Subclasses implement ``sample_tasks(num_tasks, generator) -> dict`` (the task parameters,
    e.g. amplitudes and phases) and ``batch(tasks, shots, queries, generator) -> TaskBatch``
    (the support and query examples of given tasks), so analyses can hold the tasks fixed and
    redraw the examples, or shift the task distribution.
    """

    def sample_tasks(self, num_tasks: int,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw the parameters of ``num_tasks`` tasks."""
        raise NotImplementedError

    def batch(self, tasks: dict[str, torch.Tensor], shots: int, queries: int,
              generator: torch.Generator | None = None) -> TaskBatch:
        """Support and query sets for given task parameters."""
        raise NotImplementedError

    def sample(self, num_tasks: int, shots: int, queries: int,
               generator: torch.Generator | None = None) -> TaskBatch:
        """Draw ``num_tasks`` tasks with ``shots`` support and ``queries`` query examples each."""
        check_positive("shots", shots, integer=True)
        check_positive("queries", queries, integer=True)
        return self.batch(self.sample_tasks(num_tasks, generator), shots, queries, generator)
