"""One meta-gradient captured as a CUDA graph and replayed: the same kernels without their launch cost.

Small meta-learning problems are launch-bound on a GPU. Second-order MAML on the sinusoid MLP
(25 tasks, 1-40-40-1) is a few hundred kernels per meta-iteration, each microseconds of arithmetic
behind several microseconds of launch and Python: an H200 ran it at ~6 ms per iteration, almost
all overhead (issue 11). A CUDA graph (``torch.cuda.CUDAGraph``) records the kernels of one
``meta_loss(batch)`` and its gradient once; every later call copies the new batch into the
captured input tensors and replays all of them with one launch, on the same memory. The
replay is the same kernels in the same order on the same addresses, so the same numbers::

    graphed = GraphedMetaGradient(algorithm)     # captured on its first call
    for batch in batches:
        optimizer.zero_grad()
        loss = graphed(batch)        # what `loss = algorithm.meta_loss(batch); loss.backward()` does
        optimizer.step()

What a graph needs, and how it is met:

* **Fixed shapes.** Every batch must have the example's shapes, dtypes and device (a one-line
  error otherwise). The tasks of a training run always do.
* **No host synchronisation inside the step** (no ``.item()``, no ``if tensor``, no data-dependent
  shapes, no tensor made from Python data). Every registered algorithm's meta-step is checked
  for this on the CPU (``tests/core/test_graphs.py``: a dispatch mode that records synchronising
  operations, and a run on the ``meta`` device, where any of them fails).
* **A rule that is fixed while captured.** An algorithm whose rule changes over training (MAML++'s
  multi-step loss weights, its first-order epochs) says so through ``rule_key()``; when the key
  changes, the step is captured anew (once per change; MAML++ changes at most once per epoch).
* **Warm-up.** A few eager calls on a side stream before the capture, which then records on that
  same stream, so one-time work (cuBLAS and cuDNN handles and workspaces, the algorithm's
  first-call checks, the streams autograd notes for the parameters) is done and is the capture's
  own. The warm-up leaves no trace: buffers (BatchNorm's running statistics) and the CUDA random
  state are restored afterwards.

``.grad`` after a call holds the graph's output tensors (set, not accumulated, as after
``zero_grad()`` and ``backward()``); the next call overwrites them, so copy a gradient you keep.
Not capturable: ``recompute=True`` (its backward saves and restores the CUDA random state, which a
graph forbids) and the CPU (CUDA graphs exist only on CUDA devices).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import fields

import torch
from torch import nn

from mamlab.core.batch import TaskBatch
from mamlab.errors import MamlabError, check_positive

__all__ = ["GraphedMetaGradient", "check_capturable"]


def check_capturable(algorithm: nn.Module, device: torch.device | str) -> None:
    """One-line error if ``algorithm``'s meta-gradient cannot be captured as a CUDA graph on ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        raise MamlabError(f"CUDA graphs need a CUDA device, got {device}; train without cuda_graph "
                          "(--cuda-graph) on this device")
    if getattr(algorithm, "recompute", False):
        raise MamlabError("cuda_graph cannot capture recompute=True (its backward saves and restores the "
                          "CUDA random state, which a graph forbids); set one of them false")


class GraphedMetaGradient:
    """``algorithm.meta_loss(batch).backward()`` as a CUDA graph, captured on the first call.

    Args:
        algorithm: a ``MetaAlgorithm`` on a CUDA device (``rule_key()`` says when to capture anew).
        warmup: eager calls on a side stream before each capture (>= 1).
        context: a zero-argument callable returning the context the step runs in (a precision
            scope; autocast must be built with ``cache_enabled=False`` under a graph), or None.

    Calling it with a ``TaskBatch`` returns the meta-loss (a new tensor) and sets each meta-parameter's
    ``.grad`` to its meta-gradient. ``captures`` counts the captures so far.
    """

    def __init__(self, algorithm: nn.Module, *, warmup: int = 3,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        check_positive("warmup", warmup, integer=True)
        params = algorithm.meta_parameters()  # type: ignore[operator]
        self._check(algorithm, params[0].device)
        self.algorithm = algorithm
        self.params = params
        self.warmup = int(warmup)
        self.context = context or contextlib.nullcontext
        self.static: TaskBatch | None = None
        self.key: Hashable = None
        self.graph: torch.cuda.CUDAGraph | None = None  # or what ``_record`` returns
        self.loss: torch.Tensor | None = None
        self.grads: tuple[torch.Tensor | None, ...] = ()
        self.captures = 0
        self.stream: torch.cuda.Stream | None = None  # created on the first capture

    def _check(self, algorithm: nn.Module, device: torch.device) -> None:
        """One-line error unless ``algorithm`` can be captured on ``device`` (``check_capturable``)."""
        check_capturable(algorithm, device)

    def _step(self) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """The eager step the graph records: the meta-loss and the meta-gradient of ``self.static``."""
        with torch.enable_grad(), self.context():
            loss = self.algorithm.meta_loss(self.static)  # type: ignore[operator]
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.detach(), grads

    def _capture(self) -> None:
        """Warm up, leaving no trace of it, then record one step."""
        self.graph = None  # the previous capture's memory goes back to the allocator
        with self._leaving_no_trace():
            self._warm_up()
        self.graph, (self.loss, self.grads) = self._record()
        self.captures += 1

    @contextlib.contextmanager
    def _leaving_no_trace(self) -> Iterator[None]:
        """Steps run inside leave the algorithm's buffers (BatchNorm's running statistics) and the
        device's random state as they found them."""
        buffers = list(self.algorithm.buffers())  # type: ignore[operator]
        saved = [b.clone() for b in buffers]
        rng = self._random_state()
        yield
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)
        self._random_state(rng)

    def _random_state(self, state: torch.Tensor | None = None) -> torch.Tensor | None:
        """The device's random state; with ``state``, set it."""
        device = self.params[0].device
        if state is None:
            return torch.cuda.get_rng_state(device)
        torch.cuda.set_rng_state(state, device)
        return None

    def _side_stream(self) -> torch.cuda.Stream:
        """The stream the warm-ups and the captures run on (one, so that what the warm-up set up per
        stream, library handles and workspaces, and the stream autograd recorded for the parameters'
        gradients, are the capture's own)."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.params[0].device)
        return self.stream

    def _warm_up(self) -> None:
        """``warmup`` eager steps on the side stream, as ``torch.cuda.graph`` asks before a capture."""
        device = self.params[0].device
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)

    def _record(self) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]]:
        """One step recorded as a graph (not run) on the warm-ups' stream; the tensors its replays write."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._side_stream()):
                out = self._step()
        except RuntimeError as e:  # an operation a graph cannot hold (a host synchronisation, mostly)
            name = getattr(self.algorithm, "name", "") or type(self.algorithm).__name__
            raise MamlabError(f"could not capture {name}'s meta-step as a CUDA graph "
                              f"({str(e).splitlines()[0]}); train without cuda_graph") from None
        return graph, out

    def _load(self, batch: TaskBatch) -> None:
        """Copy ``batch`` into the captured inputs (the first batch becomes them)."""
        if not isinstance(batch, TaskBatch):
            raise MamlabError(f"expected a mamlab.TaskBatch, got {type(batch).__name__}")
        if self.static is None:
            self.static = TaskBatch(*(getattr(batch, f.name).clone() for f in fields(TaskBatch)))
            return
        for f in fields(TaskBatch):
            new, old = getattr(batch, f.name), getattr(self.static, f.name)
            if (new.shape, new.dtype, new.device) != (old.shape, old.dtype, old.device):
                raise MamlabError(
                    f"a CUDA graph replays fixed shapes: batch.{f.name} is {tuple(new.shape)} {new.dtype} on "
                    f"{new.device}, the captured one {tuple(old.shape)} {old.dtype} on {old.device}"
                )
            old.copy_(new)

    def __call__(self, batch: TaskBatch) -> torch.Tensor:
        """The meta-loss of ``batch``; each meta-parameter's ``.grad`` is set to its meta-gradient."""
        self._load(batch)
        if self.graph is None or self.algorithm.rule_key() != self.key:  # type: ignore[operator]
            self._capture()
            self.key = self.algorithm.rule_key()  # type: ignore[operator]  # after the first-call checks
        self.graph.replay()  # type: ignore[union-attr]
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        return self.loss.clone()  # type: ignore[union-attr]
