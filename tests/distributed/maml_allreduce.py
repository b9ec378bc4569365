"""Run under torchrun by tests/test_runtime.py: a 2-process MAML meta-gradient against one process's.

Every rank samples the same 5-task sinusoid meta-batch in float64, computes the single-process
meta-gradient of the whole batch as the reference, then its own share's meta-gradient, all-reduced
with ``Distributed.all_reduce_gradients``. Rank 0 gathers every rank's findings and writes them to
the JSON file named on the command line.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as tdist
import torch.nn.functional as F

import mamlab
from mamlab import MAML, MamlabError, TaskBatch
from mamlab.runtime import Distributed


def flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    with Distributed.from_env(torch.device("cpu")) as dist:
        torch.manual_seed(0)
        model = mamlab.models.MLP(1, 1, hidden=(40, 40)).double()
        params = list(model.parameters())
        maml = MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=2)
        generator = torch.Generator().manual_seed(1234)
        batch = mamlab.tasks.Sinusoid().sample(5, 10, 10, generator).to(dtype=torch.float64)

        # The reference: one process, the whole meta-batch.
        model.zero_grad(set_to_none=True)
        full_loss = maml.meta_loss(batch)
        full_loss.backward()
        reference = [p.grad.clone() for p in params]

        # This rank's share, then the all-reduce.
        model.zero_grad(set_to_none=True)
        share = dist.task_share(batch.num_tasks)
        sub = TaskBatch(batch.support_x[share], batch.support_y[share],
                        batch.query_x[share], batch.query_y[share])
        loss = maml.meta_loss(sub)
        loss.backward()
        w = dist.weight(batch.num_tasks)
        # A parameter outside the model: no .grad on rank 0, ones on the others.
        orphan = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        if dist.rank != 0:
            orphan.grad = torch.ones(3, dtype=torch.float64)
        extras = dist.all_reduce_gradients(params + [orphan], w, [w * loss.item(), float(dist.rank + 1), 0.5])

        rel = max(((p.grad - r).norm() / r.norm()).item() for p, r in zip(params, reference, strict=True))
        mine = flat_grads(params + [orphan])
        rank0 = mine.clone()
        tdist.broadcast(rank0, src=0)
        try:
            dist.task_share(1)
            small_error = None
        except MamlabError as e:
            small_error = str(e)
        finding = {
            "rank": dist.rank,
            "world_size": dist.world_size,
            "enabled": dist.enabled,
            "share": [share.start, share.stop],
            "weight": w,
            "max_rel_diff": rel,
            "identical_to_rank0": bool(torch.equal(mine, rank0)),
            "orphan_grad": orphan.grad.tolist(),
            "extras": extras,
            "full_loss": full_loss.item(),
            "small_error": small_error,
            "broadcast": dist.broadcast_object({"from": dist.rank}),
        }
        findings = [None] * dist.world_size
        tdist.all_gather_object(findings, finding)
        dist.barrier()
        if dist.is_main:
            with open(out_path, "w") as f:
                json.dump(findings, f)


if __name__ == "__main__":
    main(sys.argv[1])
