"""MAML meta-gradients against independent computations: a per-task loop, closed forms, finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from references import ConvBN, convbn_by_hand, image_batch, mlp_forward
from torch import nn

from mamlab import MAML, MamlabError, TaskBatch
from mamlab.algorithms.maml import default_execution
from mamlab.models import MLP
from mamlab.tasks import LinearClassification, LinearRegression, Sinusoid

pytestmark = pytest.mark.usefixtures("float64")


# ---------------------------------------------------------------- independent references


def convbn_forward(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ConvBN by hand, p in ``ConvBN().parameters()`` order."""
    c1w, c1b, b1w, b1b, c2w, c2b, b2w, b2b, hw, hb = p
    return convbn_by_hand([c1w, c1b, c2w, c2b, hw, hb], [b1w, b1b, b2w, b2b], x)


def loop_meta_grad(fwd, params: list[torch.Tensor], loss_fn, batch: TaskBatch, lr: float, steps: int,
                   first_order: bool, adapt_mask: list[bool] | None = None) -> list[torch.Tensor]:
    """The plain per-task loop with torch.autograd.grad(create_graph=True)."""
    mask = adapt_mask or [True] * len(params)
    total = 0.0
    for i in range(batch.num_tasks):
        p = list(params)
        for _ in range(steps):
            loss = loss_fn(fwd(p, batch.support_x[i]), batch.support_y[i])
            adapted = [q for q, m in zip(p, mask, strict=True) if m]
            g = iter(torch.autograd.grad(loss, adapted, create_graph=not first_order))
            p = [q - lr * next(g) if m else q for q, m in zip(p, mask, strict=True)]
        total = total + loss_fn(fwd(p, batch.query_x[i]), batch.query_y[i])
    return list(torch.autograd.grad(total / batch.num_tasks, params))


def maml_grad(maml: MAML, batch: TaskBatch) -> list[torch.Tensor]:
    maml.model.zero_grad()
    maml.meta_loss(batch).backward()
    return [p.grad.clone() for p in maml.model.parameters()]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-9,
                 atol: float = 1e-11) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- 1. against a per-task loop
@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_mlp_meta_gradient_matches_per_task_loop(execution: str, first_order: bool, steps: int) -> None:
    torch.manual_seed(steps)
    model = MLP(1, 1, hidden=(16, 16))
    batch = Sinusoid().sample(4, 5, 6, torch.Generator().manual_seed(1)).to(dtype=torch.float64)
    maml = MAML(model, F.mse_loss, inner_lr=0.02, inner_steps=steps, first_order=first_order,
                execution=execution)
    expected = loop_meta_grad(mlp_forward, list(model.parameters()), F.mse_loss, batch, 0.02, steps,
                              first_order)
    assert_close(maml_grad(maml, batch), expected)


@pytest.mark.parametrize("execution", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_conv_batchnorm_meta_gradient_matches_per_task_loop(execution: str, first_order: bool,
                                                             steps: int) -> None:
    torch.manual_seed(10 + steps)
    model = ConvBN()
    batch = image_batch(seed=steps)
    maml = MAML(model, F.cross_entropy, inner_lr=0.1, inner_steps=steps, first_order=first_order,
                execution=execution)
    expected = loop_meta_grad(convbn_forward, list(model.parameters()), F.cross_entropy, batch, 0.1, steps,
                              first_order)
    assert_close(maml_grad(maml, batch), expected, rtol=1e-7, atol=1e-9)


def test_conv4_auto_path_matches_loop_reference() -> None:
    from mamlab.models import Conv4

    torch.manual_seed(0)
    model = Conv4(ways=3, hidden=4, image_size=16)
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.randn(2, 3, 1, 16, 16, generator=g), torch.tensor([[0, 1, 2]] * 2),
                      torch.randn(2, 6, 1, 16, 16, generator=g), torch.tensor([[0, 1, 2, 0, 1, 2]] * 2))
    names = [k for k, _ in model.named_parameters()]

    def fwd(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, p, strict=True)), (x,))

    maml = MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=2)
    assert maml.resolved_execution() == "conv"
    expected = loop_meta_grad(fwd, list(model.parameters()), F.cross_entropy, batch, 0.4, 2, False)
    assert_close(maml_grad(maml, batch), expected, rtol=1e-7, atol=1e-9)


def test_head_only_adaptation_anil_matches_loop() -> None:
    torch.manual_seed(3)
    model = MLP(1, 1, hidden=(8, 8))
    batch = Sinusoid().sample(3, 5, 5, torch.Generator().manual_seed(2)).to(dtype=torch.float64)
    head = ["4.weight", "4.bias"]
    mask = [k in head for k, _ in model.named_parameters()]
    expected = loop_meta_grad(mlp_forward, list(model.parameters()), F.mse_loss, batch, 0.05, 3, False, mask)
    for execution in ["batched", "vmap", "loop"]:
        maml = MAML(model, F.mse_loss, 0.05, 3, inner_params=head, execution=execution)
        assert_close(maml_grad(maml, batch), expected)


def test_task_chunks_give_the_same_gradient() -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8,))
    batch = Sinusoid().sample(7, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    whole = maml_grad(MAML(model, F.mse_loss, 0.01, 2, execution="vmap"), batch)
    chunked = maml_grad(MAML(model, F.mse_loss, 0.01, 2, execution="vmap", task_chunk=3), batch)
    assert_close(whole, chunked)


def test_meta_loss_value_equals_mean_query_loss() -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8,))
    batch = Sinusoid().sample(5, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    maml = MAML(model, F.mse_loss, 0.01, 2)
    per_task = maml.query_losses(batch)
    assert per_task.shape == (5,)
    torch.testing.assert_close(maml.meta_loss(batch), per_task.mean())
    with torch.no_grad():
        torch.testing.assert_close(maml.meta_loss(batch), per_task.mean().detach())


# ---------------------------------------------------------------- 2. closed forms for linear models
def linear_model(dim: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP(dim, 1, hidden=(), bias=False)
    nn.init.normal_(model[0].weight)
    return model


@pytest.mark.parametrize("first_order", [False, True])
def test_linear_regression_meta_gradient_closed_form(first_order: bool) -> None:
    dim, alpha = 4, 0.05
    model = linear_model(dim)
    batch = LinearRegression(dim=dim, noise=0.1).sample(6, 8, 7, torch.Generator().manual_seed(0))
    batch = batch.to(dtype=torch.float64)
    theta = model[0].weight.detach().reshape(dim)
    expected = torch.zeros(dim)
    for i in range(batch.num_tasks):
        xs, ys = batch.support_x[i], batch.support_y[i].reshape(-1)
        xq, yq = batch.query_x[i], batch.query_y[i].reshape(-1)
        k, m = xs.shape[0], xq.shape[0]
        theta_i = theta - alpha * (2 / k) * xs.t() @ (xs @ theta - ys)
        query_grad = (2 / m) * xq.t() @ (xq @ theta_i - yq)
        jacobian = torch.eye(dim) - (2 * alpha / k) * xs.t() @ xs
        expected += query_grad if first_order else jacobian @ query_grad
    expected /= batch.num_tasks
    for execution in ["batched", "vmap", "loop"]:
        maml = MAML(model, F.mse_loss, alpha, 1, first_order=first_order, execution=execution)
        torch.testing.assert_close(maml_grad(maml, batch)[0].reshape(dim), expected)


def test_linear_classification_meta_gradient_closed_form() -> None:
    dim, alpha = 3, 0.3
    model = linear_model(dim, seed=1)
    batch = LinearClassification(dim=dim).sample(5, 10, 10, torch.Generator().manual_seed(1))
    batch = batch.to(dtype=torch.float64)
    theta = model[0].weight.detach().reshape(dim)
    expected = torch.zeros(dim)
    for i in range(batch.num_tasks):
        xs, ys = batch.support_x[i], batch.support_y[i].reshape(-1)
        xq, yq = batch.query_x[i], batch.query_y[i].reshape(-1)
        ps = torch.sigmoid(xs @ theta)
        theta_i = theta - alpha * xs.t() @ (ps - ys) / xs.shape[0]
        hessian = xs.t() @ torch.diag(ps * (1 - ps)) @ xs / xs.shape[0]
        query_grad = xq.t() @ (torch.sigmoid(xq @ theta_i) - yq) / xq.shape[0]
        expected += (torch.eye(dim) - alpha * hessian) @ query_grad
    expected /= batch.num_tasks
    maml = MAML(model, F.binary_cross_entropy_with_logits, alpha, 1)
    torch.testing.assert_close(maml_grad(maml, batch)[0].reshape(dim), expected)


def test_meta_training_converges_to_closed_form_minimizer() -> None:
    """On a fixed set of linear tasks the one-step MAML objective is quadratic: θ* solves a linear system."""
    dim, alpha, steps = 3, 0.1, 2
    batch = LinearRegression(dim=dim, weight_mean=1.5, noise=0.2).sample(
        8, 6, 6, torch.Generator().manual_seed(5)).to(dtype=torch.float64)
    # θ'_i = A_i θ + b_i after `steps` steps; the query loss is quadratic in θ.
    lhs, rhs = torch.zeros(dim, dim), torch.zeros(dim)
    for i in range(batch.num_tasks):
        xs, ys = batch.support_x[i], batch.support_y[i].reshape(-1)
        xq, yq = batch.query_x[i], batch.query_y[i].reshape(-1)
        k = xs.shape[0]
        step_a = torch.eye(dim) - (2 * alpha / k) * xs.t() @ xs
        step_b = (2 * alpha / k) * xs.t() @ ys
        a, b = torch.eye(dim), torch.zeros(dim)
        for _ in range(steps):
            a, b = step_a @ a, step_a @ b + step_b
        lhs += a.t() @ xq.t() @ xq @ a
        rhs += a.t() @ xq.t() @ (yq - xq @ b)
    theta_star = torch.linalg.solve(lhs, rhs)

    model = linear_model(dim, seed=2)
    maml = MAML(model, F.mse_loss, alpha, steps)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for it in range(1500):
        if it == 1000:
            opt.param_groups[0]["lr"] = 0.005
        opt.zero_grad()
        maml.meta_loss(batch).backward()
        opt.step()
    torch.testing.assert_close(model[0].weight.detach().reshape(dim), theta_star, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- 3. finite differences
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_finite_differences(first_order: bool) -> None:
    torch.manual_seed(4)
    model = MLP(1, 1, hidden=(3,))
    nn.init.normal_(model[0].bias)  # keep ReLUs away from their kinks
    batch = Sinusoid().sample(3, 4, 4, torch.Generator().manual_seed(4)).to(dtype=torch.float64)
    maml = MAML(model, F.mse_loss, inner_lr=0.05, inner_steps=2, first_order=first_order)
    grads = torch.cat([g.reshape(-1) for g in maml_grad(maml, batch)])
    eps, numeric = 1e-6, []
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    with torch.no_grad():
        for j in range(flat.numel()):
            vals = []
            for sign in (1, -1):
                shifted = flat.clone()
                shifted[j] += sign * eps
                torch.nn.utils.vector_to_parameters(shifted, model.parameters())
                vals.append(maml.meta_loss(batch))
            numeric.append((vals[0] - vals[1]) / (2 * eps))
        torch.nn.utils.vector_to_parameters(flat, model.parameters())
    numeric_t = torch.stack(numeric)
    if first_order:  # first order drops real terms: it must NOT match the true gradient here
        assert not torch.allclose(grads, numeric_t, rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(grads, numeric_t, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- adapt / predict
@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
def test_adapt_and_predict_match_manual_sgd(execution: str) -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8,))
    batch = Sinusoid().sample(3, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    maml = MAML(model, F.mse_loss, 0.01, 1, execution=execution)
    params = maml.adapt(batch.support_x, batch.support_y, steps=4, lr=0.03)
    assert all(p.shape[0] == 3 and not p.requires_grad for p in params.values())
    preds = maml.predict(params, batch.query_x)
    for i in range(3):
        p = [q.detach().requires_grad_() for q in model.parameters()]
        for _ in range(4):
            g = torch.autograd.grad(F.mse_loss(mlp_forward(p, batch.support_x[i]), batch.support_y[i]), p)
            p = [(q - 0.03 * gq).detach().requires_grad_() for q, gq in zip(p, g, strict=True)]
        torch.testing.assert_close(preds[i], mlp_forward(p, batch.query_x[i]).detach())
    zero = maml.adapt(batch.support_x, batch.support_y, steps=0)
    for (name, p), q in zip(model.named_parameters(), zero.values(), strict=True):
        torch.testing.assert_close(q, p.detach().expand_as(q), msg=name)
    assert all(p.grad is None for p in model.parameters())


def test_first_order_fills_grad() -> None:
    model = MLP(1, 1, hidden=(8,))
    batch = Sinusoid().sample(2, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    MAML(model, F.mse_loss, 0.01, first_order=True).meta_loss(batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_tune_picks_a_path_and_keeps_grads() -> None:
    model = MLP(1, 1, hidden=(8,))
    batch = Sinusoid().sample(2, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    maml = MAML(model, F.mse_loss, 0.01)
    times = maml.tune(batch, repeats=1)
    assert set(times) == {"batched", "vmap", "loop"} and maml.execution in times
    assert all(p.grad is None for p in model.parameters())


def test_default_execution_rule() -> None:
    from mamlab.models import Conv4

    assert default_execution(MLP(1, 1)) == "batched"
    assert default_execution(Conv4(5)) == "conv"
    assert default_execution(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == "loop"

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).sin()

    assert default_execution(Custom()) == "vmap"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"inner_lr": 0.0}, "inner_lr must be a number > 0, got 0.0"),
    ({"inner_lr": -1}, "inner_lr must be a number > 0, got -1"),
    ({"inner_steps": 0}, "inner_steps must be an integer > 0, got 0"),
    ({"inner_steps": 1.5}, "inner_steps must be an integer > 0, got 1.5"),
    ({"execution": "gpu"}, "unknown execution 'gpu'; allowed: auto, batched, vmap, loop"),
    ({"inner_params": ["nope"]}, "inner_params \\['nope'\\] are not trainable"),
])
def test_bad_arguments_raise_one_line_errors(kwargs: dict, match: str) -> None:
    args = {"inner_lr": 0.1, **kwargs}
    with pytest.raises(MamlabError, match=match) as err:
        MAML(MLP(1, 1), F.mse_loss, **args)
    assert "\n" not in str(err.value)


def test_batched_refused_for_unsupported_model() -> None:
    with pytest.raises(MamlabError, match="execution 'batched' needs"):
        MAML(nn.Sequential(nn.Conv2d(1, 1, 3)), F.mse_loss, 0.1, execution="batched")


def test_bad_batches_raise() -> None:
    x = torch.zeros(2, 3, 1)
    with pytest.raises(MamlabError, match="support_x has 3 examples per task but support_y has 4"):
        TaskBatch(x, torch.zeros(2, 4, 1), x, x)
    with pytest.raises(MamlabError, match="share the task dimension"):
        TaskBatch(x, x, torch.zeros(3, 3, 1), torch.zeros(3, 3, 1))
    with pytest.raises(MamlabError, match="example shape"):
        TaskBatch(x, x, torch.zeros(2, 3, 2), torch.zeros(2, 3, 1))
    with pytest.raises(MamlabError, match="must have shape \\[tasks, examples, ...\\]"):
        TaskBatch(torch.zeros(3), x, x, x)
    maml = MAML(MLP(1, 1), F.mse_loss, 0.1)
    with pytest.raises(MamlabError, match="steps must be an integer >= 0, got -1"):
        maml.adapt(x, x, steps=-1)
    with pytest.raises(MamlabError, match="lr must be a number > 0"):
        maml.adapt(x, x, lr=0)
    with pytest.raises(MamlabError, match="expected a mamlab.TaskBatch"):
        maml.meta_loss((x, x, x, x))
