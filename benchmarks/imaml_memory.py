"""Time per meta-iteration and peak graph memory: MAML against iMAML at 5 and 20 inner steps.

The sinusoid MLP 1-40-40-1, 25 tasks, K=10 support and 10 query examples, float32, on the
execution path ``auto`` picks. Peak graph memory is the largest total size of the tensors autograd
holds for backward at one time (``saved_tensors_hooks``; it works on CPU): what grows with inner
steps when a method differentiates through them. On CUDA, ``torch.cuda.max_memory_allocated``
is printed too. Usage:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/imaml_memory.py [--iters 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mamlab import build_algorithm
from mamlab.core.memory import peak_saved_bytes
from mamlab.models import MLP
from mamlab.tasks import Sinusoid


def measure(name: str, steps: int, iters: int, device: str) -> dict[str, float]:
    """Seconds per meta-iteration and peak memory of ``name`` with ``steps`` inner steps."""
    torch.manual_seed(0)
    model = MLP(1, 1, (40, 40)).to(device)
    algo = build_algorithm(name, model, F.mse_loss, {"inner_lr": 0.01, "inner_steps": steps})
    opt = torch.optim.Adam(algo.parameters(), 1e-3)
    batch = Sinusoid().sample(25, 10, 10, torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        opt.zero_grad()
        algo.meta_loss(batch).backward()
        opt.step()

    step()  # warm-up
    saved = peak_saved_bytes(step)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out = {"s_per_iter": (time.perf_counter() - start) / iters, "graph_mib": saved / 2**20,
           "path": algo.resolved_execution()}
    if device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    """Print one row per (algorithm, inner steps) and the 20-vs-5 memory ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="timed meta-iterations per row")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    rows = {(n, s): measure(n, s, args.iters, args.device) for n in ("maml", "imaml") for s in (5, 20)}
    for (n, s), r in rows.items():
        cuda = f"  cuda peak {r['cuda_peak_mib']:.1f} MiB" if "cuda_peak_mib" in r else ""
        print(f"{n:6s} {s:2d} steps  {1000 * r['s_per_iter']:8.1f} ms/iter  graph peak "
              f"{r['graph_mib']:7.2f} MiB{cuda}  ({r['path']})")
    for n in ("maml", "imaml"):
        key = "cuda_peak_mib" if "cuda_peak_mib" in rows[(n, 5)] else "graph_mib"
        print(f"{n}: peak memory 20 steps / 5 steps = {rows[(n, 20)][key] / rows[(n, 5)][key]:.2f} ({key})")


if __name__ == "__main__":
    main()
