"""MAML (Finn et al. 2017): plain gradient descent in the inner loop, second or first order.

For each task T_i of a meta-batch::

    θ'_i = θ − α ∇θ L_{T_i}(f_θ; D_i^train)          (``inner_steps`` times)
    meta-loss = (1/T) Σ_i L_{T_i}(f_{θ'_i}; D_i^test)

``meta_loss(batch).backward()`` leaves ∇θ of the meta-loss in ``.grad``. Second order
differentiates through the inner steps; first order (FOMAML) treats ∇θ L as a constant. Which
tasks run together (batched MLP, vmap, loop) is decided by ``mamlab.core.execution``.

Reference: C. Finn, P. Abbeel, S. Levine. Model-Agnostic Meta-Learning for Fast Adaptation of
Deep Networks. ICML 2017.

Example:
    >>> model = mamlab.models.MLP(1, 1, hidden=(40, 40))
    >>> maml = MAML(model, torch.nn.functional.mse_loss, inner_lr=0.01)
    >>> batch = mamlab.tasks.Sinusoid().sample(25, 10, 10, torch.Generator().manual_seed(0))
    >>> maml.meta_loss(batch).backward()
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mamlab.algorithms.base import InnerLoopAlgorithm
from mamlab.core.execution import EXECUTIONS, default_execution
from mamlab.core.losses import LossFn
from mamlab.core.params import Params, sgd_step
from mamlab.errors import check_positive

__all__ = ["MAML", "default_execution", "EXECUTIONS"]


class MAML(InnerLoopAlgorithm):
    """Model-Agnostic Meta-Learning around any ``torch.nn.Module``.

    Args:
        model: the network f_θ; its trainable parameters are θ. No special base class needed.
        loss_fn: ``loss_fn(prediction, target)`` → scalar mean loss over one task's examples,
            e.g. ``torch.nn.functional.mse_loss`` or ``cross_entropy``.
        inner_lr: α, the inner SGD step size (> 0).
        inner_steps: how many inner steps adapt θ to a task's support set (>= 1).
        first_order: drop the second-order terms (FOMAML); ``.grad`` is still filled.
        execution: ``"auto"``, ``"batched"``, ``"vmap"``, ``"loop"`` or ``"conv"`` (same numbers,
            different speed and memory; ``mamlab.core.execution``).
        inner_params: names of the parameters adapted in the inner loop (default: all). Only
            the head, for example, gives ANIL (Raghu et al. 2020). The outer loop updates all.
        task_chunk: with ``"batched"``, ``"vmap"`` or ``"conv"``, how many tasks run together
            (default: the whole batch; one task on the CPU's conv path); smaller chunks trade speed
            for memory.
        recompute: second order only: recompute each inner step's graph in backward instead of
            keeping it, so graph memory barely grows with ``inner_steps`` (``InnerLoopAlgorithm``);
            the same meta-gradient for about one more forward-and-gradient per step.

    BatchNorm: the model runs in whatever mode it is in. Layers built with
    ``track_running_stats=False`` (as ``mamlab.models.Conv4`` and MAML's reference code do)
    normalize every forward pass with the current task's batch statistics, at meta-train and
    meta-test time alike, so ``model.eval()`` does not change them.
    """

    name = "maml"

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float, inner_steps: int = 1,
                 first_order: bool = False, execution: str = "auto",
                 inner_params: Sequence[str] | None = None, task_chunk: int | None = None,
                 recompute: bool = False) -> None:
        check_positive("inner_lr", inner_lr)
        super().__init__(model, loss_fn, inner_steps=inner_steps, first_order=first_order,
                         inner_params=inner_params, execution=execution, task_chunk=task_chunk,
                         recompute=recompute)
        self.inner_lr = float(inner_lr)

    def inner_update(self, params: Params, grads: Params, step: int, lr: float | None = None) -> Params:
        """θ' = θ − α ∇θ L_support(θ)."""
        return sgd_step(params, grads, self.inner_lr if lr is None else lr)

    def options(self) -> dict[str, object]:
        """inner_lr, inner_steps, first_order (and inner_params when not all, recompute when on)."""
        out: dict[str, object] = {"inner_lr": self.inner_lr, "inner_steps": self.inner_steps,
                                  "first_order": self.first_order}
        if self.inner_params is not None:
            out["inner_params"] = list(self.inner_params)
        if self.recompute:
            out["recompute"] = True
        return out
