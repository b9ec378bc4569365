"""Reptile (Nichol, Achiam, Schulman 2018): move θ towards the weights each task trains to.

    φ_i = θ after K steps of an optimizer (SGD, or Adam) on task i's training examples
    θ ← θ + ε (φ̄ − θ),        φ̄ = (1/T) Σ_i φ_i

``meta_loss(batch).backward()`` leaves θ − φ̄ in ``.grad``, so plain SGD on θ at learning rate
ε performs the update above, and any optimizer treats θ − φ̄ as a gradient (the paper suggests
Adam). No graph is kept through the inner loop: Reptile is first order by construction.

Training data. As in the paper (and as ``mamlab train`` feeds every algorithm ``shots + queries``
examples per task), ``train_on="support+query"`` (the default) trains each φ_i on the support and
query examples of the task together; ``train_on="support"`` uses the support set only.
``inner_batch`` takes that many examples per inner step (consecutive slices of the training
examples, cycling; the default, all of them): Nichol et al.'s sinusoid script takes 5 steps of 10
points from a task's 50. The slices are taken in the batch's order, which is random for the
regression tasks; for a batch sorted by class, leave ``inner_batch`` unset.

Inner optimizer. ``"sgd"``: φ ← φ − α∇L. ``"adam"``, as ``supervised-reptile``'s
``DEFAULT_OPTIMIZER = partial(tf.train.AdamOptimizer, beta1=0)`` (Omniglot, Mini-ImageNet):
betas (0, 0.999) and eps 1e-8 (TensorFlow's defaults besides β1), written in ``torch.optim.Adam``'s
form; TensorFlow adds eps before the bias correction, i.e. uses eps/√(1−β2ᵗ) here, a difference
of order 1e-7 that is immaterial. The Adam state is fresh for every task (φ_i is a function of θ
and task i alone). Their code differs: Adam's moments (with β1 = 0 only the second) are not reset
between tasks in training, and evaluation starts from the moments training left.

Test time. ``adapt`` runs the same inner optimizer (as Nichol et al. evaluate) on the support set,
``inner_steps`` steps unless ``steps`` says otherwise (the paper's sinusoid figure takes 32). It
returns an ``Adapted`` dict that also remembers the step count and the optimizer's state, so
``adapt(steps=7, start=adapt(steps=1))`` equals ``adapt(steps=8)``, Adam included.

The value of ``meta_loss`` is the mean over tasks of the query loss of φ_i (with the default
``train_on``, examples φ_i was trained on, so a training loss).

Reference: A. Nichol, J. Achiam, J. Schulman. On First-Order Meta-Learning Algorithms.
arXiv:1803.02999, 2018.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from mamlab.algorithms.base import MetaAlgorithm, check_batch
from mamlab.core.batch import TaskBatch
from mamlab.core.execution import PrecomputedGrad, grad_of
from mamlab.core.losses import LossFn
from mamlab.core.params import Params, expand_to_tasks, parameters_of, sgd_step
from mamlab.errors import MamlabError, check_choice, check_positive

__all__ = ["Reptile", "Adapted", "INNER_OPTIMIZERS", "TRAIN_ON", "sgd_update", "adam_update"]

INNER_OPTIMIZERS = ("sgd", "adam")
TRAIN_ON = ("support+query", "support")

#: An inner optimizer's state: named tensors per parameter (Adam: ``exp_avg``, ``exp_avg_sq``).
State = dict[str, Params]


def sgd_update(params: Params, grads: Params, state: State, step: int, lr: float) -> tuple[Params, State]:
    """φ' = φ − α∇ (no state)."""
    return sgd_step(params, grads, lr), state


def adam_update(params: Params, grads: Params, state: State, step: int, lr: float,
                betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> tuple[Params, State]:
    """One Adam step (``torch.optim.Adam``'s formula) at 0-based step ``step``, on any tensor shapes.

    Args:
        params, grads: the parameters and their gradients (task-batched or not, alike).
        state: ``{"exp_avg": ..., "exp_avg_sq": ...}``, or ``{}`` at the first step (zeros).
        step: how many steps were taken before this one.
        lr, betas, eps: Adam's step size, moment decays and denominator constant.

    Returns:
        The new parameters and state.
    """
    b1, b2 = betas
    m0 = state.get("exp_avg", {})
    v0 = state.get("exp_avg_sq", {})
    t = step + 1
    c1, c2 = 1.0 - b1 ** t, (1.0 - b2 ** t) ** 0.5
    m = {k: b1 * m0[k] + (1 - b1) * g if k in m0 else (1 - b1) * g for k, g in grads.items()}
    v = {k: b2 * v0[k] + (1 - b2) * g * g if k in v0 else (1 - b2) * g * g for k, g in grads.items()}
    new = {k: p - (lr / c1) * m[k] / (v[k].sqrt() / c2 + eps) for k, p in params.items()}
    return new, {"exp_avg": m, "exp_avg_sq": v}


class Adapted(dict):
    """Each task's adapted parameters (``[T, ...]`` tensors, a plain dict to ``predict``).

    ``step`` (inner steps taken) and ``state`` (the inner optimizer's per-task state) let a later
    ``adapt(start=...)`` continue the same run of the optimizer.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], step: int = 0, state: State | None = None) -> None:
        super().__init__(params)
        self.step = step
        self.state: State = state or {}


class Reptile(MetaAlgorithm):
    """Reptile: ``.grad`` = θ − (1/T) Σ_i φ_i, φ_i trained on task i by ``inner_steps`` optimizer steps.

    Args:
        model, loss_fn, execution, task_chunk: as for ``MAML``.
        inner_lr: the inner optimizer's step size α.
        inner_steps: inner steps per task in meta-training, and ``adapt``'s default.
        inner_optimizer: ``"sgd"`` or ``"adam"`` (betas (0, 0.999), eps 1e-8, fresh per task).
        train_on: ``"support+query"`` (each task's examples together, the default) or ``"support"``.
        inner_batch: examples per inner step (default: all of the task's training examples).
    """

    name = "reptile"

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float, inner_steps: int = 1,
                 inner_optimizer: str = "sgd", train_on: str = "support+query",
                 inner_batch: int | None = None, execution: str = "auto",
                 task_chunk: int | None = None) -> None:
        check_positive("inner_lr", inner_lr)
        check_positive("inner_steps", inner_steps, integer=True)
        check_choice("inner_optimizer", inner_optimizer, INNER_OPTIMIZERS)
        check_choice("train_on", train_on, TRAIN_ON)
        if inner_batch is not None:
            check_positive("inner_batch", inner_batch, integer=True)
        super().__init__(model, loss_fn, execution=execution, task_chunk=task_chunk)
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.inner_optimizer = inner_optimizer
        self.train_on = train_on
        self.inner_batch = inner_batch
        self.update = adam_update if inner_optimizer == "adam" else sgd_update

    # ------------------------------------------------------------------ the inner loop
    def minibatch(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples of inner step ``step``: all, or the ``step``-th slice of ``inner_batch`` (cycling)."""
        n = x.shape[1]
        if self.inner_batch is None or self.inner_batch >= n:
            return x, y
        idx = (torch.arange(self.inner_batch, device=x.device) + step * self.inner_batch) % n
        return x[:, idx], y[:, idx]

    def descend(self, params: Params, state: State, x: torch.Tensor, y: torch.Tensor, steps: int,
                path: str, first_step: int = 0, lr: float | None = None) -> tuple[Params, State]:
        """``steps`` inner-optimizer steps of a chunk's ``params`` on ``(x, y)`` ``[t, N, ...]``; detached."""
        lr = self.inner_lr if lr is None else lr
        for k in range(first_step, first_step + steps):
            xb, yb = self.minibatch(x, y, k)
            params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            with torch.enable_grad():
                grads = grad_of(self.engine.losses(params, {}, xb, yb, path).sum(), params, False)
            with torch.no_grad():
                params, state = self.update(params, grads, state, k, lr)
        return params, state

    def runs(self, begin: Mapping[str, torch.Tensor], state: State, x: torch.Tensor, y: torch.Tensor,
             steps: int, path: str, first_step: int = 0,
             lr: float | None = None) -> Iterator[tuple[slice, Params, State]]:
        """Each chunk of tasks descended from ``begin`` (``[T, ...]``): (slice, φ, state).

        A chunk of one task (the loop path) runs, and comes back, without a task dimension.
        """
        for s in self.engine.chunks(x.shape[0], path):
            one = s.stop - s.start == 1

            def part(p: torch.Tensor, s: slice = s, one: bool = one) -> torch.Tensor:
                return p[s.start] if one else p[s]

            params = {k: part(p) for k, p in begin.items()}
            chunk_state = {n: {k: part(p) for k, p in v.items()} for n, v in state.items()}
            phi, chunk_state = self.descend(params, chunk_state, x[s], y[s], steps, path, first_step, lr)
            yield s, phi, chunk_state

    def training_set(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples φ_i trains on: support and query together, or the support set (``train_on``)."""
        if self.train_on == "support":
            return batch.support_x, batch.support_y
        return torch.cat([batch.support_x, batch.query_x], 1), torch.cat([batch.support_y, batch.query_y], 1)

    # ------------------------------------------------------------------ the contract
    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        """(1/T) Σ_i L_query(φ_i), whose ``.backward()`` deposits θ − φ̄ in ``.grad``."""
        check_batch(batch, self.model)
        theta = parameters_of(self.model)
        x, y = self.training_set(batch)
        path = self.engine.path(x.device)
        num = batch.num_tasks
        begin = expand_to_tasks({k: p.detach() for k, p in theta.items()}, num)
        delta = {k: torch.zeros_like(p) for k, p in theta.items()}
        total = torch.zeros((), dtype=next(iter(theta.values())).dtype, device=x.device)
        for s, phi, _ in self.runs(begin, {}, x, y, self.inner_steps, path):
            with torch.no_grad():
                for k, p in phi.items():
                    d = theta[k] - p
                    delta[k] += d.sum(0) if self.engine.batched(k, p) else d
                losses = self.engine.losses(phi, {}, batch.query_x[s], batch.query_y[s], path)
                total = total + losses.sum().to(total.dtype)
        wrt = self.meta_parameters()
        grads = tuple(delta[k] / num for k in theta)
        return PrecomputedGrad.apply(total / num, grads, *wrt)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None,
              start: Mapping[str, torch.Tensor] | None = None, lr: float | None = None) -> Adapted:
        """Each task's φ_i after ``steps`` inner-optimizer steps on its support set, ``[T, ...]``.

        Args:
            support_x, support_y: ``[T, K, ...]`` support inputs and targets.
            steps: inner steps (default ``inner_steps``; 0 returns ``start`` or θ for every task).
            start: an earlier ``adapt`` result to continue (its step count and optimizer state
                too), or any dict of ``[T, ...]`` parameters (a fresh optimizer); default θ.
            lr: the inner step size instead of ``inner_lr``.

        Returns:
            ``Adapted``: the parameters, detached from θ, with the step count and optimizer state.
        """
        steps = self.check_adapt(support_x, support_y, steps, lr)
        theta = {k: p.detach() for k, p in parameters_of(self.model).items()}
        num = support_x.shape[0]
        if start is not None:
            if set(start) != set(theta) or any(p.shape[0] != num for p in start.values()):
                raise MamlabError(f"start must hold [{num}, ...] tensors for exactly {', '.join(theta)}")
            begin = {k: p.detach() for k, p in start.items()}
            first, state = getattr(start, "step", 0), getattr(start, "state", {})
        else:
            begin, first, state = expand_to_tasks(theta, num), 0, {}
        if steps == 0:
            return Adapted({k: p.clone() for k, p in begin.items()}, first, state)
        path = self.engine.path(support_x.device)
        parts, states = [], []
        for _, phi, st in self.runs(begin, state, support_x, support_y, steps, path, first, lr):
            parts.append(self.engine.with_task_dim(phi))
            states.append({n: self.engine.with_task_dim(v) for n, v in st.items()})
        params = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        state = {n: {k: torch.cat([st[n][k] for st in states]) for k in states[0][n]} for n in states[0]}
        return Adapted(params, first + steps, state)

    def predict(self, adapted: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f_{φ_i}(x_i) for every task i: ``adapted`` from ``adapt``, ``x`` shaped ``[T, M, ...]``."""
        params = dict(adapted)
        num = next(iter(params.values())).shape[0]
        if x.shape[0] != num:
            raise MamlabError(f"x has {x.shape[0]} tasks but params have {num}; they must match")
        path = self.engine.path(x.device)
        with torch.no_grad():
            return torch.cat([self.engine.forward({k: p[s] for k, p in params.items()}, {}, x[s], path)
                              for s in self.engine.chunks(num, path)])

    def options(self) -> dict[str, object]:
        """inner_lr, inner_steps, inner_optimizer, train_on (and inner_batch when set)."""
        out: dict[str, object] = {"inner_lr": self.inner_lr, "inner_steps": self.inner_steps,
                                  "inner_optimizer": self.inner_optimizer, "train_on": self.train_on}
        if self.inner_batch is not None:
            out["inner_batch"] = self.inner_batch
        return out
