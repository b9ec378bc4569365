"""Long inner loops: second-order MAML with and without ``recompute`` at 1, 5 and 20 inner steps.

Prints seconds per meta-iteration and the peak bytes of tensors autograd saves (the graph memory
that grows with inner steps; ``saved_tensors_hooks``, as ``tests/algorithms/test_recompute.py``
measures it), on the sinusoid MLP (1-40-40-1, 25 tasks, K=10) and a small Conv4 (5-way 1-shot,
28x28, hidden 16, 4 tasks, loop path). On CUDA it also prints ``torch.cuda.max_memory_allocated``
(measured in a run without the hooks). Usage:

    python benchmarks/long_inner_loops.py                  # CPU
    python benchmarks/long_inner_loops.py --device cuda --repeat 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mamlab import MAML, TaskBatch
from mamlab.core.memory import peak_saved_bytes
from mamlab.models import MLP, Conv4
from mamlab.tasks import Sinusoid


def make(case: str, device: torch.device) -> tuple[torch.nn.Module, TaskBatch, float, Callable]:
    """The model, one meta-batch, the inner step size and the loss of ``case``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if case == "sinusoid":
        return MLP(1, 1, (40, 40)).to(device), Sinusoid().sample(25, 10, 10, g).to(device), 0.01, F.mse_loss
    ways, tasks = 5, 4
    x = torch.randn(tasks, 4 * ways, 1, 28, 28, generator=g)  # 1 shot + 3 queries per class
    y = torch.arange(ways).repeat(tasks, 4)
    batch = TaskBatch(x[:, :ways], y[:, :ways], x[:, ways:], y[:, ways:]).to(device)
    return Conv4(ways, hidden=16).to(device), batch, 0.4, F.cross_entropy




def main() -> None:
    """Run every case, step count and setting; print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="timed meta-iterations per cell")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    head = f"{'case':9} {'steps':>5} {'recompute':>9} {'s/iter':>9} {'saved MiB':>10}"
    print(head + (f" {'cuda max MiB':>12}" if cuda else ""))
    for case in ("sinusoid", "conv4"):
        for steps in args.steps:
            for recompute in (False, True):
                model, batch, lr, loss_fn = make(case, device)
                algo = MAML(model, loss_fn, lr, steps, recompute=recompute)

                def step(algo: MAML = algo, batch: TaskBatch = batch) -> None:
                    algo.model.zero_grad()
                    algo.meta_loss(batch).backward()

                step()  # warm-up
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                start = time.perf_counter()
                for _ in range(args.repeat):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                    peak_cuda = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                seconds = (time.perf_counter() - start) / args.repeat
                saved = peak_saved_bytes(step) / 2**20
                line = f"{case:9} {steps:5d} {str(recompute):>9} {seconds:9.4f} {saved:10.2f}"
                print(line + (f" {peak_cuda:12.2f}" if cuda else ""), flush=True)


if __name__ == "__main__":
    main()
