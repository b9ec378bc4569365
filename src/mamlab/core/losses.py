"""Per-task losses ``[T]`` for task-batched predictions: direct formulas for common losses, vmap otherwise.

A MAML loss function maps one task's ``(prediction, target)`` to the mean loss over its examples.
For the common ones the per-task means of a whole meta-batch have a direct batched formula, which
skips vmap's dispatch cost on the hot path; any other loss is vmapped over the task dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import vmap

__all__ = ["per_task_loss", "LossFn"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).flatten(1).mean(1)


def _cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.dtype.is_floating_point or pred.dim() != 3:  # soft labels or extra dims: be generic
        return vmap(F.cross_entropy)(pred, target)
    t, n = target.shape
    losses = F.cross_entropy(pred.reshape(t * n, -1), target.reshape(t * n), reduction="none")
    return losses.view(t, n).mean(1)


def _bce_logits(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none").flatten(1).mean(1)


_DIRECT: dict[Callable, LossFn] = {
    F.mse_loss: _mse,
    F.cross_entropy: _cross_entropy,
    F.binary_cross_entropy_with_logits: _bce_logits,
}


def per_task_loss(loss_fn: LossFn) -> LossFn:
    """``f(pred [T, N, ...], target [T, N, ...]) -> [T]``: ``loss_fn`` applied to each task."""
    direct = _DIRECT.get(loss_fn)
    return direct if direct is not None else vmap(loss_fn)
