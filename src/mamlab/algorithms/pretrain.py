"""The pretrain baseline of Finn et al. 2017: one network trained on every task's examples, pooled.

    loss = L(f_θ; ∪_i D_i^train ∪ D_i^test)          (ordinary supervised learning)

At test time it is fine-tuned exactly like MAML: ``inner_steps`` SGD steps of size ``inner_lr``
on each new task's support set. Its ``meta_loss`` is the pooled loss, so ``.backward()`` gives
the ordinary gradient and the same training loop trains it.
"""

from __future__ import annotations

import torch
from torch import nn

from mamlab.algorithms.base import InnerLoopAlgorithm, check_batch
from mamlab.core.batch import TaskBatch
from mamlab.core.losses import LossFn
from mamlab.core.params import Params, check_output, sgd_step
from mamlab.errors import check_positive

__all__ = ["Pretrain"]


class Pretrain(InnerLoopAlgorithm):
    """Supervised pretraining on all tasks pooled; SGD fine-tuning at test time.

    Args:
        model, loss_fn: as for ``MAML``.
        inner_lr: the fine-tuning step size used by ``adapt``.
        inner_steps: fine-tuning steps ``adapt`` takes by default.
        execution, task_chunk: how ``adapt`` runs the tasks (``mamlab.core.execution``).
    """

    name = "pretrain"

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float, inner_steps: int = 1,
                 execution: str = "auto", task_chunk: int | None = None) -> None:
        check_positive("inner_lr", inner_lr)
        super().__init__(model, loss_fn, inner_steps=inner_steps, execution=execution,
                         task_chunk=task_chunk)
        self.inner_lr = float(inner_lr)

    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        """The supervised loss on every example of every task of ``batch``, pooled."""
        check_batch(batch, self.model)
        x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)
        y = torch.cat([batch.support_y, batch.query_y], 1).flatten(0, 1)
        out = self.model(x)
        check_output(self.model, out)  # one tensor, or a one-line error naming the fix
        return self.loss_fn(out, y)

    def inner_update(self, params: Params, grads: Params, step: int, lr: float | None = None) -> Params:
        """Fine-tuning: θ' = θ − α ∇θ L_support(θ)."""
        return sgd_step(params, grads, self.inner_lr if lr is None else lr)

    def options(self) -> dict[str, object]:
        """inner_lr and inner_steps (of the fine-tuning at test time)."""
        return {"inner_lr": self.inner_lr, "inner_steps": self.inner_steps}
