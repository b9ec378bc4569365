"""iMAML against independent computations: closed forms, a dense Hessian solve, saved-graph memory, a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mamlab import MAML, MamlabError, TaskBatch, build_algorithm, iMAML
from mamlab.algorithms.imaml import conjugate_gradient
from mamlab.config import resolve_config
from mamlab.core.memory import peak_saved_bytes
from mamlab.evaluate import evaluate_model
from mamlab.models import MLP
from mamlab.tasks import LinearRegression, Sinusoid
from mamlab.train import load_run, train

pytestmark = pytest.mark.usefixtures("float64")

PATHS = [("batched", None), ("vmap", None), ("vmap", 2), ("loop", None)]


def imaml_grad(algo: iMAML, batch: TaskBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
    algo.model.zero_grad()
    loss = algo.meta_loss(batch)
    loss.backward()
    return [p.grad.clone() for p in algo.model.parameters()], loss.detach()


def proximal_gd(model: torch.nn.Module, theta: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                lr: float, lam: float, steps: int) -> list[torch.Tensor]:
    """The regularised inner loop by hand: φ ← φ − α(∇L(φ) + λ(φ − θ)), one task, from θ."""
    names = [n for n, _ in model.named_parameters()]
    phi = [t.detach().clone() for t in theta]
    for _ in range(steps):
        phi = [p.requires_grad_(True) for p in phi]
        loss = F.mse_loss(functional_call(model, dict(zip(names, phi, strict=True)), (x,)), y)
        grads = torch.autograd.grad(loss, phi)
        phi = [(p - lr * (g + lam * (p - t))).detach() for p, g, t in zip(phi, grads, theta, strict=True)]
    return phi


# ---------------------------------------------------------------- 1. linear regression, closed form
@pytest.mark.parametrize(("execution", "chunk"), PATHS)
def test_linear_regression_meta_gradient_closed_form(execution: str, chunk: int | None) -> None:
    """φ* = (2XᵀX/K + λI)⁻¹(2XᵀY/K + λθ) and g = (I + H/λ)⁻¹ ∇L_query(φ*), H = 2XᵀX/K, per task."""
    dim, lam, lr = 4, 2.0, 0.1
    torch.manual_seed(0)
    model = MLP(dim, 1, hidden=(), bias=False)
    batch = LinearRegression(dim=dim, weight_mean=1.0, noise=0.1).sample(
        5, 10, 8, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    theta = model[0].weight.detach().reshape(dim)
    expected, query_losses = torch.zeros(dim), []
    eye = torch.eye(dim)
    for i in range(batch.num_tasks):
        xs, ys = batch.support_x[i], batch.support_y[i].reshape(-1)
        xq, yq = batch.query_x[i], batch.query_y[i].reshape(-1)
        k, m = xs.shape[0], xq.shape[0]
        hessian = 2 * xs.t() @ xs / k
        phi = torch.linalg.solve(hessian + lam * eye, 2 * xs.t() @ ys / k + lam * theta)
        query_grad = 2 * xq.t() @ (xq @ phi - yq) / m
        expected += torch.linalg.solve(eye + hessian / lam, query_grad)
        query_losses.append(((xq @ phi - yq) ** 2).mean())
    expected /= batch.num_tasks
    # inner contraction ≤ 1 − α λ = 0.8 per step: 300 steps put φ_i at φ* to ~1e-29
    algo = iMAML(model, F.mse_loss, inner_lr=lr, inner_steps=300, lam=lam, cg_steps=dim,
                 execution=execution, task_chunk=chunk)
    (got,), loss = imaml_grad(algo, batch)
    assert torch.linalg.norm(got.reshape(dim) - expected) <= 1e-8 * torch.linalg.norm(expected)
    torch.testing.assert_close(loss, torch.stack(query_losses).mean(), rtol=1e-12, atol=0)


def test_few_cg_steps_are_not_the_solution() -> None:
    """The CG iterations matter: one step is not the solve (the closed-form test uses ``dim``)."""
    dim = 4
    torch.manual_seed(0)
    model = MLP(dim, 1, hidden=(), bias=False)
    batch = LinearRegression(dim=dim).sample(3, 10, 8, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    full = imaml_grad(iMAML(model, F.mse_loss, 0.1, 50, lam=0.5, cg_steps=dim), batch)[0][0]
    one = imaml_grad(iMAML(model, F.mse_loss, 0.1, 50, lam=0.5, cg_steps=1), batch)[0][0]
    assert torch.linalg.norm(full - one) > 1e-3 * torch.linalg.norm(full)


# ---------------------------------------------------------------- 2. CG against a dense solve
@pytest.mark.parametrize(("execution", "chunk"), PATHS)
def test_cg_matches_dense_solve_on_small_mlp(execution: str, chunk: int | None) -> None:
    """H_i built explicitly (torch.autograd.functional.hessian) at the hand-computed φ_i; dense solve."""
    lam, lr, steps = 4.0, 0.05, 7
    torch.manual_seed(3)
    model = MLP(1, 1, hidden=(3,))  # 10 parameters
    batch = Sinusoid().sample(3, 6, 5, torch.Generator().manual_seed(1)).to(dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = [p.detach() for p in model.parameters()]
    n = sum(p.numel() for p in theta)

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(v, [s.numel() for s in shapes])
        return {k: t.reshape(s) for k, t, s in zip(names, parts, shapes, strict=True)}

    expected = torch.zeros(n)
    for i in range(batch.num_tasks):
        phi = torch.cat([p.reshape(-1) for p in proximal_gd(model, theta, batch.support_x[i],
                                                             batch.support_y[i], lr, lam, steps)])

        def support(v: torch.Tensor, i: int = i) -> torch.Tensor:
            return F.mse_loss(functional_call(model, unflat(v), (batch.support_x[i],)), batch.support_y[i])

        def query(v: torch.Tensor, i: int = i) -> torch.Tensor:
            return F.mse_loss(functional_call(model, unflat(v), (batch.query_x[i],)), batch.query_y[i])

        hessian = torch.autograd.functional.hessian(support, phi)
        system = torch.eye(n) + hessian / lam
        assert torch.linalg.eigvalsh(system).min() > 0  # well posed for CG
        query_grad = torch.autograd.functional.jacobian(query, phi)
        expected += torch.linalg.solve(system, query_grad)
    expected /= batch.num_tasks
    algo = iMAML(model, F.mse_loss, inner_lr=lr, inner_steps=steps, lam=lam, cg_steps=n,
                 execution=execution, task_chunk=chunk)
    got = torch.cat([g.reshape(-1) for g in imaml_grad(algo, batch)[0]])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_conjugate_gradient_solves_each_task_alone() -> None:
    """Batched CG: per-task step sizes solve per-task systems A_i x_i = b_i (dense solve as reference)."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 5, 5, generator=g)
    a = m @ m.transpose(1, 2) + 0.5 * torch.eye(5)
    b = {"w": torch.randn(3, 5, generator=g)}
    x = conjugate_gradient(lambda v: {"w": torch.einsum("tij,tj->ti", a, v["w"])}, b, 5, batched=True)
    torch.testing.assert_close(x["w"], torch.linalg.solve(a, b["w"]), rtol=1e-9, atol=1e-10)
    one = conjugate_gradient(lambda v: {"w": a[1] @ v["w"]}, {"w": b["w"][1]}, 5, batched=False)
    torch.testing.assert_close(one["w"], x["w"][1], rtol=1e-9, atol=1e-10)
    zero = conjugate_gradient(lambda v: {"w": v["w"]}, {"w": torch.zeros(2, 3)}, 3, batched=True)
    assert torch.equal(zero["w"], torch.zeros(2, 3))  # a zero residual stops, no 0/0


# ---------------------------------------------------------------- 3. memory does not grow with steps


def peak_saved(name: str, steps: int, execution: str) -> int:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(40, 40))
    batch = Sinusoid().sample(4, 10, 10, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    algo = build_algorithm(name, model, F.mse_loss, {"inner_lr": 0.01, "inner_steps": steps},
                           execution=execution)
    return peak_saved_bytes(lambda: algo.meta_loss(batch).backward())


@pytest.mark.parametrize("execution", ["batched", "loop"])
def test_peak_graph_memory_does_not_grow_with_inner_steps(execution: str) -> None:
    imaml5, imaml20 = peak_saved("imaml", 5, execution), peak_saved("imaml", 20, execution)
    assert 0 < imaml20 <= 1.2 * imaml5
    # the measure sees a graph through the inner steps when there is one: MAML's grows ~linearly
    maml5, maml20 = peak_saved("maml", 5, execution), peak_saved("maml", 20, execution)
    assert maml20 > 3 * maml5


# ---------------------------------------------------------------- adaptation at test time
@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
def test_adapt_keeps_the_proximal_term(execution: str) -> None:
    lam, lr, steps = 3.0, 0.05, 6
    torch.manual_seed(2)
    model = MLP(1, 1, hidden=(8,))
    batch = Sinusoid().sample(3, 5, 5, torch.Generator().manual_seed(2)).to(dtype=torch.float64)
    algo = iMAML(model, F.mse_loss, lr, steps, lam=lam, execution=execution)
    theta = [p.detach() for p in model.parameters()]
    adapted = algo.adapt(batch.support_x, batch.support_y)
    for i in range(batch.num_tasks):
        want = proximal_gd(model, theta, batch.support_x[i], batch.support_y[i], lr, lam, steps)
        for (name, _), w in zip(model.named_parameters(), want, strict=True):
            torch.testing.assert_close(adapted[name][i], w, rtol=1e-12, atol=1e-14)
    # in pieces (as evaluate_model adapts) equals at once: the anchor stays θ
    first = algo.adapt(batch.support_x, batch.support_y, steps=2)
    rest = algo.adapt(batch.support_x, batch.support_y, steps=steps - 2, start=first)
    for k in adapted:
        torch.testing.assert_close(rest[k], adapted[k], rtol=1e-12, atol=1e-14)
    pred = algo.predict(adapted, batch.query_x)
    assert pred.shape == batch.query_y.shape


# ---------------------------------------------------------------- 4. through the registry, end to end
SMALL = {"iterations": 20, "meta_batch": 4, "shots": 5, "queries": 5, "hidden": [8], "val_every": 10,
         "checkpoint_every": 10, "val_tasks": 5, "inner_lr": 0.02, "inner_steps": 3, "lam": 1.5,
         "cg_steps": 4}


def test_trained_saved_loaded_and_evaluated(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = resolve_config("sinusoid", None, SMALL, algorithm="imaml")
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    loaded = load_run(tmp_path / "run")
    assert isinstance(loaded.algorithm, iMAML)
    assert loaded.algorithm.options() == {"inner_lr": 0.02, "inner_steps": 3, "lam": 1.5, "cg_steps": 4}
    for a, b in zip(loaded.algorithm.parameters(), run.algorithm.parameters(), strict=True):
        assert torch.equal(a, b)
    result = evaluate_model(loaded.algorithm, loaded.config, steps=(0, 1, 3), num_tasks=10)
    assert all(torch.isfinite(result.losses[s]).all() for s in (0, 1, 3))
    # evaluation adapts with the proximal term: not MAML's plain SGD at the same step size
    plain = MAML(loaded.model, F.mse_loss, inner_lr=0.02, inner_steps=3)
    sgd = evaluate_model(plain, loaded.config, steps=(0, 3), num_tasks=10)
    assert torch.equal(sgd.losses[0], result.losses[0]) and not torch.equal(sgd.losses[3], result.losses[3])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lam": 0.0}, "^lam must be a number > 0, got 0.0$"),
    ({"lam": -1.0}, "^lam must be a number > 0, got -1.0$"),
    ({"cg_steps": 0}, "^cg_steps must be an integer > 0, got 0$"),
    ({"cg_steps": 2.5}, "^cg_steps must be an integer > 0, got 2.5$"),
    ({"inner_lr": 0}, "^inner_lr must be a number > 0, got 0$"),
])
def test_bad_arguments_raise_one_line_errors(kwargs: dict, match: str) -> None:
    model = MLP(1, 1, hidden=(4,))
    with pytest.raises(MamlabError, match=match):
        iMAML(model, F.mse_loss, **{"inner_lr": 0.01, **kwargs})


@pytest.mark.parametrize(("options", "match"), [
    ({"lam": 0}, "lam must be a number > 0, got 0"),
    ({"lam": -2.0}, "lam must be a number > 0, got -2.0"),
    ({"cg_steps": 0}, "cg_steps must be an integer > 0, got 0"),
    ({"first_order": True}, "option 'first_order' .*algorithm 'imaml'"),
])
def test_registry_options_are_checked(options: dict, match: str) -> None:
    with pytest.raises(MamlabError, match=match):
        build_algorithm("imaml", MLP(1, 1, hidden=(4,)), F.mse_loss, options)
    with pytest.raises(MamlabError, match=match):
        resolve_config("sinusoid", None, options, algorithm="imaml")


def test_implicit_gradient_equals_finite_differences_where_the_inner_problem_is_solved() -> None:
    """A nonlinear net: with the proximal problem solved (stationarity ~1e-14), ∇ equals central differences.

    (Where the inner loop has not converged the implicit gradient is not the gradient of the
    computed loss; that is iMAML's assumption, not something a test can fix.)
    """
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = MLP(1, 1, hidden=(10,))
        batch = Sinusoid().sample(3, 5, 10, torch.Generator().manual_seed(1)).to(dtype=torch.float64).task(0)
        algo = iMAML(model, F.mse_loss, inner_lr=0.01, inner_steps=3000, lam=2.0, cg_steps=60)
        algo.meta_loss(batch).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        d = torch.randn(g.shape, generator=torch.Generator().manual_seed(3))
        d = d / d.norm()

        def shifted(eps: float) -> float:
            with torch.no_grad():
                for p, dd in zip(model.parameters(), torch.split(d, [p.numel() for p in model.parameters()]),
                                 strict=True):
                    p.add_(eps * dd.view_as(p))
                value = float(algo.meta_loss(batch))
                for p, dd in zip(model.parameters(), torch.split(d, [p.numel() for p in model.parameters()]),
                                 strict=True):
                    p.sub_(eps * dd.view_as(p))
            return value

        fd = (shifted(1e-5) - shifted(-1e-5)) / 2e-5
        assert float(g @ d) == pytest.approx(fd, rel=1e-5, abs=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)
