"""MAML (Finn et al. 2017): the inner SGD loop and the meta-loss, second or first order.

The update rule, for each task T_i of a meta-batch::

    θ'_i = θ − α ∇θ L_{T_i}(f_θ; D_i^train)          (``inner_steps`` times)
    meta-loss = (1/T) Σ_i L_{T_i}(f_{θ'_i}; D_i^test)

``meta_loss(batch).backward()`` leaves ∇θ of the meta-loss in ``model.parameters()``' ``.grad``.
Second order differentiates through the inner steps; first order treats ∇θ L as a constant.

Three execution paths compute the same numbers:

* ``"batched"``: for MLPs (a Sequential of Linear layers and activations), every task's
  weights ``[T, out, in]`` go through one ``baddbmm`` per layer (``mamlab.batched``).
* ``"vmap"``: any model; the tasks of a meta-batch run together, ``torch.func.vmap`` over a
  functional forward.
  On both batched paths the inner gradient of all tasks is one autograd call: each task's loss
  depends only on its own slice of the task-batched parameters, so ∇ of the sum is the per-task ∇.
* ``"loop"``: a plain per-task loop; each task's graph is freed as soon as its meta-gradient is
  taken, so memory stays at one task's worth. Fastest for convolutional nets on CPU, where
  batched convolutions under vmap are slower and far hungrier for memory.

``execution="auto"`` picks by the rule that ``benchmarks/speed.py`` measured: ``batched`` for
MLPs, ``loop`` for models with convolutions or normalization layers on CPU, ``vmap`` otherwise
(see ``default_execution``). ``MAML.tune(batch)`` times both on your model and batch and keeps the
faster.

Reference: C. Finn, P. Abbeel, S. Levine. Model-Agnostic Meta-Learning for Fast Adaptation of
Deep Networks. ICML 2017.

Example:
    >>> model = mamlab.models.MLP(1, 1, hidden=(40, 40))
    >>> maml = MAML(model, torch.nn.functional.mse_loss, inner_lr=0.01)
    >>> batch = mamlab.tasks.Sinusoid().sample(25, 10, 10, torch.Generator().manual_seed(0))
    >>> maml.meta_loss(batch).backward()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import vmap

from mamlab.batched import batched_forward, plan_for
from mamlab.errors import MamlabError, check_choice, check_positive
from mamlab.functional import (
    Params,
    buffers_of,
    expand_to_tasks,
    forward,
    parameters_of,
    sgd_step,
    stack_params,
)
from mamlab.losses import per_task_loss
from mamlab.tasks.base import TaskBatch

__all__ = ["MAML", "default_execution", "EXECUTIONS"]

EXECUTIONS = ("auto", "batched", "vmap", "loop")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_BATCHED_SLOW_OR_UNSAFE = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)


def default_execution(model: nn.Module, device: torch.device | str = "cpu") -> str:
    """The path ``execution="auto"`` takes: batched MLP, else loop for conv/norm on CPU, else vmap.

    Measured on 2 CPU cores (``benchmarks/speed.py``): vmap runs the sinusoid MLP an order of
    magnitude faster than a loop, but runs Conv4+BatchNorm slower with ~9x the memory. Models
    whose BatchNorm tracks running statistics also go to the loop, since vmap cannot update a
    shared running mean from batched tasks.
    """
    device = torch.device(device)
    if plan_for(model) is not None:
        return "batched"
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            return "loop"
        if device.type == "cpu" and isinstance(m, _BATCHED_SLOW_OR_UNSAFE):
            return "loop"
    return "vmap"


class _PrecomputedGrad(torch.autograd.Function):
    """A scalar whose backward hands out meta-gradients computed task by task in advance."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: tuple[torch.Tensor, ...], *params: torch.Tensor):  # noqa: D102
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        return (None, None, *[g * grad_output for g in ctx.grads])


class MAML:
    """Model-Agnostic Meta-Learning around any ``torch.nn.Module``.

    Args:
        model: the network f_θ; its trainable parameters are θ. No special base class needed.
        loss_fn: ``loss_fn(prediction, target)`` → scalar mean loss over one task's examples,
            e.g. ``torch.nn.functional.mse_loss`` or ``cross_entropy``.
        inner_lr: α, the inner SGD step size (> 0).
        inner_steps: how many inner steps adapt θ to a task's support set (>= 1).
        first_order: drop the second-order terms (FOMAML); ``.grad`` is still filled.
        execution: ``"auto"``, ``"batched"``, ``"vmap"`` or ``"loop"`` (same numbers, different
            speed and memory).
        inner_params: names of the parameters adapted in the inner loop (default: all). Only
            the head, for example, gives ANIL (Raghu et al. 2020). The outer loop updates all.
        task_chunk: with ``"batched"``/``"vmap"``, how many tasks run together (default: the whole batch);
            smaller chunks trade speed for memory.

    BatchNorm: the model runs in whatever mode it is in. Layers built with
    ``track_running_stats=False`` (as ``mamlab.models.Conv4`` and MAML's reference code do)
    normalize every forward pass with the current task's batch statistics, at meta-train and
    meta-test time alike, so ``model.eval()`` does not change them.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float, inner_steps: int = 1,
                 first_order: bool = False, execution: str = "auto",
                 inner_params: Sequence[str] | None = None, task_chunk: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise MamlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise MamlabError(f"loss_fn must be callable, got {loss_fn!r}")
        check_positive("inner_lr", inner_lr)
        check_positive("inner_steps", inner_steps, integer=True)
        check_choice("execution", execution, EXECUTIONS)
        if task_chunk is not None:
            check_positive("task_chunk", task_chunk, integer=True)
        trainable = [k for k, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise MamlabError("model has no trainable parameters; MAML needs at least one")
        if inner_params is not None:
            inner_params = list(inner_params)
            unknown = [k for k in inner_params if k not in trainable]
            if unknown or not inner_params:
                raise MamlabError(
                    f"inner_params {unknown or inner_params!r} are not trainable parameters of the "
                    f"model; allowed: {', '.join(trainable)}"
                )
        self._plan = plan_for(model)
        if execution == "batched" and self._plan is None:
            raise MamlabError(
                f"execution 'batched' needs a Sequential of Linear layers and elementwise activations, "
                f"got {type(model).__name__}; allowed for this model: auto, vmap, loop"
            )
        self.model = model
        self.loss_fn = loss_fn
        self._per_task_loss = per_task_loss(loss_fn)
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.execution = execution
        self.inner_params = inner_params
        self.task_chunk = task_chunk

    # ------------------------------------------------------------------ helpers
    def _split(self, detach: bool) -> tuple[Params, Params, Params]:
        """θ split into (adapted, shared) parameter dicts, and the buffers."""
        theta = parameters_of(self.model)
        names = self.inner_params if self.inner_params is not None else list(theta)
        adapted = {k: theta[k] for k in names}
        shared = {k: p for k, p in theta.items() if k not in adapted}
        if detach:
            adapted = {k: p.detach() for k, p in adapted.items()}
            shared = {k: p.detach() for k, p in shared.items()}
        return adapted, shared, buffers_of(self.model)

    def resolved_execution(self, device: torch.device | str | None = None) -> str:
        """The execution path used: ``self.execution`` unless it is ``"auto"``."""
        if self.execution != "auto":
            return self.execution
        if device is None:
            device = next(self.model.parameters()).device
        return default_execution(self.model, device)

    def _task_loss(self, adapted: Params, shared: Params, buffers: Params,
                   x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(forward(self.model, {**shared, **adapted}, x, buffers), y)

    def _forward_tasks(self, params: Params, shared: Params, buffers: Params, xs: torch.Tensor,
                       path: str) -> torch.Tensor:
        """f_{θ_i}(x_i) for all tasks at once; ``params`` carry a leading task dimension."""
        if path == "batched":
            return batched_forward(self._plan, {**shared, **params}, xs)  # type: ignore[arg-type]
        return vmap(lambda p, x: forward(self.model, {**shared, **p}, x, buffers))(params, xs)

    def _losses_tasks(self, params: Params, shared: Params, buffers: Params, xs: torch.Tensor,
                      ys: torch.Tensor, path: str) -> torch.Tensor:
        """Each task's loss ``[T]``: ``loss_fn`` applied task by task (``mamlab.losses``)."""
        return self._per_task_loss(self._forward_tasks(params, shared, buffers, xs, path), ys)

    # ------------------------------------------------------------------ inner loop
    def _adapt_together(self, params: Params, shared: Params, buffers: Params, xs: torch.Tensor,
                        ys: torch.Tensor, steps: int, lr: float, create_graph: bool,
                        track_theta: bool, path: str) -> Params:
        """All tasks at once: θ'_i = θ_i − α ∇ Σ_j L_j(θ_j); ``params`` carry a task dimension."""
        if not track_theta:
            params = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        for _ in range(steps):
            with torch.enable_grad():
                losses = self._losses_tasks(params, shared, buffers, xs, ys, path)
                grads = _grad(losses.sum(), params, create_graph)
            params = sgd_step(params, grads, lr)
        return params

    def _adapt_loop(self, adapted: Params, shared: Params, buffers: Params, x: torch.Tensor,
                    y: torch.Tensor, steps: int, lr: float, create_graph: bool,
                    track_theta: bool) -> Params:
        """One task: θ' = θ − α ∇θ L(θ), ``steps`` times."""
        params = adapted if track_theta else {k: p.clone().requires_grad_(True)
                                              for k, p in adapted.items()}
        for _ in range(steps):
            with torch.enable_grad():
                loss = self._task_loss(params, shared, buffers, x, y)
                grads = _grad(loss, params, create_graph)
            params = sgd_step(params, grads, lr)
        return params

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None,
              lr: float | None = None, start: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Adapt θ to each task's support set; returns θ'_i as a dict of ``[T, ...]`` tensors.

        Args:
            support_x: ``[T, K, ...]`` support inputs.
            support_y: ``[T, K, ...]`` support targets.
            steps: inner steps (default ``inner_steps``; 0 returns θ for every task).
            lr: inner step size (default ``inner_lr``).
            start: batched parameters to continue from (an earlier ``adapt`` result); default θ.

        Returns:
            The adapted parameters (the ``inner_params``, all by default), detached from θ.
        """
        steps = self.inner_steps if steps is None else steps
        lr = self.inner_lr if lr is None else lr
        check_positive("steps", steps, integer=True, allow_zero=True)
        check_positive("lr", lr)
        _check_xy("support", support_x, support_y)
        _check_dtype("support_x", support_x, self.model)
        adapted, shared, buffers = self._split(detach=True)
        num_tasks = support_x.shape[0]
        if start is not None:
            if set(start) != set(adapted) or any(p.shape[0] != num_tasks for p in start.values()):
                raise MamlabError(
                    f"start must hold [{num_tasks}, ...] tensors for exactly {', '.join(adapted)}"
                )
            begin = {k: p.detach() for k, p in start.items()}
        else:
            begin = {k: p.unsqueeze(0).expand(num_tasks, *p.shape) for k, p in adapted.items()}
        if steps == 0:
            return {k: p.clone() for k, p in begin.items()}
        path = self.resolved_execution(support_x.device)
        if path != "loop":
            params = self._adapt_together(begin, shared, buffers, support_x, support_y, steps, lr,
                                          create_graph=False, track_theta=False, path=path)
        else:
            params = stack_params([
                self._adapt_loop({k: p[i] for k, p in begin.items()}, shared, buffers, support_x[i],
                                 support_y[i], steps, lr, create_graph=False, track_theta=False)
                for i in range(num_tasks)
            ])
        return {k: p.detach() for k, p in params.items()}

    def predict(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f_{θ'_i}(x_i) for every task i: ``params`` from ``adapt``, ``x`` shaped ``[T, M, ...]``."""
        adapted = dict(params)
        _, shared, buffers = self._split(detach=True)
        shared = {k: p for k, p in shared.items() if k not in adapted}
        if x.shape[0] != next(iter(adapted.values())).shape[0]:
            raise MamlabError(
                f"x has {x.shape[0]} tasks but params have {next(iter(adapted.values())).shape[0]}; "
                "they must match"
            )
        path = self.resolved_execution(x.device)
        with torch.no_grad():
            if path != "loop":
                return self._forward_tasks(adapted, shared, buffers, x, path)
            return torch.stack([
                forward(self.model, {**shared, **{k: p[i] for k, p in adapted.items()}}, x[i], buffers)
                for i in range(x.shape[0])
            ])

    # ------------------------------------------------------------------ meta-loss
    def query_losses(self, batch: TaskBatch, steps: int | None = None) -> torch.Tensor:
        """Each task's query loss after adaptation, ``[T]``, differentiable w.r.t. θ.

        Holds every task's graph until backward; ``meta_loss`` is the memory-lean way to train.
        """
        _check_batch(batch, self.model)
        steps = self.inner_steps if steps is None else steps
        adapted, shared, buffers = self._split(detach=False)
        create_graph = not self.first_order
        path = self.resolved_execution(batch.support_x.device)
        if path != "loop":
            return self._chunk_losses(adapted, shared, buffers, batch, steps, create_graph, path)
        return torch.stack([
            self._one_task_loss(adapted, shared, buffers, batch, i, steps, create_graph)
            for i in range(batch.num_tasks)
        ])

    def _chunk_losses(self, adapted: Params, shared: Params, buffers: Params, batch: TaskBatch,
                      steps: int, create_graph: bool, path: str) -> torch.Tensor:
        params = self._adapt_together(expand_to_tasks(adapted, batch.num_tasks), shared, buffers,
                                      batch.support_x, batch.support_y, steps, self.inner_lr, create_graph,
                                      track_theta=True, path=path)
        return self._losses_tasks(params, shared, buffers, batch.query_x, batch.query_y, path)

    def _one_task_loss(self, adapted: Params, shared: Params, buffers: Params, batch: TaskBatch,
                       i: int, steps: int, create_graph: bool) -> torch.Tensor:
        params = self._adapt_loop(adapted, shared, buffers, batch.support_x[i], batch.support_y[i],
                                  steps, self.inner_lr, create_graph, track_theta=True)
        return self._task_loss(params, shared, buffers, batch.query_x[i], batch.query_y[i])

    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        """(1/T) Σ_i L_{T_i}(θ'_i) on the query sets; ``.backward()`` fills θ's ``.grad``.

        The meta-gradient is taken chunk by chunk (one task at a time on the loop path) as the
        loss is computed, so peak memory is that of one chunk's graph; ``.backward()`` then only
        deposits it. To differentiate the loss further, use ``query_losses(batch).mean()``.
        """
        _check_batch(batch, self.model)
        theta = parameters_of(self.model)
        if not torch.is_grad_enabled():
            with torch.enable_grad():
                return self.query_losses(batch).mean().detach()
        adapted, shared, buffers = self._split(detach=False)
        create_graph = not self.first_order
        num_tasks = batch.num_tasks
        path = self.resolved_execution(batch.support_x.device)
        if path != "loop":
            size = self.task_chunk or num_tasks
            chunks = [slice(s, min(s + size, num_tasks)) for s in range(0, num_tasks, size)]

            def chunk_loss(s: slice) -> torch.Tensor:
                sub = TaskBatch(batch.support_x[s], batch.support_y[s], batch.query_x[s],
                                batch.query_y[s])
                return self._chunk_losses(adapted, shared, buffers, sub, self.inner_steps,
                                          create_graph, path).sum()
        else:
            chunks = list(range(num_tasks))

            def chunk_loss(i: int) -> torch.Tensor:  # type: ignore[misc]
                return self._one_task_loss(adapted, shared, buffers, batch, i, self.inner_steps,
                                           create_graph)

        total = torch.zeros((), dtype=next(iter(theta.values())).dtype, device=batch.query_x.device)
        grads = [torch.zeros_like(p) for p in theta.values()]
        for c in chunks:
            loss = chunk_loss(c) / num_tasks
            for acc, g in zip(grads, _grad(loss, theta, create_graph=False).values(), strict=True):
                acc += g
            total = total + loss.detach()
        return _PrecomputedGrad.apply(total, tuple(grads), *theta.values())

    # ------------------------------------------------------------------ tuning
    def tune(self, batch: TaskBatch, repeats: int = 3) -> dict[str, float]:
        """Time ``meta_loss`` on each path for this model and batch, keep the fastest.

        ``meta_loss`` only deposits gradients on ``.backward()``, so timing it leaves ``.grad``
        untouched. Returns the seconds per meta-loss of each path; sets ``self.execution``.
        """
        check_positive("repeats", repeats, integer=True)
        times: dict[str, float] = {}
        for path in (("batched",) if self._plan is not None else ()) + ("vmap", "loop"):
            self.execution = path
            self.meta_loss(batch)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                self.meta_loss(batch)
            times[path] = (time.perf_counter() - start) / repeats
        self.execution = min(times, key=times.__getitem__)
        return times

    def __repr__(self) -> str:
        return (f"MAML(inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
                f"first_order={self.first_order}, execution={self.execution!r})")


def _grad(loss: torch.Tensor, params: Mapping[str, torch.Tensor], create_graph: bool) -> Params:
    """∇ loss w.r.t. each tensor of ``params`` (zeros where the loss does not depend on it)."""
    names = list(params)
    tensors = [params[k] for k in names]
    grads = torch.autograd.grad(loss, tensors, create_graph=create_graph, allow_unused=True)
    return {k: (torch.zeros_like(t) if g is None else g)
            for k, t, g in zip(names, tensors, grads, strict=True)}


def _check_xy(which: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() < 2 or y.dim() < 2 or x.shape[:2] != y.shape[:2]:
        raise MamlabError(
            f"{which}_x {tuple(x.shape)} and {which}_y {tuple(y.shape)} must share their leading "
            "[tasks, examples] dimensions"
        )


def _check_batch(batch: TaskBatch, model: nn.Module | None = None) -> None:
    if not isinstance(batch, TaskBatch):
        raise MamlabError(f"expected a mamlab.TaskBatch, got {type(batch).__name__}")
    if model is not None:
        _check_dtype("support_x", batch.support_x, model)
        _check_dtype("query_x", batch.query_x, model)


def _check_dtype(name: str, x: torch.Tensor, model: nn.Module) -> None:
    dtype = next(model.parameters()).dtype
    if x.is_floating_point() and x.dtype != dtype:
        got, want = str(x.dtype).removeprefix("torch."), str(dtype).removeprefix("torch.")
        raise MamlabError(f"{name} has dtype {got} but the model's parameters are {want}; "
                          "convert with batch.to(dtype=...)")


