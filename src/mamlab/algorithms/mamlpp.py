"""MAML++ (Antoniou, Edwards, Storkey 2019): MAML with the tricks of "How to train your MAML".

Each trick is a switch (all on by default):

* **LSLR** (``lslr``): per-layer, per-step learned inner learning rates. For every parameter
  tensor θ_l adapted in the inner loop and every inner step k there is a learned α_{l,k}
  (initialised to ``inner_lr``): θ_l^{(k+1)} = θ_l^{(k)} − α_{l,k} ∇_{θ_l} L_support(θ^{(k)}).
  They are ``nn.Parameter``s of the algorithm (``self.lrs``, one ``[inner_steps]`` vector per
  tensor, as the released code keeps them), so they are trained, checkpointed and used at eval.
* **MSL** (``msl``): the multi-step loss. The per-task objective is Σ_k w_k L_query(θ^{(k)}) over
  the inner steps k = 1..N, with the released code's schedule (``msl_weights``): every weight
  starts at 1/N; each non-final one decays by 1/(N·E) per epoch down to 0.03/N, the final one
  grows to at most 1 − (N−1)·0.03/N; from epoch E = ``msl_epochs`` on only the final step's
  loss counts. Epochs are ``iterations_per_epoch`` training iterations (the released code: 500
  per epoch, MSL for 10 epochs); the training loop tells the algorithm the iteration through
  ``start_iteration``. A schedule longer than the run (E · iterations_per_epoch > iterations,
  with more than one inner step) is a one-line error from ``start_iteration``.
* **Per-step BatchNorm** (``per_step_bn``): every BatchNorm layer gets, for each inner step k,
  its own weight and bias (``self.step_bn``, ``[inner_steps, C]``, initialised from the model's)
  and, where the layer tracks running statistics, its own running mean/variance (buffers in
  ``self.step_bn_stats``). As in the released code the BatchNorm weights and biases are not
  adapted in the inner loop (the outer loop trains the per-step copies; the model's own
  BatchNorm affine parameters are then unused and get zero gradients), the support pass of step k
  uses step k's BatchNorm, and the query loss after the update of step k uses step k's too (the
  final query, after N steps, uses step N's). ``mamlab.models.Conv4`` builds its BatchNorm with
  ``track_running_stats=False``: there only the per-step affine parameters apply, every pass
  normalizing with the batch's own statistics.
* **Derivative-order annealing** (``first_order_epochs``): first-order meta-gradients for the
  first ``first_order_epochs`` epochs, second order after (0: second order throughout). The paper
  proposes 50 epochs, the default; the released configurations set
  ``first_order_to_second_order_epoch = -1``, i.e. second order throughout (``first_order_epochs=0``).
* **Cosine annealing of the meta learning rate** is the run option ``lr_schedule = "cosine"``
  (``mamlab.config``), not part of the algorithm.

Epoch e of iteration i (1-based) is ``(i − 1) // iterations_per_epoch``, as the released code's
``int(current_iter / total_iter_per_epoch)`` with ``current_iter`` the iterations done. Before
any ``start_iteration`` the algorithm is at epoch 0. The multi-step loss applies to ``meta_loss``
(training) only; ``adapt``/``predict`` (evaluation) use the learned rates and per-step BatchNorm.

Adapting for more steps than the ``inner_steps`` trained reuses the last step's learning rates
and BatchNorm. ``adapt`` returns an ``AdaptedParams`` (a dict of ``[T, ...]`` tensors that also
records ``.steps``, the inner steps taken), so ``adapt(..., start=earlier)`` continues with the
right step's rates and BatchNorm and ``predict`` uses the BatchNorm of the last step taken
(step 1's before any step): k steps in one call or in several give the same numbers.

Reference: A. Antoniou, H. Edwards, A. Storkey. How to train your MAML. ICLR 2019
(code: github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch).

Example:
    >>> model = mamlab.models.Conv4(ways=5)
    >>> algo = MAMLPlusPlus(model, F.cross_entropy, inner_lr=0.1, inner_steps=5)
    >>> algo.start_iteration(1, 50_000)
    >>> algo.meta_loss(batch).backward()    # fills θ's, the learning rates' and BatchNorm's .grad
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mamlab.algorithms.base import InnerLoopAlgorithm
from mamlab.core.batch import TaskBatch
from mamlab.core.execution import grad_of
from mamlab.core.losses import LossFn
from mamlab.core.params import Params, sgd_step
from mamlab.errors import MamlabError, check_positive

__all__ = ["MAMLPlusPlus", "AdaptedParams", "msl_weights"]


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """The multi-step loss weights w_1..w_N of the released code at ``epoch`` (0-based).

    Args:
        steps: N, the inner steps.
        epoch: the current epoch (0-based).
        msl_epochs: E, the epochs the multi-step loss lasts; from epoch E on, ``[0, ..., 0, 1]``.

    Returns:
        N weights: ``max(1/N − epoch/(N·E), 0.03/N)`` for the first N − 1, and
        ``min(1/N + epoch·(N−1)/(N·E), 1 − (N−1)·0.03/N)`` for the last.
    """
    if epoch >= msl_epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    return [*weights, min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)]


class AdaptedParams(dict):
    """Adapted parameters (``name → [T, ...]``) and ``steps``, the inner steps that produced them."""

    def __init__(self, params: Mapping[str, torch.Tensor], steps: int) -> None:
        super().__init__(params)
        self.steps = int(steps)


def _key(name: str) -> str:
    return name.replace(".", "-")  # ParameterDict keys and buffer names cannot hold dots


class MAMLPlusPlus(InnerLoopAlgorithm):
    """MAML++ around any ``torch.nn.Module``.

    Args:
        model, loss_fn, execution, task_chunk: as for ``MAML``.
        inner_lr: α, the inner step size (LSLR's initial value for every layer and step).
        inner_steps: N, the inner steps of meta-training (and of ``adapt`` by default).
        lslr: learn a step size per parameter tensor and inner step.
        msl: the multi-step loss (weights ``msl_weights``) for the first ``msl_epochs`` epochs.
        msl_epochs: E, how many epochs the multi-step loss lasts.
        iterations_per_epoch: training iterations per "epoch" of the schedules.
        per_step_bn: per-step BatchNorm weights, biases (and running statistics, where tracked).
        first_order_epochs: first-order meta-gradients for this many epochs, then second order.
    """

    name = "mamlpp"

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float, inner_steps: int = 5, *,
                 lslr: bool = True, msl: bool = True, msl_epochs: int = 10, iterations_per_epoch: int = 500,
                 per_step_bn: bool = True, first_order_epochs: int = 50, execution: str = "auto",
                 task_chunk: int | None = None) -> None:
        check_positive("inner_lr", inner_lr)
        check_positive("inner_steps", inner_steps, integer=True)
        check_positive("msl_epochs", msl_epochs, integer=True)
        check_positive("iterations_per_epoch", iterations_per_epoch, integer=True)
        check_positive("first_order_epochs", first_order_epochs, integer=True, allow_zero=True)
        norms = [(prefix, m) for prefix, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)] if per_step_bn else []
        per_step = [f"{p}.{n}" if p else n for p, m in norms for n, q in m.named_parameters(recurse=False)
                    if q.requires_grad]
        inner = [k for k, p in model.named_parameters() if p.requires_grad and k not in per_step]
        if not inner and any(p.requires_grad for p in model.parameters()):
            raise MamlabError("with per_step_bn the model needs trainable parameters besides BatchNorm's "
                              "to adapt in the inner loop; pass per_step_bn false")
        super().__init__(model, loss_fn, inner_steps=inner_steps, first_order=first_order_epochs > 0,
                         inner_params=inner if per_step else None, execution=execution,
                         task_chunk=task_chunk)
        self.inner_lr = float(inner_lr)
        self.lslr, self.msl, self.per_step_bn = bool(lslr), bool(msl), bool(per_step_bn)
        self.msl_epochs, self.iterations_per_epoch = int(msl_epochs), int(iterations_per_epoch)
        self.first_order_epochs = int(first_order_epochs)
        self.epoch = 0
        named = dict(model.named_parameters())
        adapted = self.split_parameters()[0]
        self.lrs = nn.ParameterDict({_key(k): nn.Parameter(torch.full((self.inner_steps,), self.inner_lr,
                                                                      dtype=p.dtype, device=p.device))
                                     for k, p in adapted.items()} if self.lslr else {})
        self.step_bn = nn.ParameterDict({_key(k): nn.Parameter(named[k].detach().unsqueeze(0)
                                                                .repeat(self.inner_steps, 1))
                                         for k in per_step})
        self.step_bn_stats = nn.Module()
        self._stat_names: list[str] = []
        for prefix, m in norms:
            if m.track_running_stats:
                for n, b in m.named_buffers(recurse=False):
                    name = f"{prefix}.{n}" if prefix else n
                    self.step_bn_stats.register_buffer(_key(name), b.detach().unsqueeze(0).repeat(
                        self.inner_steps, *([1] * b.dim())).clone())
                    self._stat_names.append(name)
        self._per_step = per_step
        self._needs_steps = self.lslr or bool(per_step) or bool(self._stat_names)

    # ------------------------------------------------------------------ the schedules
    def start_iteration(self, iteration: int, iterations: int) -> None:
        """Set the epoch of ``iteration`` (1-based), hence the MSL weights and the derivative order."""
        if self.msl and self.inner_steps > 1 and self.msl_epochs * self.iterations_per_epoch > iterations:
            raise MamlabError(
                f"the multi-step loss lasts msl_epochs {self.msl_epochs} x iterations_per_epoch "
                f"{self.iterations_per_epoch} = {self.msl_epochs * self.iterations_per_epoch} iterations, "
                f"more than the run's {iterations}; lower msl_epochs or iterations_per_epoch, or set msl "
                "false"
            )
        self.epoch = (int(iteration) - 1) // self.iterations_per_epoch
        self.first_order = self.epoch < self.first_order_epochs

    def step_weights(self, steps: int) -> list[float]:
        """The weights of the query losses after steps 1..``steps`` in the meta-objective, this epoch."""
        if self.msl:
            return msl_weights(steps, self.epoch, self.msl_epochs)
        return [0.0] * (steps - 1) + [1.0]

    # ------------------------------------------------------------------ per-step state
    def step_state(self, step: int, detach: bool = False) -> Params:
        """BatchNorm's parameters and running statistics of inner step ``step`` (0-based; beyond the
        trained steps, the last step's), by the model's names: substituted into every forward pass."""
        j = min(step, self.inner_steps - 1)
        out = {k: self.step_bn[_key(k)][j] for k in self._per_step}
        if detach:
            out = {k: p.detach() for k, p in out.items()}
        out.update({k: getattr(self.step_bn_stats, _key(k))[j] for k in self._stat_names})
        return out

    def inner_update(self, params: Params, grads: Params, step: int, lr: float | None = None) -> Params:
        """θ_l' = θ_l − α_{l,k} ∇_l L_support (α_{l,k} = ``inner_lr`` without LSLR, ``lr`` if given)."""
        if lr is not None or not self.lslr:
            return sgd_step(params, grads, self.inner_lr if lr is None else lr)
        j = min(step, self.inner_steps - 1)
        return {k: p - self.lrs[_key(k)][j] * grads[k] for k, p in params.items()}

    def inner_loop(self, params: Params, shared: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   path: str, create_graph: bool, lr: float | None = None, first_step: int = 0) -> Params:
        """``steps`` inner updates; step k's support pass uses step k's BatchNorm."""
        for k in range(first_step, first_step + steps):
            with torch.enable_grad():
                losses = self.engine.losses(params, {**shared, **self.step_state(k)}, x, y, path)
                grads = grad_of(losses.sum(), params, create_graph)
            params = self.inner_update(params, grads, k, lr)
        return params

    # ------------------------------------------------------------------ the objective
    def task_losses(self, batch: TaskBatch, path: str, steps: int | None = None,
                    theta: tuple[Params, Params] | None = None) -> torch.Tensor:
        """Each task's Σ_k w_k L_query(θ_i^{(k)}) ``[T]`` (w: ``step_weights``), differentiable."""
        adapted, shared = self.split_parameters() if theta is None else theta
        params = self.engine.per_task(adapted, batch.num_tasks)
        steps = self.inner_steps if steps is None else steps
        total: torch.Tensor | float = 0.0
        for k, w in enumerate(self.step_weights(steps)):
            params = self.inner_loop(params, shared, batch.support_x, batch.support_y, 1, path,
                                     create_graph=not self.first_order, first_step=k)
            if w:
                query = self.engine.losses(params, {**shared, **self.step_state(k)}, batch.query_x,
                                           batch.query_y, path)
                total = total + w * query
        return total  # type: ignore[return-value]

    # ------------------------------------------------------------------ the contract
    def steps_done(self, start: Mapping[str, torch.Tensor]) -> int:
        """The steps recorded in an earlier ``adapt`` result: they choose the per-step rates and BatchNorm."""
        return self._steps_of(start, "start")

    def adapted_state(self, params: Params, steps: int) -> AdaptedParams:
        """``adapt`` returns ``AdaptedParams``: θ'_i with ``.steps``, the inner steps taken in all."""
        return AdaptedParams(params, steps)

    def predict(self, adapted: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f_{θ'_i}(x_i) for every task, with the BatchNorm of the last inner step ``adapted`` took."""
        params = dict(adapted)
        num = next(iter(params.values())).shape[0]
        if x.shape[0] != num:
            raise MamlabError(f"x has {x.shape[0]} tasks but params have {num}; they must match")
        taken = self._steps_of(adapted, "adapted")
        _, shared = self.split_parameters(detach=True)
        shared = {**{k: p for k, p in shared.items() if k not in params},
                  **self.step_state(max(taken - 1, 0), detach=True)}
        path = self.engine.path(x.device)
        with torch.no_grad():
            return torch.cat([self.engine.forward({k: p[s] for k, p in params.items()}, shared, x[s], path)
                              for s in self.engine.chunks(num, path)])

    def options(self) -> dict[str, object]:
        """The registry's options: inner_lr, inner_steps and each trick's switch and schedule."""
        return {"inner_lr": self.inner_lr, "inner_steps": self.inner_steps, "lslr": self.lslr,
                "msl": self.msl, "msl_epochs": self.msl_epochs,
                "iterations_per_epoch": self.iterations_per_epoch, "per_step_bn": self.per_step_bn,
                "first_order_epochs": self.first_order_epochs}

    # ------------------------------------------------------------------ helpers
    def _steps_of(self, state: Mapping[str, torch.Tensor], what: str) -> int:
        if isinstance(state, AdaptedParams):
            return state.steps
        if self._needs_steps:
            raise MamlabError(f"{what} must be what MAMLPlusPlus.adapt returned (it records the inner "
                              "steps taken, which choose the per-step learning rates and BatchNorm); "
                              "got a plain dict")
        return 0
