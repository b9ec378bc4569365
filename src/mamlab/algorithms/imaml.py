"""iMAML (Rajeswaran et al. 2019): a proximally regularised inner loop and its implicit meta-gradient.

For each task T_i of a meta-batch, the inner loop approximately solves

    φ_i = argmin_φ  L_i^train(φ) + (λ/2) ‖φ − θ‖²

by ``inner_steps`` steps of gradient descent at ``inner_lr``, started at θ; no graph is kept
through those steps. At the minimiser, dφ_i/dθ = (I + H_i/λ)⁻¹ with H_i = ∇² L_i^train(φ_i), so

    meta-gradient = (1/T) Σ_i (I + H_i/λ)⁻¹ ∇_φ L_i^test(φ_i),

each solve taken by ``cg_steps`` iterations of conjugate gradient on Hessian-vector products.
Memory is that of one forward/backward (plus one double-backward for the products), whatever the
number of inner steps. The solves of a chunk of tasks run together: the Hessian-vector product
of the *summed* support losses w.r.t. task-batched φ is each task's own product, since task i's
loss depends on φ_i alone.

At test time (``adapt``) the proximal term is kept, as in the paper: φ_i is the same regularised
inner loop from θ, so the meta-trained θ is used exactly as it was trained. Continuing an earlier
``adapt`` (``start=``) keeps θ as the anchor, so adapting in pieces equals adapting at once.

Reference: A. Rajeswaran, C. Finn, S. Kakade, S. Levine. Meta-Learning with Implicit Gradients.
NeurIPS 2019.

Example:
    >>> model = mamlab.models.MLP(1, 1, hidden=(40, 40))
    >>> imaml = iMAML(model, torch.nn.functional.mse_loss, inner_lr=0.01, inner_steps=10, lam=2.0)
    >>> batch = mamlab.tasks.Sinusoid().sample(25, 10, 10, torch.Generator().manual_seed(0))
    >>> imaml.meta_loss(batch).backward()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from mamlab.algorithms.base import InnerLoopAlgorithm
from mamlab.core.batch import TaskBatch
from mamlab.core.execution import grad_of
from mamlab.core.losses import LossFn
from mamlab.core.params import Params
from mamlab.errors import check_positive

__all__ = ["iMAML", "conjugate_gradient", "proximal_step"]


def proximal_step(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                  anchor: Mapping[str, torch.Tensor], lr: float, lam: float) -> Params:
    """φ − α (∇L(φ) + λ (φ − θ)): one gradient step on L(φ) + (λ/2)‖φ − θ‖² (θ = ``anchor``)."""
    return {k: p - lr * (grads[k] + lam * (p - anchor[k])) for k, p in params.items()}


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], batched: bool) -> torch.Tensor:
    """Each task's inner product ⟨a_i, b_i⟩ over all parameters: ``[t]``, or a scalar for one task."""
    if batched:
        return sum((a[k] * b[k]).reshape(a[k].shape[0], -1).sum(1) for k in a)  # type: ignore[return-value]
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def _scaled(c: torch.Tensor, p: torch.Tensor, batched: bool) -> torch.Tensor:
    """The per-task scalars ``c`` shaped to multiply the task-batched ``p``."""
    return c.view(-1, *[1] * (p.dim() - 1)) if batched else c


def conjugate_gradient(matvec: Callable[[Params], Params], b: Mapping[str, torch.Tensor], steps: int,
                       batched: bool) -> Params:
    """x ≈ A⁻¹ b by ``steps`` conjugate-gradient iterations from x = 0, for every task at once.

    Args:
        matvec: v ↦ A v on parameter dicts; for task-batched dicts it must act on each task alone.
        b: the right-hand side (task-batched ``[t, ...]`` if ``batched``).
        steps: iterations; in exact arithmetic n of them solve an n-dimensional positive-definite A.
        batched: whether the tensors carry a leading task dimension (each task gets its own step
            sizes); a chunk of one task has none.

    Returns:
        x as a dict like ``b``. A task whose residual reaches exactly zero stops moving.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    rr = _dot(r, r, batched)
    for _ in range(steps):
        ap = matvec(p)
        pap = _dot(p, ap, batched)
        alpha = torch.where(pap != 0, rr / torch.where(pap != 0, pap, 1), 0)
        x = {k: v + _scaled(alpha, p[k], batched) * p[k] for k, v in x.items()}
        r = {k: v - _scaled(alpha, ap[k], batched) * ap[k] for k, v in r.items()}
        rr_new = _dot(r, r, batched)
        beta = torch.where(rr != 0, rr_new / torch.where(rr != 0, rr, 1), 0)
        p = {k: r[k] + _scaled(beta, v, batched) * v for k, v in p.items()}
        rr = rr_new
    return x


class iMAML(InnerLoopAlgorithm):  # noqa: N801 (the paper's name)
    """Implicit MAML around any ``torch.nn.Module``.

    Args:
        model, loss_fn, execution, task_chunk: as for ``MAML``.
        inner_lr: α, the step size of the inner gradient descent.
        inner_steps: inner steps on L_support(φ) + (λ/2)‖φ − θ‖², from θ (>= 1).
        lam: λ > 0, the strength of the proximal term; larger keeps φ_i closer to θ.
        cg_steps: conjugate-gradient iterations per meta-gradient solve (>= 1).

    Every trainable parameter of the model is adapted per task (the proximal term couples all of
    θ to φ). ``meta_loss(batch)`` returns the mean query loss at φ_i; its ``.backward()`` deposits
    the implicit meta-gradient.
    """

    name = "imaml"

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float, inner_steps: int = 1,
                 lam: float = 2.0, cg_steps: int = 5, execution: str = "auto",
                 task_chunk: int | None = None) -> None:
        check_positive("inner_lr", inner_lr)
        check_positive("lam", lam)
        check_positive("cg_steps", cg_steps, integer=True)
        super().__init__(model, loss_fn, inner_steps=inner_steps, execution=execution,
                         task_chunk=task_chunk)
        self.inner_lr = float(inner_lr)
        self.lam = float(lam)
        self.cg_steps = int(cg_steps)

    def inner_update(self, params: Params, grads: Params, step: int, lr: float | None = None) -> Params:
        """φ' = φ − α (∇L_support(φ) + λ(φ − θ)), detached: no graph is kept across inner steps."""
        anchor, _ = self.split_parameters(detach=True)
        with torch.no_grad():
            new = proximal_step(params, grads, anchor, self.inner_lr if lr is None else lr, self.lam)
        return {k: p.requires_grad_(True) for k, p in new.items()}

    def task_losses(self, batch: TaskBatch, path: str, steps: int | None = None,
                    theta: tuple[Params, Params] | None = None) -> torch.Tensor:
        """L_query(φ_i) of every task ``[t]``, whose gradient w.r.t. θ is the implicit one.

        The value is each task's query loss at φ_i; the gradient of task i's entry w.r.t. θ is
        v_i = (I + H_i/λ)⁻¹ ∇_φ L_query(φ_i) (a surrogate ``⟨v_i, θ⟩`` carries it), so
        ``meta_loss`` and ``query_losses`` deliver it through the engine unchanged.
        """
        adapted, shared = self.split_parameters() if theta is None else theta
        shared = {k: p.detach() for k, p in shared.items()}
        num = batch.num_tasks
        batched = num > 1  # a chunk of one task has no task dimension
        phi = {k: p.detach().clone().requires_grad_(True)
               for k, p in self.engine.per_task(adapted, num).items()}
        phi = self.inner_loop(phi, shared, batch.support_x, batch.support_y,
                              self.inner_steps if steps is None else steps, path, create_graph=False)
        with torch.enable_grad():
            query = self.engine.losses(phi, shared, batch.query_x, batch.query_y, path)
            rhs = grad_of(query.sum(), phi, create_graph=False)
            support = self.engine.losses(phi, shared, batch.support_x, batch.support_y, path)
            support_grad = grad_of(support.sum(), phi, create_graph=True)
        names = [k for k, g in support_grad.items() if g.requires_grad]  # the others have H v = 0

        def matvec(v: Params) -> Params:  # (I + H/λ) v, H the support loss's Hessian at φ, per task
            hv = torch.autograd.grad([support_grad[k] for k in names], [phi[k] for k in phi],
                                     grad_outputs=[v[k] for k in names], retain_graph=True,
                                     allow_unused=True) if names else [None] * len(phi)
            return {k: v[k] if h is None else v[k] + h / self.lam for k, h in zip(phi, hv, strict=True)}

        solution = conjugate_gradient(matvec, rhs, self.cg_steps, batched)
        surrogate = _dot(solution, {k: adapted[k].expand_as(v) for k, v in solution.items()}, batched)
        per_task = surrogate if batched else surrogate.unsqueeze(0)
        return query.detach() + per_task - per_task.detach()

    def options(self) -> dict[str, object]:
        """inner_lr, inner_steps, lam, cg_steps."""
        return {"inner_lr": self.inner_lr, "inner_steps": self.inner_steps, "lam": self.lam,
                "cg_steps": self.cg_steps}
