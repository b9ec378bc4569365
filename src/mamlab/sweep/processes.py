"""The processes of a sweep under torchrun: which runs each one trains, and where they meet.

A sweep's processes train *different* runs, each run on one process, so they must not form the
default ``torch.distributed`` process group: ``mamlab.train.train`` joins that group when it
exists and would split each run's meta-batches across the sweep's processes. ``SweepGroup``
therefore holds a gloo process group of its own (``torch.distributed.ProcessGroupGloo`` on a
prefixed copy of torchrun's rendezvous store), used only to agree on the sweep before training
(rank 0 checks the folder and broadcasts what it found) and to wait for every process after it;
each ``train`` call is given ``Distributed(0, 1, device)``, so it trains its run on this process alone.

Rank r trains and evaluates runs ``i`` with ``i % world_size == r``.
"""

from __future__ import annotations

import datetime
import os
import pickle
from typing import Any

import torch
import torch.distributed as tdist

from mamlab.errors import MamlabError
from mamlab.runtime import Distributed, DistributedError

__all__ = ["SweepGroup", "GROUP_TIMEOUT"]

#: How long a process waits for the others (one may still be training its last run).
GROUP_TIMEOUT = datetime.timedelta(days=7)



class SweepGroup:
    """This process's place in the sweep (``rank``, ``world_size``, ``local_rank``) and its collectives.

    Built with ``from_env``: a plain ``python -m mamlab sweep`` is rank 0 of 1 and never touches
    ``torch.distributed``; under torchrun (``WORLD_SIZE`` > 1) the processes rendezvous through
    torchrun's store and form their own gloo group.
    """

    def __init__(self, info: Distributed, group: Any = None) -> None:
        self.info = info
        self._group = group

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.info.rank

    @property
    def world_size(self) -> int:
        """The number of processes."""
        return self.info.world_size

    @property
    def local_rank(self) -> int:
        """The rank on this machine (the GPU index a CUDA sweep uses)."""
        return self.info.local_rank

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes ``sweep.json``, ``results.json`` and the page."""
        return self.info.is_main

    @classmethod
    def from_env(cls, timeout: datetime.timedelta = GROUP_TIMEOUT) -> SweepGroup:
        """Rank 0 of 1 without torchrun; else the processes torchrun started, joined in a gloo group."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        except ValueError:
            raise MamlabError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be an "
                              "integer") from None
        if world <= 1:
            return cls(Distributed(0, 1, "cpu", 0))
        if not tdist.is_available() or not tdist.is_gloo_available():
            raise MamlabError(f"WORLD_SIZE={world} asks for {world} processes but this PyTorch build has no "
                              "torch.distributed with gloo; run one process")
        store, rank, size = next(tdist.rendezvous("env://", timeout=datetime.timedelta(minutes=10)))
        local = int(os.environ.get("LOCAL_RANK", rank) or rank)
        group = tdist.ProcessGroupGloo(tdist.PrefixStore("mamlab-sweep/", store), rank, size, timeout)
        return cls(Distributed(rank, size, "cpu", local), group)

    def device_for(self, requested: torch.device) -> torch.device:
        """The device this process trains on: ``cuda:LOCAL_RANK`` for a CUDA sweep on many processes."""
        if requested.type != "cuda" or self.world_size <= 1:
            return requested
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise DistributedError(f"process with LOCAL_RANK {self.local_rank} needs cuda:{self.local_rank}, "
                                   f"but this machine has {count} CUDA devices; run at most {count} "
                                   "processes")
        return torch.device("cuda", self.local_rank)

    def mine(self, count: int) -> list[int]:
        """The indices ``i < count`` this process handles: ``i % world_size == rank``."""
        return [i for i in range(count) if i % self.world_size == self.rank]

    def _run(self, what: str, work: Any) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DistributedError(f"rank {self.rank}: the sweep's {what} failed: another process stopped "
                                   f"({first[:200]})") from None

    def barrier(self) -> None:
        """Wait until every process gets here (nothing with one process)."""
        if self._group is not None:
            self._run("barrier", self._group.barrier())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every process (``obj`` itself with one process)."""
        if self._group is None:
            return obj
        data = pickle.dumps(obj) if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self._run("broadcast", self._group.broadcast(size, 0))
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main and data
                  else torch.empty(int(size.item()), dtype=torch.uint8))
        if buffer.numel():
            self._run("broadcast", self._group.broadcast(buffer, 0))
        return pickle.loads(buffer.numpy().tobytes())
