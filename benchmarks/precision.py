"""How far the meta-gradient moves under each precision: ‖g − g64‖ / ‖g64‖ against float64.

For each case and seed the same float32 parameters and meta-batch are cast to float64 for the
reference (always on the CPU) and run under ``mamlab.runtime.precision_context`` for fp32, tf32
and bf16 on ``--device``; parameters and gradients stay float32, only the arithmetic changes.
Prints the median relative error over the seeds (and the range). TF32 only exists on CUDA
(Ampere or newer): on the CPU tf32 computes exactly what fp32 does. Usage:

    python benchmarks/precision.py                  # CPU
    python benchmarks/precision.py --device cuda    # on a GPU machine
    python benchmarks/precision.py --case conv4 --seeds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from mamlab import MAML, TaskBatch
from mamlab.models import MLP, Conv4
from mamlab.runtime import PRECISIONS, precision_context, resolve_device
from mamlab.tasks import Sinusoid

CASES = {
    "sinusoid": "sinusoid MLP 1-40-40-1, 25 tasks, K=10, 10 query, 1 step α=0.01, 2nd order",
    "conv4": "Conv4(hidden=32) 5-way 1-shot 5 query, 4 tasks, 1 step α=0.4, 2nd order",
}


def make_case(case: str, seed: int) -> tuple[torch.nn.Module, MAML, TaskBatch]:
    """The float32 model, its MAML, and a float32 meta-batch on the CPU for ``case`` and ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if case == "sinusoid":
        model = MLP(1, 1, hidden=(40, 40))
        batch = Sinusoid().sample(25, 10, 10, generator)
        return model, MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=1), batch
    ways, shots, queries, tasks = 5, 1, 5, 4
    model = Conv4(ways, hidden=32)

    def images(per_class: int) -> torch.Tensor:  # binary, stroke-sparse, Omniglot-like
        return torch.bernoulli(torch.full((tasks, ways * per_class, 1, 28, 28), 0.2), generator=generator)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(ways).repeat_interleave(per_class).expand(tasks, -1).clone()

    batch = TaskBatch(images(shots), labels(shots), images(queries), labels(queries))
    return model, MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=1), batch


def meta_gradient(model: torch.nn.Module, maml: MAML, batch: TaskBatch, dtype: torch.dtype,
                  device: torch.device, precision: str | None) -> torch.Tensor:
    """The flattened meta-gradient, as float64 on the CPU, of a copy of ``model`` cast to ``dtype``."""
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    m = MAML(model, maml.loss_fn, inner_lr=maml.inner_lr, inner_steps=maml.inner_steps)
    batch = batch.to(device=device, dtype=dtype)
    scope = precision_context(precision, device) if precision else torch.autograd.set_grad_enabled(True)
    with scope:
        m.meta_loss(batch).backward()
    assert all(p.grad.dtype == dtype for p in model.parameters())
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach().to("cpu", torch.float64)


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--seeds", type=int, default=3, help="random seeds per case (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}); torch {torch.__version__}; reference: float64 on cpu; "
          f"median of {args.seeds} seeds [min, max]")
    if device.type != "cuda":
        print("note: TF32 exists only on CUDA (Ampere or newer); on this device tf32 computes exactly what fp32 does")
    print(f"{'case':<10}" + "".join(f"{p:>30}" for p in PRECISIONS))
    cases = list(CASES) if args.case == "all" else [args.case]
    for case in cases:
        errors: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        start = time.perf_counter()
        for seed in range(args.seeds):
            model, maml, batch = make_case(case, seed)
            g64 = meta_gradient(model, maml, batch, torch.float64, torch.device("cpu"), None)
            for p in PRECISIONS:
                g = meta_gradient(model, maml, batch, torch.float32, device, p)
                errors[p].append(((g - g64).norm() / g64.norm()).item())
        cells = [f"{statistics.median(e):.2e} [{min(e):.1e}, {max(e):.1e}]" for e in errors.values()]
        print(f"{case:<10}" + "".join(f"{c:>30}" for c in cells))
        print(f"  {CASES[case]}; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
