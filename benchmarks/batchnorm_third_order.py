"""Third derivatives through batch-statistics BatchNorm: PyTorch's autograd against finite differences.

MAML's meta-gradient needs second derivatives (right through BatchNorm). Differentiating the
meta-gradient again needs third ones, and PyTorch's fused ``native_batch_norm`` gets those wrong
in training mode (pytorch/pytorch#186256). This prints, in float64, the directional derivative of
‖∇θ L_query(θ')‖² (θ' one SGD step from θ on the support set) computed by autograd and by central
finite differences: first for a plain ``functional_call`` MAML step without and with BatchNorm,
then through mamlab's loop, vmap and conv paths on a two-block conv net.

    python benchmarks/batchnorm_third_order.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mamlab import MAML, TaskBatch

EPS = 1e-5


def directional(f: Callable[[], torch.Tensor], theta: list[torch.Tensor], seed: int = 0) -> tuple[float, float]:
    """(autograd, central finite difference) derivative of ``f`` at ``theta`` along a random direction."""
    g = torch.Generator().manual_seed(seed)
    d = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in theta]
    grads = torch.autograd.grad(f(), theta)
    analytic = float(sum((gi * di).sum() for gi, di in zip(grads, d, strict=True)))
    with torch.no_grad():
        for p, di in zip(theta, d, strict=True):
            p.add_(EPS * di)
    plus = float(f().detach())
    with torch.no_grad():
        for p, di in zip(theta, d, strict=True):
            p.sub_(2 * EPS * di)
    minus = float(f().detach())
    with torch.no_grad():
        for p, di in zip(theta, d, strict=True):
            p.add_(EPS * di)
    return analytic, (plus - minus) / (2 * EPS)


def plain(batchnorm: bool) -> tuple[float, float]:
    """A hand-written MAML step (functional_call), no mamlab code."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(4, track_running_stats=False))
    model = nn.Sequential(*layers, nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 3)).double()
    g = torch.Generator().manual_seed(5)
    sx, sy = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    qx, qy = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())

    def f() -> torch.Tensor:
        support = F.cross_entropy(functional_call(model, dict(zip(names, theta, strict=True)), (sx,)), sy)
        grads = torch.autograd.grad(support, theta, create_graph=True)
        adapted = {n: p - 0.3 * gi for n, p, gi in zip(names, theta, grads, strict=True)}
        query = F.cross_entropy(functional_call(model, adapted, (qx,)), qy)
        return sum((gi * gi).sum() for gi in torch.autograd.grad(query, theta, create_graph=True))

    return directional(f, theta)


def through_mamlab(execution: str) -> tuple[float, float]:
    """The same quantity from ``MAML.query_losses`` on a two-block conv net with BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(5)
    batch = TaskBatch(torch.rand(2, 6, 1, 8, 8, generator=g, dtype=torch.float64),
                      torch.randint(0, 3, (2, 6), generator=g),
                      torch.rand(2, 6, 1, 8, 8, generator=g, dtype=torch.float64),
                      torch.randint(0, 3, (2, 6), generator=g))
    theta = list(model.parameters())
    maml = MAML(model, F.cross_entropy, 0.3, execution=execution)

    def f() -> torch.Tensor:
        grads = torch.autograd.grad(maml.query_losses(batch).mean(), theta, create_graph=True)
        return sum((gi * gi).sum() for gi in grads)

    return directional(f, theta)


def main() -> None:
    """Print autograd against finite differences for each case."""
    print(f"d/dt ‖∇θ L_query(θ')‖² along a random direction, float64, central differences at ε = {EPS}")
    for name, (a, fd) in (("plain MAML step, no BatchNorm", plain(False)),
                          ("plain MAML step, BatchNorm (batch statistics)", plain(True)),
                          *((f"mamlab {ex} path, 2 conv blocks with BatchNorm", through_mamlab(ex))
                            for ex in ("loop", "vmap", "conv"))):
        print(f"  {name:<48} autograd {a:>12.5f}   finite differences {fd:>12.5f}")


if __name__ == "__main__":
    main()
