"""Where and how a run computes: the device, the numeric precision, and multi-process meta-gradients.

* ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")`` turns a user's device string into a
  ``torch.device``, or a one-line ``MamlabError`` naming what this machine offers.
* ``precision_context("fp32" | "tf32" | "bf16", device)`` is the scope a meta-iteration runs in.
  Parameters and gradients stay float32 under every precision.
* ``Distributed`` is the process group of a run started by ``torchrun``: it splits each
  meta-batch's tasks between the processes and all-reduces the meta-gradient in one collective.

Data-parallel meta-learning, the contract::

    dist = Distributed.from_env(resolve_device(args.device))
    generator = torch.Generator().manual_seed(seed)          # same seed on every rank
    for step in range(steps):
        batch = family.sample(meta_batch, shots, queries, generator)   # the FULL meta-batch
        share = dist.task_share(batch.num_tasks)
        sub = TaskBatch(batch.support_x[share], batch.support_y[share],
                        batch.query_x[share], batch.query_y[share]).to(dist.device)
        opt.zero_grad()
        loss = maml.meta_loss(sub)                             # mean over this rank's tasks
        loss.backward()
        w = dist.weight(batch.num_tasks)
        (mean_loss,) = dist.all_reduce_gradients(model.parameters(), w, [w * loss.item()])
        opt.step()                                              # identical on every rank
        if dist.is_main:
            ...                                                 # rank 0 alone writes files

Every rank draws the same full meta-batch from the same seeded generator, so the task stream
does not depend on the number of processes, and keeps its contiguous ``task_share``. Its
meta-loss is the mean over its own n_r tasks; multiplying that gradient by ``n_r / T`` and summing
over the ranks gives (1/T) Σ_i ∇L_i, the mean over all T tasks: the meta-gradient one process
computes on the whole batch, equal to it up to the order of floating-point summation. Every rank
then holds identical ``.grad`` and, stepping the same optimizer, identical parameters.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.distributed as tdist

from mamlab.config import PRECISIONS
from mamlab.errors import MamlabError, check_choice, check_positive

__all__ = ["DEVICES_HELP", "PRECISIONS", "Distributed", "DistributedError", "precision_context",
           "resolve_device"]

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


# ---------------------------------------------------------------------------------------------- devices
def _cuda_inventory() -> tuple[int, str]:
    """The number of CUDA devices and a phrase naming them."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return 0, "no CUDA device"
    names = ", ".join(f"cuda:{i}" for i in range(count))
    return count, f"{count} CUDA device{'s' if count > 1 else ''}: {names}"


def _current_cuda_index() -> int:
    """The current CUDA device's index, without initializing CUDA (which would claim memory on GPU 0)."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The ``torch.device`` for a user's device choice: ``auto`` (or None), ``cpu``, ``cuda``, ``cuda:N``.

    ``auto`` is CUDA when a CUDA device is available, else the CPU. ``cuda`` means the current
    CUDA device and is returned with its index (``cuda:0``), so it compares equal to the device
    of tensors placed there. ``mps`` is accepted where PyTorch reports it available.

    Raises:
        MamlabError: for an unknown name, or a device this machine does not have; the message
            names the value and the devices allowed here.
    """
    if spec is None:
        spec = "auto"
    text = str(spec).strip()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _current_cuda_index())
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise MamlabError(f"unknown device {text!r}; allowed: {DEVICES_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        count, inventory = _cuda_inventory()
        index = device.index
        if count == 0 or (index is not None and not 0 <= index < count):
            allowed = "auto, cpu" + (", cuda, " + ", ".join(f"cuda:{i}" for i in range(count))
                                     if count else "")
            raise MamlabError(f"device {text!r} is not available here ({inventory}); allowed: {allowed}")
        return torch.device("cuda", _current_cuda_index() if index is None else index)
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        raise MamlabError(f"device {text!r} is not available here (no MPS device); allowed: {DEVICES_HELP}")
    raise MamlabError(f"unknown device {text!r}; allowed: {DEVICES_HELP}")


# ---------------------------------------------------------------------------------------------- precision
@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """Set TF32 for CUDA matmuls and cuDNN convolutions inside the scope; restore the settings after."""
    matmul_precision = torch.get_float32_matmul_precision()
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(matmul_precision)


def precision_context(precision: str, device: torch.device,
                      cache: bool = True) -> contextlib.AbstractContextManager:
    """The scope a forward and backward pass run in, for ``precision`` on ``device``.

    * ``fp32``: plain float32; TF32 is explicitly turned off for CUDA matmuls and cuDNN inside the
      scope, whatever the process-wide setting.
    * ``tf32``: float32 storage, TF32 tensor-core matmuls and convolutions
      (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` set
      inside the scope). These flags only affect CUDA devices (Ampere or newer): on the CPU
      ``tf32`` computes exactly what ``fp32`` does.
    * ``bf16``: ``torch.autocast(device.type, dtype=torch.bfloat16)``; matmuls and convolutions
      run in bfloat16, their outputs are bfloat16 inside the scope.

    Parameters and their gradients stay float32 under every precision; only the arithmetic
    changes. The previous TF32 settings are restored when the scope ends. ``cache=False`` turns off
    autocast's cache of bfloat16 weight copies, as a CUDA graph capture requires.

    Raises:
        MamlabError: for a precision not in ``PRECISIONS``.
    """
    check_choice("precision", precision, PRECISIONS)
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return _tf32(precision == "tf32")


# ---------------------------------------------------------------------------------------------- processes
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MamlabError(f"environment variable {name}={value!r} must be an integer") from None


class DistributedError(MamlabError):
    """A process of a multi-process run failed or cannot take part; the message names the rank."""


def _collective(rank: int, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one collective; another process dying turns gloo's or NCCL's error into one line."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError) as e:  # DistBackendError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {rank}: the {what} failed: another process of the run stopped or "
                               f"cannot be reached ({first[:200]}); the last checkpoint is intact") from None


class Distributed:
    """The processes of one run: which tasks this one computes and how their meta-gradients combine.

    Start a multi-process run with ``torchrun --nproc_per_node P ...`` and build the object with
    ``Distributed.from_env(device)``; a plain ``python ...`` gives a single-process object that
    never touches ``torch.distributed``. The protocol (see the module docstring):

    1. every rank samples the SAME full meta-batch from the same seeded generator, so the task
       stream does not depend on the number of processes;
    2. each rank keeps ``batch[task_share(T)]``, computes its meta-loss (the mean over its own
       tasks) and calls ``.backward()``;
    3. ``all_reduce_gradients(params, weight(T))`` scales each rank's gradient by its share of the
       tasks and sums over the ranks in one collective, so every rank holds the mean over ALL T
       tasks' meta-gradient, equal to a single process's up to floating-point summation order;
    4. every rank steps its optimizer identically; rank 0 (``is_main``) alone writes files.

    Args:
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: the number of processes.
        device: the device this process computes on.
        local_rank: the rank on this machine (default: ``rank``).

    Built directly, the object only describes a rank (useful to plan or test the task split);
    ``enabled`` is true only when a ``torch.distributed`` process group of more than one process
    exists, and only then do the collectives communicate.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 local_rank: int | None = None) -> None:
        check_positive("world_size", world_size, integer=True)
        check_positive("rank", rank, integer=True, allow_zero=True)
        if rank >= world_size:
            raise MamlabError(f"rank {rank} is out of range for world_size {world_size}; "
                              f"allowed: 0..{world_size - 1}")
        if local_rank is not None:
            check_positive("local_rank", local_rank, integer=True, allow_zero=True)
        self.rank = rank
        self.world_size = world_size
        self.local_rank = rank if local_rank is None else local_rank
        self.device = torch.device(device)
        self._owns_group = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, device: torch.device | str, *,
                 timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Distributed:
        """The process group torchrun describes in the environment, or a single process.

        With ``WORLD_SIZE`` > 1 (as ``torchrun`` sets it) this joins the group with
        ``init_process_group`` (NCCL for CUDA, gloo otherwise; ``timeout`` bounds every
        collective); a CUDA run then computes on ``cuda:{LOCAL_RANK}``, one GPU per process,
        whatever index ``device`` had. A group that already exists is reused (and left open by
        ``close``). Without ``WORLD_SIZE``, or with 1, the object is rank 0 of 1.
        """
        device = torch.device(device)
        if tdist.is_available() and tdist.is_initialized():
            rank, world = tdist.get_rank(), tdist.get_world_size()
            local = _env_int("LOCAL_RANK", rank)
            return cls(rank, world, _process_device(device, local, world), local)
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls(0, 1, device, 0)
        if not tdist.is_available():
            raise MamlabError(f"WORLD_SIZE={world} asks for {world} processes but this PyTorch build "
                              "has no torch.distributed; run a single process")
        local = _env_int("LOCAL_RANK", 0)
        device = _process_device(device, local, world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        self = cls(tdist.get_rank(), tdist.get_world_size(), device, local)
        self._owns_group = True
        return self

    # ------------------------------------------------------------------ properties
    @property
    def enabled(self) -> bool:
        """True when this object is part of a process group of more than one process."""
        return self.world_size > 1 and tdist.is_available() and tdist.is_initialized()

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and logs."""
        return self.rank == 0

    # ------------------------------------------------------------------ task split
    def task_share(self, num_tasks: int) -> slice:
        """This rank's contiguous share of a meta-batch's ``num_tasks`` tasks.

        Shares differ in size by at most one: the first ``num_tasks % world_size`` ranks get one
        task more. Every task belongs to exactly one rank.

        Raises:
            MamlabError: when there are fewer tasks than processes.
        """
        check_positive("meta_batch", num_tasks, integer=True)
        if num_tasks < self.world_size:
            raise MamlabError(
                f"meta_batch {num_tasks} cannot be split across {self.world_size} processes; "
                f"use a meta_batch of at least {self.world_size}"
            )
        base, extra = divmod(num_tasks, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def weight(self, num_tasks: int) -> float:
        """This rank's share of the tasks, ``len(task_share(num_tasks)) / num_tasks``."""
        share = self.task_share(num_tasks)
        return (share.stop - share.start) / num_tasks

    # ------------------------------------------------------------------ collectives
    def all_reduce_gradients(self, params: Iterable[torch.nn.Parameter], weight: float,
                             extras: Sequence[float] = ()) -> list[float]:
        """Sum ``weight`` × each rank's gradients over the ranks, in one collective; sum ``extras`` too.

        Each parameter's ``.grad`` is scaled by ``weight`` (this rank's ``weight(T)``), all
        gradients and the ``extras`` floats are flattened into ONE buffer (of the gradients'
        dtype: float64 stays float64), all-reduced with SUM, and the sums are written back into
        ``.grad``. A parameter whose ``.grad`` is None counts as zeros and is given a zero-filled
        gradient, so every rank ends with identical ``.grad`` on every parameter. Extras carry
        scalars to combine in the same message: a weighted meta-loss, a stop flag, a non-finite
        flag.

        With a single process there is no collective: the gradients are scaled by ``weight``
        (which is then 1.0) and the extras come back unchanged.

        Returns:
            The extras summed over the ranks, as Python floats.
        """
        params = list(params)
        extras = [float(e) for e in extras]
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise MamlabError(f"weight must be a finite number >= 0, got {weight!r}")
        if not self.enabled:
            if self.world_size > 1:
                raise MamlabError(
                    f"all_reduce_gradients needs a process group, but {self!r} has none; "
                    "build it with Distributed.from_env under torchrun"
                )
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif weight != 1.0:
                    p.grad.mul_(weight)
            return extras
        dtype = torch.float32
        if params:
            dtype = params[0].dtype
            for p in params[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
        device = params[0].device if params else self.device
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                  for p in params]
        pieces.append(torch.tensor(extras, dtype=dtype, device=device))
        buffer = torch.cat(pieces)
        n_grad = buffer.numel() - len(extras)
        if weight != 1.0:
            buffer[:n_grad].mul_(weight)
        _collective(self.rank, "meta-gradient all-reduce", tdist.all_reduce, buffer, op=tdist.ReduceOp.SUM)
        offset = 0
        for p in params:
            summed = buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = summed.to(p.dtype).clone()
            else:
                p.grad.copy_(summed)
        return buffer[n_grad:].tolist()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object); the object itself with one process."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        _collective(self.rank, "broadcast", tdist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here; nothing with one process."""
        if not self.enabled:
            return
        if self.device.type == "cuda" and tdist.get_backend() == "nccl":
            _collective(self.rank, "barrier", tdist.barrier, device_ids=[self.device.index])
        else:
            _collective(self.rank, "barrier", tdist.barrier)

    def close(self) -> None:
        """Leave the process group if ``from_env`` created it; a group found already open stays open."""
        if self._owns_group and tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Distributed(rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, device={str(self.device)!r}, enabled={self.enabled})")


def _process_device(device: torch.device, local_rank: int, world_size: int) -> torch.device:
    """The device of process ``local_rank``: ``cuda:{local_rank}`` for CUDA runs, else ``device``."""
    if device.type != "cuda" or world_size <= 1:
        return device
    count, inventory = _cuda_inventory()
    if local_rank >= count:
        raise DistributedError(f"process with LOCAL_RANK {local_rank} needs cuda:{local_rank}, which is not "
                          f"available here ({inventory}); run at most {count} processes per machine")
    return torch.device("cuda", local_rank)
