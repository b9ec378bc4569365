"""Memory: what autograd graphs hold, what one meta-batch step needs at least, and what is available.

``peak_saved_bytes`` wraps every tensor autograd saves (forward and double backward alike) while
``fn`` runs; a wrapper lives exactly as long as the graph that saved it, so the running sum of live
wrappers is the memory that graphs hold, which is what grows with the inner steps when an algorithm
differentiates through them. It counts on any device, unlike ``torch.cuda.max_memory_allocated``,
and leaves out parameters, gradients and temporaries, which do not depend on the number of steps.

``estimate_step`` puts a *lower bound* on the memory of one meta-training step (the meta-batch's
tensors, the graph of the tasks computed together, the parameters with their gradients and
optimizer state) from the sizes of one tiny task, without allocating anything of the full size,
so a training run can refuse a meta-batch that cannot fit before it allocates it;
``available_bytes`` says how much memory the device has free. ``is_out_of_memory`` recognizes the
errors torch raises when an allocation fails anyway.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mamlab.core.batch import TaskBatch

__all__ = ["peak_saved_bytes", "StepEstimate", "estimate_step", "batch_bytes", "available_bytes",
           "is_out_of_memory", "format_bytes"]


def peak_saved_bytes(fn: Callable[[], object]) -> int:
    """The peak total bytes of tensors saved for backward and alive at once while ``fn()`` runs."""
    state = {"live": 0, "peak": 0}

    class Held:
        def __init__(self, t: torch.Tensor) -> None:
            self.t, self.size = t, t.numel() * t.element_size()
            state["live"] += self.size
            state["peak"] = max(state["peak"], state["live"])

        def __del__(self) -> None:
            state["live"] -= self.size

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        fn()
    return state["peak"]


def batch_bytes(batch: TaskBatch) -> int:
    """The bytes of a TaskBatch's four tensors."""
    return sum(t.numel() * t.element_size()
               for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))


@dataclass(frozen=True)
class StepEstimate:
    """A lower bound on the memory of one meta-training step, in bytes, by part."""

    data: int
    graph: int
    parameters: int
    tasks_together: int

    @property
    def total(self) -> int:
        """All parts together."""
        return self.data + self.graph + self.parameters

    def largest(self) -> str:
        """The name of the largest part: ``"data"``, ``"graph"`` or ``"parameters"``."""
        parts = {"data": self.data, "graph": self.graph, "parameters": self.parameters}
        return max(parts, key=parts.__getitem__)


def estimate_step(meta_loss: Callable[[TaskBatch], object], sample: Callable[[int, int], TaskBatch], *,
                  tasks: int, shots: int, queries: int, tasks_together: int,
                  parameter_bytes: int) -> StepEstimate:
    """A lower bound on one meta-training step's memory, measured on tasks of one and two examples.

    Every size involved is linear in the examples per task: the data exactly, the graph because
    each example's activations are saved once per inner step (plus a part, such as the adapted
    parameters, that does not depend on the examples). So the data of ``tasks`` tasks is computed
    from the bytes of one task with one support and one query example per class, and the graph of
    one task from ``peak_saved_bytes`` of ``meta_loss`` on tasks of one and of two examples each,
    extrapolated linearly to ``min(shots, queries)`` examples (a lower bound for any ``shots``,
    ``queries``); ``tasks_together`` tasks hold that graph at once.

    Args:
        meta_loss: ``batch -> loss``: the algorithm's meta-loss (its graph is measured, then freed).
        sample: ``(shots, queries) -> TaskBatch`` of one task.
        tasks: tasks of the meta-batch (and of the validation batch) held in memory at once.
        shots, queries: examples per task (per class, for classification), as ``sample`` takes them.
        tasks_together: tasks whose graphs are alive at once (1 on the loop path, else the chunk).
        parameter_bytes: parameters, their gradients and the optimizer's state.

    Returns:
        The estimate, by part.
    """
    one = sample(1, 1)
    per_shot = sum(t.numel() * t.element_size() for t in (one.support_x, one.support_y))
    per_query = sum(t.numel() * t.element_size() for t in (one.query_x, one.query_y))
    data = tasks * (shots * per_shot + queries * per_query)
    small = peak_saved_bytes(lambda: meta_loss(one))
    slope = max(0, peak_saved_bytes(lambda: meta_loss(sample(2, 2))) - small)
    graph = tasks_together * (small + slope * (min(shots, queries) - 1))
    return StepEstimate(data, graph, parameter_bytes, tasks_together)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_free() -> int | None:
    """What the cgroup (v2) memory limit leaves, where one is set (containers)."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free for new tensors on ``device``, in bytes; None where it cannot be told.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (else ``SC_AVPHYS_PAGES``), or less where a cgroup
    limit leaves less. CUDA: the free memory ``torch.cuda.mem_get_info`` reports.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    if device.type != "cpu":
        return None
    known = [b for b in (_meminfo_available(), _cgroup_free()) if b is not None]
    return min(known) if known else None


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is torch failing to allocate memory (CUDA, CPU, MPS)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    if not isinstance(err, (RuntimeError, MemoryError)):
        return False
    text = str(err)
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text \
        or "DefaultCPUAllocator" in text


def format_bytes(n: float) -> str:
    """``"1.5 GiB"``: bytes in binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover
