"""TaskBatch: the support and query sets of a meta-batch of tasks, with a leading task dimension."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mamlab.errors import MamlabError

__all__ = ["TaskBatch"]


@dataclass(frozen=True)
class TaskBatch:
    """Support and query sets of T tasks: tensors shaped ``[T, N, ...]``.

    ``support_x[i]``/``support_y[i]`` is task i's training set D_i^train and
    ``query_x[i]``/``query_y[i]`` its test set D_i^test (Finn et al. 2017, Algorithm 1).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        names = ("support_x", "support_y", "query_x", "query_y")
        for name in names:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise MamlabError(f"TaskBatch.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise MamlabError(
                    f"TaskBatch.{name} must have shape [tasks, examples, ...], got {tuple(t.shape)}"
                )
        tasks = {self.support_x.shape[0], self.support_y.shape[0],
                 self.query_x.shape[0], self.query_y.shape[0]}
        if len(tasks) != 1:
            raise MamlabError(
                "TaskBatch tensors must share the task dimension, got "
                + ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in names)
            )
        if self.support_x.shape[1] != self.support_y.shape[1]:
            raise MamlabError(
                f"support_x has {self.support_x.shape[1]} examples per task but support_y has "
                f"{self.support_y.shape[1]}; they must match"
            )
        if self.query_x.shape[1] != self.query_y.shape[1]:
            raise MamlabError(
                f"query_x has {self.query_x.shape[1]} examples per task but query_y has "
                f"{self.query_y.shape[1]}; they must match"
            )
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise MamlabError(
                f"support_x example shape {tuple(self.support_x.shape[2:])} differs from query_x "
                f"example shape {tuple(self.query_x.shape[2:])}; they must match"
            )
        if self.support_x.shape[0] == 0:
            raise MamlabError("TaskBatch needs at least one task, got 0")
        if self.support_x.shape[1] == 0:
            raise MamlabError("TaskBatch needs at least one support example per task, got 0")

    @property
    def num_tasks(self) -> int:
        """The number of tasks T."""
        return self.support_x.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move the batch; ``dtype`` applies to floating-point tensors only (labels stay integer)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(move(self.support_x), move(self.support_y),
                         move(self.query_x), move(self.query_y))

    def task(self, i: int) -> TaskBatch:
        """Task ``i`` alone, as a batch of one."""
        return self.slice(slice(i, i + 1))

    def slice(self, tasks: slice) -> TaskBatch:
        """The tasks selected by ``tasks`` (a slice of the task dimension), as a batch."""
        return TaskBatch(self.support_x[tasks], self.support_y[tasks],
                         self.query_x[tasks], self.query_y[tasks])
