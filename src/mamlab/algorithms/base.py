"""The contract every meta-learning algorithm keeps, and the gradient-based inner loop most share.

A ``MetaAlgorithm`` is a ``torch.nn.Module`` that owns the model and any learned meta-state
(per-parameter step sizes, per-step normalization, ...), so ``parameters()``, ``state_dict()``,
``.to(device)`` and every torch optimizer see all of it. It promises three things:

* ``meta_loss(batch)``: a scalar whose ``.backward()`` fills ``.grad`` of ``self.parameters()``
  with the algorithm's meta-gradient (or, for algorithms without one, its update direction);
* ``adapt(support_x, support_y, steps=None)``: each task's adapted state θ'_i, task-batched;
* ``predict(adapted, x)``: f_{θ'_i}(x_i) for every task.

``InnerLoopAlgorithm`` implements the family that adapts by gradient steps on the support loss,

    θ_i^{(k+1)} = update(θ_i^{(k)}, ∇ L_support(θ_i^{(k)}), k)        θ_i^{(0)} = θ
    meta-objective = (1/T) Σ_i L_query(θ_i^{(K)}),

so an algorithm in this family only writes its ``inner_update`` (and, if it has one, a different
objective). How the tasks are computed (batched, conv, vmap, loop, chunks) is the ``TaskEngine``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from torch import nn

from mamlab.core.batch import TaskBatch
from mamlab.core.execution import (
    TaskEngine,
    check_second_order,
    grad_of,
    recomputed_step,
    tracks_running_stats,
)
from mamlab.core.losses import LossFn
from mamlab.core.params import Params, expand_to_tasks, parameters_of
from mamlab.errors import MamlabError, check_positive

__all__ = ["MetaAlgorithm", "InnerLoopAlgorithm"]


class MetaAlgorithm(nn.Module):
    """Base class of every meta-learning algorithm: owns the model and its learned meta-state.

    Args:
        model: the network f_θ (any ``nn.Module``); its trainable parameters are θ.
        loss_fn: ``loss_fn(prediction, target)`` → one task's mean loss.
        execution: ``"auto"``, ``"batched"``, ``"vmap"``, ``"loop"`` or ``"conv"``
            (``mamlab.core.execution``).
        task_chunk: on the batched, vmap and conv paths, how many tasks run together (bounds memory).

    Subclasses set ``name`` (the registry's name) and ``inner_steps`` (the adaptation steps
    ``adapt`` takes by default, also at evaluation).
    """

    name: str = ""
    inner_steps: int = 0

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, execution: str = "auto",
                 task_chunk: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise MamlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise MamlabError(f"loss_fn must be callable, got {loss_fn!r}")
        if not any(p.requires_grad for p in model.parameters()):
            raise MamlabError("model has no trainable parameters; a meta-learner needs at least one")
        self.model = model
        self.loss_fn = loss_fn
        self.engine = TaskEngine(model, loss_fn, execution, task_chunk)

    # ------------------------------------------------------------------ the contract
    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        """The meta-training objective of ``batch``; ``.backward()`` fills ``.grad``."""
        raise NotImplementedError

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None,
              start: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Each task's adapted state (a dict of ``[T, ...]`` tensors), detached from θ."""
        raise NotImplementedError

    def predict(self, adapted: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f_{θ'_i}(x_i) for every task i: ``adapted`` from ``adapt``, ``x`` shaped ``[T, M, ...]``."""
        raise NotImplementedError

    def check_adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None,
                    lr: float | None) -> int:
        """The number of steps ``adapt`` takes, after one-line checks of its arguments."""
        steps = self.inner_steps if steps is None else steps
        check_positive("steps", steps, integer=True, allow_zero=True)
        if lr is not None:
            check_positive("lr", lr)
        check_xy("support", support_x, support_y)
        check_dtype("support_x", support_x, self.model)
        return steps

    def start_iteration(self, iteration: int, iterations: int) -> None:
        """Called by the training loop before meta-iteration ``iteration`` (1-based) of ``iterations``.

        For algorithms whose rule changes over training (MAML++'s multi-step loss weights and
        derivative-order annealing); the default does nothing. It must depend only on its
        arguments, so that a resumed run is the same as an uninterrupted one.
        """
        return None

    def rule_key(self) -> Hashable:
        """What ``meta_loss`` computes besides tensor values: equal keys mean the same kernels.

        A CUDA graph of the meta-step (``mamlab.core.graphs``) bakes in every Python number it read,
        so it is captured anew when this changes. The default holds every plain Python value of the
        algorithm (options such as ``inner_lr`` and ``first_order``, MAML++'s epoch), the execution
        path and chunk, and each module's training mode; an algorithm that keeps such values
        elsewhere extends it.
        """
        plain = (bool, int, float, str, type(None))
        own = tuple(sorted((k, v) for k, v in vars(self).items() if isinstance(v, plain)))
        return own, self.execution, self.task_chunk, tuple(m.training for m in self.modules())

    def forward(self, batch: TaskBatch) -> torch.Tensor:
        """``meta_loss(batch)``, so the algorithm can be called like any module."""
        return self.meta_loss(batch)

    # ------------------------------------------------------------------ execution
    @property
    def execution(self) -> str:
        """The execution path asked for (``"auto"`` resolves per device, see ``resolved_execution``)."""
        return self.engine.execution

    @execution.setter
    def execution(self, value: str) -> None:
        self.engine = TaskEngine(self.model, self.loss_fn, value, self.engine.task_chunk)

    @property
    def task_chunk(self) -> int | None:
        """How many tasks run together on the batched, vmap and conv paths (``None``: the path's default)."""
        return self.engine.task_chunk

    def resolved_execution(self, device: torch.device | str | None = None) -> str:
        """The execution path used on ``device`` (default: the model's)."""
        return self.engine.path(device)

    def tune(self, batch: TaskBatch, repeats: int = 3) -> dict[str, float]:
        """Time ``meta_loss`` on each path for this model and batch, keep the fastest.

        ``meta_loss`` only deposits gradients on ``.backward()``, so timing it leaves ``.grad``
        untouched. Returns the seconds per meta-loss of each path; sets ``self.execution``.
        """
        return self.engine.tune(lambda: self.meta_loss(batch), repeats)

    def meta_parameters(self) -> list[nn.Parameter]:
        """Everything the outer loop trains: θ and any learned meta-state, in ``parameters()`` order."""
        return [p for p in self.parameters() if p.requires_grad]

    def options(self) -> dict[str, object]:
        """The algorithm's options as the registry names them (for ``repr`` and run records)."""
        return {}

    def extra_repr(self) -> str:
        """The options and execution path, shown by ``repr``."""
        parts = [f"{k}={v!r}" for k, v in self.options().items()]
        return ", ".join([*parts, f"execution={self.execution!r}"])


class InnerLoopAlgorithm(MetaAlgorithm):
    """Algorithms that adapt θ by ``inner_steps`` gradient steps on each task's support loss.

    Args:
        model, loss_fn, execution, task_chunk: as for ``MetaAlgorithm``.
        inner_steps: how many inner steps adapt θ to a task's support set (>= 1).
        first_order: treat the inner gradients as constants in the meta-gradient (drop the
            second-order terms); ``.grad`` is still filled.
        inner_params: names of the parameters adapted in the inner loop (default: all trainable
            ones); the others are shared by every task and trained by the outer loop only.
        recompute: when differentiating through the inner loop (second order), keep only each
            step's θ_k and recompute the step's graph in backward (``RecomputedStep``): the graph
            memory of one step plus K parameter copies instead of K steps' graphs, for about one
            more forward-and-gradient per step. Same meta-gradient; no effect on first order or
            ``adapt``. Dropout recomputes the same masks (the random state is restored); a model
            whose BatchNorm updates running statistics is refused (they would be updated twice).

    Subclasses write ``inner_update(params, grads, step, lr)``: one step of the inner loop.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, inner_steps: int = 1,
                 first_order: bool = False, inner_params: Sequence[str] | None = None,
                 execution: str = "auto", task_chunk: int | None = None, recompute: bool = False) -> None:
        super().__init__(model, loss_fn, execution=execution, task_chunk=task_chunk)
        check_positive("inner_steps", inner_steps, integer=True)
        trainable = [k for k, p in model.named_parameters() if p.requires_grad]
        if inner_params is not None:
            inner_params = list(inner_params)
            unknown = [k for k in inner_params if k not in trainable]
            if unknown or not inner_params:
                raise MamlabError(
                    f"inner_params {unknown or inner_params!r} are not trainable parameters of the "
                    f"model; allowed: {', '.join(trainable)}"
                )
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.inner_params = inner_params
        self.recompute = bool(recompute)
        self.second_order_checked = False  # the first second-order inner gradient is checked, once

    # ------------------------------------------------------------------ the update rule
    def inner_update(self, params: Params, grads: Params, step: int, lr: float | None = None) -> Params:
        """θ^{(k+1)} from θ^{(k)} and ∇ L_support(θ^{(k)}) at inner step ``step`` (0-based)."""
        raise NotImplementedError

    def inner_loop(self, params: Params, shared: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   path: str, create_graph: bool, lr: float | None = None, first_step: int = 0) -> Params:
        """``steps`` inner updates of the task-batched ``params`` on the support sets ``(x, y)``."""
        if create_graph and self.recompute:
            return self.recomputed_inner_loop(params, shared, x, y, steps, path, lr, first_step)
        for k in range(steps):
            with torch.enable_grad():
                losses = self.engine.losses(params, shared, x, y, path)
                grads = grad_of(losses.sum(), params, create_graph)
            if create_graph and not self.second_order_checked:
                check_second_order(grads, self.model)
                self.second_order_checked = True
            params = self.inner_update(params, grads, first_step + k, lr)
        return params

    def recomputed_inner_loop(self, params: Params, shared: Params, x: torch.Tensor, y: torch.Tensor,
                              steps: int, path: str, lr: float | None = None, first_step: int = 0) -> Params:
        """``inner_loop`` with ``create_graph``, its graph recomputed in backward (``recompute``).

        Two levels, as in sqrt(K) checkpointing: the K steps run in segments of ⌈√K⌉ steps, and only
        each segment's starting θ is kept. Backward recomputes a segment step by step, keeping each
        step's starting θ, and then each step's graph, one at a time: ~2√K parameter copies and one
        step's graph at the peak, about two more forward-and-gradients per step than storing it.
        """
        if tracks_running_stats(self.model):
            raise MamlabError("recompute=True cannot run a model whose BatchNorm updates running statistics "
                              "in training mode (the recomputation would update them twice); build it with "
                              "track_running_stats=False or set recompute=False")
        model_params = {id(p) for p in self.model.parameters()}
        extras = [p for p in self.meta_parameters() if id(p) not in model_params]

        def step(k: int) -> Callable[[Params, Params, bool], Params]:
            def run(p: Params, s: Params, create_graph: bool) -> Params:
                grads = grad_of(self.engine.losses(p, s, x, y, path).sum(), p, create_graph)
                if create_graph and not self.second_order_checked:  # in backward: the first recomputed step
                    check_second_order(grads, self.model)
                    self.second_order_checked = True
                return self.inner_update(p, grads, first_step + k, lr)
            return run

        def segment(ks: range) -> Callable[[Params, Params, bool], Params]:
            def run(p: Params, s: Params, create_graph: bool) -> Params:
                for k in ks:  # in backward (create_graph): one recomputed step at a time
                    p = recomputed_step(step(k), p, s, extras) if create_graph else step(k)(p, s, False)
                return p
            return run

        size = math.isqrt(steps - 1) + 1 if steps > 1 else 1  # ⌈√K⌉
        for start in range(0, steps, size):
            ks = range(start, min(start + size, steps))
            params = recomputed_step(step(ks[0]) if len(ks) == 1 else segment(ks), params, shared, extras)
        return params

    def task_losses(self, batch: TaskBatch, path: str, steps: int | None = None,
                    theta: tuple[Params, Params] | None = None) -> torch.Tensor:
        """L_query(θ'_i) of every task of ``batch`` ``[T]``, differentiable w.r.t. the meta-parameters.

        ``theta``: ``split_parameters()``, when the caller already has it.
        """
        adapted, shared = self.split_parameters() if theta is None else theta
        params = self.engine.per_task(adapted, batch.num_tasks)
        params = self.inner_loop(params, shared, batch.support_x, batch.support_y,
                                 self.inner_steps if steps is None else steps, path,
                                 create_graph=not self.first_order)
        return self.engine.losses(params, shared, batch.query_x, batch.query_y, path)

    # ------------------------------------------------------------------ the contract
    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        """(1/T) Σ_i L_query(θ'_i); ``.backward()`` fills the meta-parameters' ``.grad``.

        The meta-gradient is taken chunk by chunk (one task at a time on the loop path) as the
        loss is computed, so peak memory is that of one chunk's graph; ``.backward()`` then only
        deposits it. To differentiate the loss further, use ``query_losses(batch).mean()``.
        """
        check_batch(batch, self.model)
        if not torch.is_grad_enabled():
            with torch.enable_grad():
                return self.query_losses(batch).mean().detach()
        theta = self.split_parameters()
        return self.engine.meta_gradient(lambda chunk, path: self.task_losses(chunk, path, theta=theta),
                                         batch, self.meta_parameters())

    def query_losses(self, batch: TaskBatch, steps: int | None = None) -> torch.Tensor:
        """Each task's query loss after adaptation, ``[T]``, differentiable w.r.t. θ.

        Holds every task's graph until backward; ``meta_loss`` is the memory-lean way to train.
        """
        check_batch(batch, self.model)
        path = self.engine.path(batch.support_x.device)
        theta = self.split_parameters()
        return torch.cat([self.task_losses(batch.slice(s), path, steps, theta)
                          for s in self.engine.chunks(batch.num_tasks, path)])

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None,
              start: Mapping[str, torch.Tensor] | None = None, lr: float | None = None) -> Params:
        """Adapt θ to each task's support set; returns θ'_i as a dict of ``[T, ...]`` tensors.

        Args:
            support_x: ``[T, K, ...]`` support inputs.
            support_y: ``[T, K, ...]`` support targets.
            steps: inner steps (default ``inner_steps``; 0 returns θ for every task).
            start: batched parameters to continue from (an earlier ``adapt`` result); default θ.
            lr: an inner step size to use instead of the algorithm's own, where it has one.

        Returns:
            The adapted parameters (the ``inner_params``, all by default), detached from θ.
        """
        steps = self.check_adapt(support_x, support_y, steps, lr)
        adapted, shared = self.split_parameters(detach=True)
        num_tasks = support_x.shape[0]
        if start is not None:
            if set(start) != set(adapted) or any(p.shape[0] != num_tasks for p in start.values()):
                raise MamlabError(
                    f"start must hold [{num_tasks}, ...] tensors for exactly {', '.join(adapted)}"
                )
            done = self.steps_done(start)
            begin = {k: p.detach() for k, p in start.items()}
        else:
            done = 0
            begin = expand_to_tasks(adapted, num_tasks)
        if steps == 0:
            return self.adapted_state({k: p.clone() for k, p in begin.items()}, done)
        path = self.engine.path(support_x.device)
        parts = []
        for s in self.engine.chunks(num_tasks, path):
            one = s.stop - s.start == 1  # a chunk of one task runs without a task dimension
            params = {k: (p[s.start] if one else p[s]).clone().requires_grad_(True) for k, p in begin.items()}
            params = self.inner_loop(params, shared, support_x[s], support_y[s], steps, path,
                                     create_graph=False, lr=lr, first_step=done)
            parts.append(self.engine.with_task_dim({k: p.detach() for k, p in params.items()}))
        return self.adapted_state({k: torch.cat([part[k] for part in parts]) for k in parts[0]}, done + steps)

    def steps_done(self, start: Mapping[str, torch.Tensor]) -> int:
        """The inner steps an earlier ``adapt`` result took; 0 where the update ignores the step index."""
        return 0

    def adapted_state(self, params: Params, steps: int) -> Params:
        """What ``adapt`` returns for ``params`` after ``steps`` inner steps in all (the dict itself)."""
        return params

    def predict(self, adapted: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f_{θ'_i}(x_i) for every task i: ``adapted`` from ``adapt``, ``x`` shaped ``[T, M, ...]``."""
        params = dict(adapted)
        num = next(iter(params.values())).shape[0]
        if x.shape[0] != num:
            raise MamlabError(f"x has {x.shape[0]} tasks but params have {num}; they must match")
        _, shared = self.split_parameters(detach=True)
        shared = {k: p for k, p in shared.items() if k not in params}
        path = self.engine.path(x.device)
        with torch.no_grad():
            return torch.cat([self.engine.forward({k: p[s] for k, p in params.items()}, shared, x[s], path)
                              for s in self.engine.chunks(num, path)])

    # ------------------------------------------------------------------ helpers
    def split_parameters(self, detach: bool = False) -> tuple[Params, Params]:
        """θ split into the parameters adapted per task and those shared by all tasks."""
        theta = parameters_of(self.model)
        names = self.inner_params if self.inner_params is not None else list(theta)
        adapted = {k: theta[k] for k in names}
        shared = {k: p for k, p in theta.items() if k not in adapted}
        if detach:
            adapted = {k: p.detach() for k, p in adapted.items()}
            shared = {k: p.detach() for k, p in shared.items()}
        return adapted, shared


def check_xy(which: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One-line error unless ``x`` and ``y`` share their leading ``[tasks, examples]`` dimensions."""
    if x.dim() < 2 or y.dim() < 2 or x.shape[:2] != y.shape[:2]:
        raise MamlabError(
            f"{which}_x {tuple(x.shape)} and {which}_y {tuple(y.shape)} must share their leading "
            "[tasks, examples] dimensions"
        )


def check_batch(batch: TaskBatch, model: nn.Module | None = None) -> None:
    """One-line error unless ``batch`` is a TaskBatch whose inputs match the model's dtype."""
    if not isinstance(batch, TaskBatch):
        raise MamlabError(f"expected a mamlab.TaskBatch, got {type(batch).__name__}")
    if model is not None:
        check_dtype("support_x", batch.support_x, model)
        check_dtype("query_x", batch.query_x, model)


def check_dtype(name: str, x: torch.Tensor, model: nn.Module) -> None:
    """One-line error if floating-point inputs ``x`` differ in dtype from the model's parameters."""
    dtype = next(model.parameters()).dtype
    if x.is_floating_point() and x.dtype != dtype:
        got, want = str(x.dtype).removeprefix("torch."), str(dtype).removeprefix("torch.")
        raise MamlabError(f"{name} has dtype {got} but the model's parameters are {want}; "
                          "convert with batch.to(dtype=...)")
