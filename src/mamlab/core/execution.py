"""How the tasks of a meta-batch are run: all together (batched MLP, vmap), in chunks, or one by one.

Every algorithm in ``mamlab.algorithms`` writes its update rule once, on *task-batched* parameter
dicts (each tensor has a leading task dimension ``[T, ...]``). A ``TaskEngine`` decides how those
``T`` tasks are actually computed:

* ``"batched"``: MLPs (a Sequential of Linear layers and activations); every task's weights
  ``[T, out, in]`` go through one ``baddbmm`` per layer (``mamlab.core.batched``).
* ``"vmap"``: any model; ``torch.func.vmap`` over a functional forward.
* ``"conv"``: Conv4-like nets (``mamlab.core.conv``), in channels-last memory, max-pooling before
  ReLU, the first BatchNorm folded into its convolution. On the CPU one task at a time, as on the
  loop path: the fastest path for them there. A chunk of tasks (``task_chunk``; by default, on CUDA
  devices, the whole meta-batch, as vmap) runs together as the groups of grouped convolutions,
  with max-pooling that keeps one byte per output and the first layer in slices of images: for 32
  Conv4 tasks it holds a fifth of vmap's saved tensors (``benchmarks/conv_cpu.py``). ``auto`` still
  takes vmap on the GPU, since the conv path's GPU speed is not yet measured.
* ``"loop"``: one task at a time (chunks of one task, run with the model's own forward). On CPU
  batched convolutions under vmap are slower and far hungrier for memory than this; the only path
  for BatchNorm that tracks running statistics.

On every path the inner gradient of all tasks of a chunk is one autograd call: each task's loss
depends only on its own slice of the task-batched parameters, so ∇ of the summed losses is the
per-task ∇. A chunk of one task (the loop path) needs no task dimension at all: ``per_task``
then hands out θ itself, which keeps the autograd graph as small as a hand-written loop's.
``meta_gradient`` takes the meta-gradient chunk by chunk while the loss is computed, so peak
memory is one chunk's graph.

``execution="auto"`` picks by the rule that ``benchmarks/speed.py`` measured (``default_execution``);
``TaskEngine.tune`` times the paths on a given model and batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import vmap

from mamlab.core.batch import TaskBatch
from mamlab.core.batched import batched_forward, plan_for
from mamlab.core.conv import conv_forward, conv_forward_tasks, conv_plan_for
from mamlab.core.losses import LossFn, per_task_loss
from mamlab.core.params import Params, buffers_of, check_forward_signature, check_output, forward
from mamlab.errors import MamlabError, check_choice, check_positive

__all__ = ["EXECUTIONS", "TaskEngine", "default_execution", "vmap_unsafe", "grad_of", "PrecomputedGrad",
           "RecomputedStep", "recomputed_step", "tracks_running_stats", "no_double_backward",
           "once_differentiable_in", "check_second_order"]

EXECUTIONS = ("auto", "batched", "vmap", "loop", "conv")

_BATCHED_SLOW_OR_UNSAFE = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)


def default_execution(model: nn.Module, device: torch.device | str = "cpu") -> str:
    """The path ``execution="auto"`` takes: batched MLP, else (on CPU) conv for Conv4-like nets and
    loop for other conv/norm nets, else vmap.

    Models vmap cannot run (recurrent layers, dropout in training mode: ``vmap_unsafe``) go to the
    loop on every device.

    Measured on 2 CPU cores (``benchmarks/speed.py``): vmap runs the sinusoid MLP an order of
    magnitude faster than a loop, but runs Conv4+BatchNorm slower with ~9x the memory. Models
    whose BatchNorm tracks running statistics also go to the loop, since vmap cannot update a
    shared running mean from batched tasks. The channels-last conv path runs Conv4 faster than the
    loop on CPU (README, Speed). On CUDA devices Conv4-like nets stay on vmap until a GPU measures
    the conv path's chunks of tasks (which hold far less memory than vmap; README, Speed).
    """
    device = torch.device(device)
    if plan_for(model) is not None:
        return "batched"
    if device.type == "cpu" and conv_plan_for(model) is not None:
        return "conv"
    if vmap_unsafe(model) or tracks_running_stats(model):
        return "loop"
    if device.type == "cpu" and any(isinstance(m, _BATCHED_SLOW_OR_UNSAFE) for m in model.modules()):
        return "loop"
    return "vmap"


#: Modules vmap cannot run as the model's own forward does: recurrent layers (their fused kernels
#: have no batching rule) and, in training mode, dropout (vmap refuses random operations unless told
#: how to share randomness across tasks).
_VMAP_UNSAFE = (nn.RNNBase,)
_RANDOM_IN_TRAINING = (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)


def vmap_unsafe(model: nn.Module) -> str | None:
    """Why ``model`` cannot run under vmap (``"nn.LSTM"``, ``"dropout in training mode"``), or None."""
    for m in model.modules():
        if isinstance(m, _VMAP_UNSAFE):
            return f"nn.{type(m).__name__}"
        if isinstance(m, _RANDOM_IN_TRAINING) and m.training and getattr(m, "p", 0) > 0:
            return "dropout in training mode"
    return None


def grad_of(loss: torch.Tensor, params: Mapping[str, torch.Tensor], create_graph: bool) -> Params:
    """∇ loss w.r.t. each tensor of ``params`` (zeros where the loss does not depend on it)."""
    names = list(params)
    tensors = [params[k] for k in names]
    grads = torch.autograd.grad(loss, tensors, create_graph=create_graph, allow_unused=True)
    return {k: (torch.zeros_like(t) if g is None else g)
            for k, t, g in zip(names, tensors, grads, strict=True)}


class PrecomputedGrad(torch.autograd.Function):
    """A scalar whose backward hands out gradients computed chunk by chunk in advance."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: tuple[torch.Tensor, ...], *params: torch.Tensor):  # noqa: D102
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        return (None, None, *[g * grad_output for g in ctx.grads])


#: ``step(params, shared, create_graph)`` → the next params: one inner step, as ``recomputed_step`` runs it.
StepFn = Callable[[Params, Params, bool], Params]


class RecomputedStep(torch.autograd.Function):
    """One inner step whose graph is not kept: backward recomputes it from the θ_k it saved.

    Forward runs ``step`` without a graph (its inner gradient with ``create_graph=False``) and saves
    only its input θ_k. Backward rebuilds the step's graph from θ_k (the inner gradient now with
    ``create_graph=True``, so the second-order terms are there), takes the vector-Jacobian product
    of the incoming gradient with it, and drops it. Peak memory is then the θ_k of every step plus
    the graph of one step, instead of the graphs of all steps. The random-number state is saved and
    restored, so a step that draws random numbers (dropout) recomputes the same ones. ``extras`` are
    tensors the step reads by itself (an algorithm's learned step sizes): they are inputs too, so
    they get their gradient. The backward is not itself differentiable (no third-order derivatives).
    """

    @staticmethod
    def forward(ctx, step: StepFn, names: tuple[tuple[str, ...], tuple[str, ...]], n_extras: int,  # noqa: D102
                *tensors: torch.Tensor):
        param_names, shared_names = names
        n, m = len(param_names), len(shared_names)
        ctx.step, ctx.names = step, names
        ctx.devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.save_for_backward(*tensors[:n])
        # θ and the extras are the same tensors at every step: referenced, not saved per step
        ctx.shared, ctx.extras = tensors[n:n + m], tensors[n + m:]
        with torch.enable_grad():
            params = {k: t.detach().requires_grad_(True) for k, t in zip(param_names, tensors, strict=False)}
            shared = {k: t.detach() for k, t in zip(shared_names, tensors[n:n + m], strict=True)}
            out = step(params, shared, False)
        return tuple(out[k].detach() for k in param_names)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_out: torch.Tensor):  # noqa: D102
        param_names, shared_names = ctx.names
        params = {k: t.detach().requires_grad_(True)
                  for k, t in zip(param_names, ctx.saved_tensors, strict=True)}
        shared = {k: t.detach().requires_grad_(t.requires_grad)
                  for k, t in zip(shared_names, ctx.shared, strict=True)}
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            for d, state in zip(ctx.devices, ctx.cuda_rng, strict=True):
                torch.cuda.set_rng_state(state, d)
            out = ctx.step(params, shared, True)  # the step reads the extras themselves
            pairs = [(out[k], g) for k, g in zip(param_names, grad_out, strict=True)
                     if out[k].requires_grad and g is not None]
            inputs = [*params.values(), *shared.values(), *ctx.extras]
            wrt = [t for t in inputs if t.requires_grad]
            outs, vs = [o for o, _ in pairs], [g for _, g in pairs]
            grads = iter(torch.autograd.grad(outs, wrt, vs, allow_unused=True) if pairs and wrt else ())
        return (None, None, None, *[next(grads, None) if t.requires_grad else None for t in inputs])


def recomputed_step(step: StepFn, params: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor],
                    extras: Sequence[torch.Tensor] = ()) -> Params:
    """``step(params, shared, create_graph)`` whose graph backward recomputes (``RecomputedStep``).

    ``extras``: tensors ``step`` reads by itself (not through its arguments) that need a gradient.
    """
    names = (tuple(params), tuple(shared))
    out = RecomputedStep.apply(step, names, len(extras), *params.values(), *shared.values(), *extras)
    return dict(zip(names[0], out, strict=True))


#: Messages of torch errors raised when a backward pass is itself differentiated and cannot be.
_NO_DOUBLE_BACKWARD = ("differentiate twice a function that was marked with @once_differentiable",
                       "double backward is not supported", "double backwards is not supported")

_SECOND_ORDER_FIX = (
    "second-order meta-gradients differentiate {model}'s backward pass, and one of its kernels has no "
    "derivative of its own ({error}); train first order (first_order=True, the fomaml algorithm), or, for "
    "attention, run it on the math backend, which has one: wrap meta_loss() and backward() in "
    "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"
)


def no_double_backward(err: BaseException) -> bool:
    """Whether ``err`` is torch saying an operation's backward cannot itself be differentiated."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (("derivative for" in text and "is not implemented" in text)
                                              or any(m.lower() in text for m in _NO_DOUBLE_BACKWARD))


def once_differentiable_in(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether the graph of ``tensors`` holds a backward marked ``@once_differentiable``.

    Such a backward, run with ``create_graph``, hands back a result whose dependence on its inputs
    autograd does not record (only an error node that backward prunes), so differentiating it
    again silently drops terms instead of failing. One walk over the graph: call it once.
    """
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name() == "torch::autograd::Error":  # DelayedError: what once_differentiable leaves
            return True
        stack.extend(f for f, _ in node.next_functions)
    return False


def check_second_order(grads: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """One-line error if the inner gradients ``grads`` (taken with ``create_graph``) cannot be differentiated.

    Algorithms call it once, on their first second-order inner gradient (it walks the graph).
    """
    if once_differentiable_in(grads.values()):
        raise MamlabError(_SECOND_ORDER_FIX.format(
            model=type(model).__name__, error="a backward marked @once_differentiable, whose second-order "
            "terms would be silently dropped"))


def tracks_running_stats(model: nn.Module) -> bool:
    """Whether a forward pass of ``model`` updates BatchNorm running statistics (training mode)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
               for m in model.modules())


class TaskEngine:
    """Runs functions of task-batched parameters over a meta-batch, by the chosen execution path.

    Args:
        model: the network whose functional forward is run (its buffers are used as they are).
        loss_fn: ``loss_fn(prediction, target)`` → one task's mean loss.
        execution: ``"auto"``, ``"batched"``, ``"vmap"``, ``"loop"`` or ``"conv"``.
        task_chunk: how many tasks run together on the batched, vmap and conv paths (default: the whole
            batch; on the conv path one task on the CPU, the whole batch on CUDA devices).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, execution: str = "auto",
                 task_chunk: int | None = None) -> None:
        check_choice("execution", execution, EXECUTIONS)
        if task_chunk is not None:
            check_positive("task_chunk", task_chunk, integer=True)
        self.plan = plan_for(model)
        self.conv_plan = conv_plan_for(model)
        if execution == "vmap" and vmap_unsafe(model):
            raise MamlabError(f"execution 'vmap' cannot run this model ({vmap_unsafe(model)}); "
                              "allowed for it: auto, loop")
        if execution == "batched" and self.plan is None:
            raise MamlabError(
                f"execution 'batched' needs a Sequential of Linear layers and elementwise activations, "
                f"got {type(model).__name__}; allowed for this model: auto, vmap, loop"
            )
        check_forward_signature(model)
        if execution == "conv" and self.conv_plan is None:
            raise MamlabError(
                "execution 'conv' needs a Conv4-like net (Conv2d, BatchNorm2d without running statistics, "
                f"activations, MaxPool2d, then a Linear head), got {type(model).__name__}; "
                "allowed for this model: auto, vmap, loop"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.per_task_loss = per_task_loss(loss_fn)
        self.output_checked = False  # the model's output is checked once, on the first forward
        self.execution = execution
        self.task_chunk = task_chunk
        self.param_dims = {k: p.dim() for k, p in model.named_parameters()}
        self.has_buffers = any(True for _ in model.buffers())

    def batched(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (for parameter ``name``) carries a leading task dimension."""
        return tensor.dim() > self.param_dims[name]

    def per_task(self, params: Mapping[str, torch.Tensor], num_tasks: int) -> Params:
        """θ for each of ``num_tasks`` tasks: a view with a task dimension, or θ itself for one task."""
        if num_tasks == 1:
            return dict(params)
        return {k: p.unsqueeze(0).expand(num_tasks, *p.shape) for k, p in params.items()}

    def with_task_dim(self, params: Mapping[str, torch.Tensor]) -> Params:
        """``params`` with a leading task dimension (a chunk of one task's θ gets one of size 1)."""
        return {k: p if self.batched(k, p) else p.unsqueeze(0) for k, p in params.items()}

    def path(self, device: torch.device | str | None = None) -> str:
        """The execution path used on ``device``: ``self.execution`` unless it is ``"auto"``."""
        if self.execution != "auto":
            return self.execution
        if device is None:
            device = next(self.model.parameters()).device
        return default_execution(self.model, device)

    def chunks(self, num_tasks: int, path: str, device: torch.device | str | None = None) -> list[slice]:
        """Task slices computed together.

        The loop path: one task each. The conv path: ``task_chunk`` tasks if given, else one task on
        the CPU (measured fastest there) and the whole meta-batch on CUDA devices (like vmap; peak
        memory is then the graph of all tasks). The other paths: ``task_chunk``, else all tasks.
        ``device`` (default: the model's) is where the tasks run.
        """
        if path == "loop":
            size = 1
        elif path == "conv" and self.task_chunk is None:
            if device is None:
                device = next(self.model.parameters()).device
            size = num_tasks if torch.device(device).type == "cuda" else 1
        else:
            size = self.task_chunk or num_tasks
        return [slice(s, min(s + size, num_tasks)) for s in range(0, num_tasks, size)]

    def forward(self, params: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor],
                x: torch.Tensor, path: str) -> torch.Tensor:
        """f_{θ_i}(x_i) for every task i of ``x`` ``[T, N, ...]``.

        ``params`` carry a leading task dimension (or none, for one task); ``shared`` parameters
        (no task dimension) are the same for every task. Parameters in neither are the model's own.
        """
        buffers = buffers_of(self.model) if self.has_buffers else {}
        if path == "batched":
            return batched_forward(self.plan, {**shared, **params}, x)  # type: ignore[arg-type]
        per = {k: p for k, p in params.items() if self.batched(k, p)}
        common = {**shared, **{k: p for k, p in params.items() if k not in per}}
        if path == "vmap":
            out = vmap(lambda p, xi: forward(self.model, {**common, **p}, xi, buffers))(per, x)
            if not self.output_checked:  # once: a model returning a tuple or a dict is a one-line error
                check_output(self.model, out)
                self.output_checked = True
            return out

        if path == "conv":
            if x.shape[0] > 1:  # the tasks as the groups of grouped convolutions (mamlab.core.conv)
                return conv_forward_tasks(self.conv_plan, {**common, **per}, x)  # type: ignore[arg-type]
            return conv_forward(self.conv_plan, {**common, **{k: p[0] for k, p in per.items()}},  # type: ignore[arg-type]
                                x[0])[None]

        def one(i: int) -> torch.Tensor:
            theta = {**common, **{k: p[i] for k, p in per.items()}}
            out = forward(self.model, theta, x[i], buffers)
            if not self.output_checked:  # once: a model returning a tuple or a dict is a one-line error
                check_output(self.model, out)
                self.output_checked = True
            return out

        if x.shape[0] == 1:
            return one(0)[None]
        return torch.stack([one(i) for i in range(x.shape[0])])

    def losses(self, params: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor],
               x: torch.Tensor, y: torch.Tensor, path: str) -> torch.Tensor:
        """Each task's loss ``[T]`` of ``f_{θ_i}(x_i)`` against ``y_i``."""
        if path in ("loop", "conv") and x.shape[0] == 1:  # one task: the user's loss function itself
            return self.loss_fn(self.forward(params, shared, x, path)[0], y[0]).unsqueeze(0)
        return self.per_task_loss(self.forward(params, shared, x, path), y)

    def meta_gradient(self, task_losses: Callable[[TaskBatch, str], torch.Tensor], batch: TaskBatch,
                      wrt: Sequence[torch.Tensor]) -> torch.Tensor:
        """(1/T) Σ_i ``task_losses`` over the batch, with its gradient w.r.t. ``wrt`` taken chunk by chunk.

        ``task_losses(chunk, path)`` returns the per-task objective ``[t]`` of a chunk of tasks,
        differentiable w.r.t. ``wrt``. Each chunk's graph is freed once its gradient is added, so
        memory stays at one chunk's worth; the returned scalar's ``.backward()`` deposits the sum.
        """
        num_tasks = batch.num_tasks
        path = self.path(batch.support_x.device)
        total = torch.zeros((), dtype=wrt[0].dtype, device=batch.query_x.device)
        grads = [torch.zeros_like(p) for p in wrt]
        named = {str(i): p for i, p in enumerate(wrt)}
        for s in self.chunks(num_tasks, path, batch.support_x.device):
            loss = task_losses(batch.slice(s), path).sum() / num_tasks
            try:
                chunk_grads = grad_of(loss, named, create_graph=False)
            except RuntimeError as e:
                if no_double_backward(e):
                    raise MamlabError(_SECOND_ORDER_FIX.format(model=type(self.model).__name__,
                                                               error=str(e).splitlines()[0])) from None
                raise
            for acc, g in zip(grads, chunk_grads.values(), strict=True):
                acc += g
            total = total + loss.detach().to(total.dtype)
        return PrecomputedGrad.apply(total, tuple(grads), *wrt)

    def tune(self, run: Callable[[], object], repeats: int = 3) -> dict[str, float]:
        """Time ``run()`` on each path this model allows and keep the fastest; seconds per call."""
        check_positive("repeats", repeats, integer=True)
        times: dict[str, float] = {}
        paths = [p for p, ok in (("batched", self.plan is not None), ("vmap", not vmap_unsafe(self.model)),
                                 ("loop", True), ("conv", self.conv_plan is not None)) if ok]
        for path in paths:
            self.execution = path
            run()  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            times[path] = (time.perf_counter() - start) / repeats
        self.execution = min(times, key=times.__getitem__)
        return times
