"""ANIL: only the head adapts; its meta-gradient against a hand-written per-task loop."""

import pytest
import torch
import torch.nn.functional as F

from mamlab import ANIL
from mamlab.algorithms import head_parameters
from mamlab.models import MLP, Conv4
from mamlab.tasks import Sinusoid

pytestmark = pytest.mark.usefixtures("float64")


def test_the_head_is_the_last_layer() -> None:
    assert head_parameters(MLP(1, 1, hidden=(40, 40))) == ["4.weight", "4.bias"]
    assert head_parameters(Conv4(5, hidden=8)) == ["head.weight", "head.bias"]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
def test_meta_gradient_equals_a_per_task_loop(first_order: bool, execution: str) -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8, 8))
    b = Sinusoid().sample(3, 5, 6, torch.Generator().manual_seed(2)).to(dtype=torch.float64)
    alpha, steps = 0.03, 2
    anil = ANIL(model, F.mse_loss, alpha, steps, first_order=first_order, execution=execution)
    anil.meta_loss(b).backward()
    got = [p.grad.clone() for p in model.parameters()]

    # independent: features of the body, then a linear head adapted by hand, per task
    w0, b0, w1, b1, wh, bh = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

    def body(x):
        return torch.relu(torch.relu(x @ w0.t() + b0) @ w1.t() + b1)

    total = 0.0
    for i in range(b.num_tasks):
        w, c = wh, bh
        for _ in range(steps):
            loss = F.mse_loss(body(b.support_x[i]) @ w.t() + c, b.support_y[i])
            gw, gc = torch.autograd.grad(loss, (w, c), create_graph=not first_order)
            w, c = w - alpha * gw, c - alpha * gc
        total = total + F.mse_loss(body(b.query_x[i]) @ w.t() + c, b.query_y[i]) / b.num_tasks
    want = torch.autograd.grad(total, (w0, b0, w1, b1, wh, bh))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_adapt_leaves_the_body_alone() -> None:
    model = MLP(1, 1, hidden=(8,))
    b = Sinusoid().sample(2, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    anil = ANIL(model, F.mse_loss, 0.1, 3)
    adapted = anil.adapt(b.support_x, b.support_y)
    assert set(adapted) == {"2.weight", "2.bias"}
    assert anil.options()["head"] == ["2.weight", "2.bias"]
