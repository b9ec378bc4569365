"""The exact linear theory against independent computations: Monte Carlo through mamlab's own MAML and
pretrain code, autograd, numerical minimization, and the sampled logistic optimum against MAML's query losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mamlab import MAML, MamlabError
from mamlab.algorithms import Pretrain
from mamlab.analysis import linear_theory as lt
from mamlab.config import resolve_config
from mamlab.models import MLP
from mamlab.tasks import LinearClassification, LinearRegression

D64 = torch.float64
#: Statistical tests accept |Monte Carlo − exact| < Z standard errors (two-sided p ≈ 6e-5 each; seeded).
Z = 4.0

FAMILIES = {
    "plain": LinearRegression(dim=3, weight_mean=0.5, weight_std=0.7),
    "noisy mixture": LinearRegression(dim=3, weight_mean=0.5, weight_std=0.7, noise=0.3, hard_fraction=0.4,
                                      hard_scale=0.2, hard_offset=1.5),
    "all hard": LinearRegression(dim=2, weight_mean=-1.0, weight_std=0.2, noise=0.1, hard_fraction=1.0,
                                 hard_scale=3.0, hard_offset=2.0),
}


def linear_maml(theta: torch.Tensor, inner_lr: float, algorithm=MAML) -> MAML:
    model = MLP(theta.numel(), 1, hidden=(), bias=False).to(D64)
    with torch.no_grad():
        model[0].weight.copy_(theta.reshape(1, -1))
    return algorithm(model, F.mse_loss, inner_lr=inner_lr)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("inner_lr, shots, steps", [(0.3, 4, 1), (0.05, 10, 1), (0.3, 4, 0)])
def test_exact_objective_matches_monte_carlo_through_maml_adapt(name, inner_lr, shots, steps):
    fam = FAMILIES[name]
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(fam.dim, generator=g, dtype=D64)
    maml = linear_maml(theta, inner_lr)
    batch = fam.sample(40000, shots, 5, torch.Generator().manual_seed(2)).to(dtype=D64)
    adapted = maml.adapt(batch.support_x, batch.support_y, steps=steps)
    losses = ((maml.predict(adapted, batch.query_x) - batch.query_y) ** 2).mean((1, 2))
    se = float(losses.std()) / math.sqrt(losses.numel())
    exact = float(lt.maml_objective(theta, fam, inner_lr, shots, steps=steps))
    assert abs(float(losses.mean()) - exact) < Z * se, (float(losses.mean()), exact, se)


def test_adaptation_matrix_matches_monte_carlo_for_an_anisotropic_covariance():
    """The Wishart fourth moment E[(I − 2αΣ̂)Σ(I − 2αΣ̂)] for a non-diagonal Σ, entry by entry."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 3, generator=g, dtype=D64)
    cov = m @ m.T / 3 + 0.2 * torch.eye(3, dtype=D64)
    alpha, k, n = 0.2, 5, 200000
    x = torch.randn(n, k, 3, generator=g, dtype=D64) @ torch.linalg.cholesky(cov).T
    b = torch.eye(3, dtype=D64) - 2 * alpha * x.transpose(1, 2) @ x / k
    samples = b @ cov @ b
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(n)
    exact = lt.adaptation_matrix(cov, alpha, k)
    assert torch.all((mean - exact).abs() < Z * se), (mean, exact, se)


def test_noise_constant_matches_monte_carlo():
    cov, sigma, alpha, k, n = torch.diag(torch.tensor([1.0, 0.3], dtype=D64)), 0.5, 0.4, 3, 400000
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, k, 2, generator=g, dtype=D64) * cov.diagonal().sqrt()
    eps = sigma * torch.randn(n, k, generator=g, dtype=D64)
    shift = 2 * alpha / k * torch.einsum("nkd,nk->nd", x, eps)  # θ' − w from the noise alone
    vals = torch.einsum("nd,de,ne->n", shift, cov, shift) + sigma**2
    exact = lt.noise_constant(cov, sigma, alpha, k)
    assert abs(float(vals.mean()) - exact) < Z * float(vals.std()) / math.sqrt(n)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradient_vanishes_at_the_optimum_and_the_objective_is_convex(name):
    fam = FAMILIES[name]
    star = lt.maml_optimum(fam, 0.3, 4).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(lt.maml_objective(star, fam, 0.3, 4), star)
    assert float(grad.norm()) < 1e-12
    hess = torch.autograd.functional.hessian(lambda t: lt.maml_objective(t, fam, 0.3, 4), star.detach())
    assert float(torch.linalg.eigvalsh(hess).min()) > 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_optimum_matches_numerical_minimization(name):
    fam = FAMILIES[name]
    theta = torch.randn(fam.dim, generator=torch.Generator().manual_seed(5), dtype=D64).requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-14, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = lt.maml_objective(theta, fam, 0.3, 4)
        value.backward()
        return value

    opt.step(closure)
    torch.testing.assert_close(theta.detach(), lt.maml_optimum(fam, 0.3, 4), rtol=0, atol=1e-8)
    assert lt.excess_loss(theta.detach(), fam, 0.3, 4) >= -1e-12


def test_zero_steps_is_the_pooled_loss_pretraining_minimizes():
    fam = FAMILIES["noisy mixture"]
    theta = torch.tensor([0.1, -0.5, 0.9], dtype=D64)
    torch.testing.assert_close(lt.maml_optimum(fam, 0.3, 4, steps=0), lt.erm_optimum(fam), rtol=0, atol=0)
    assert float(lt.erm_objective(theta, fam)) == float(lt.maml_objective(theta, fam, 0.7, 9, steps=0))
    # the pretrain baseline's own training loss on a large sample estimates the ERM objective
    pre = linear_maml(theta, 0.1, Pretrain)
    batch = fam.sample(60000, 4, 4, torch.Generator().manual_seed(6)).to(dtype=D64)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    per_task = ((pre.model(x) - y) ** 2).mean((1, 2)).detach()
    assert abs(float(pre.meta_loss(batch).detach()) - float(per_task.mean())) < 1e-12
    se = float(per_task.std()) / math.sqrt(per_task.numel())
    assert abs(float(per_task.mean()) - float(lt.erm_objective(theta, fam))) < Z * se
    # and θ_ERM is where the pretrain loss's population gradient vanishes (hand-computed weighting)
    p, s, m_e, m_h = 0.4, 0.2, 0.5, 0.5 + 1.5
    expected = (0.6 * m_e + p * s * m_h) / (0.6 + p * s)
    torch.testing.assert_close(lt.erm_optimum(fam), torch.full((3,), expected, dtype=D64), rtol=1e-14, atol=0)


def test_the_advantage_needs_both_varying_hardness_and_distant_hard_optima():
    base = {"dim": 4, "weight_mean": 0.0, "weight_std": 1.0, "hard_fraction": 0.5}
    for scale, offset in [(1.0, 3.0), (0.1, 0.0), (1.0, 0.0)]:
        fam = LinearRegression(**base, hard_scale=scale, hard_offset=offset)
        assert abs(lt.maml_advantage(fam, 0.3, 10)) < 1e-12
        torch.testing.assert_close(lt.maml_optimum(fam, 0.3, 10), lt.erm_optimum(fam), rtol=0, atol=1e-12)
    small = lt.maml_advantage(LinearRegression(**base, hard_scale=0.1, hard_offset=1.0), 0.3, 10)
    large = lt.maml_advantage(LinearRegression(**base, hard_scale=0.1, hard_offset=4.0), 0.3, 10)
    assert 0 < small < large
    assert large == pytest.approx(16 * small, rel=1e-9)  # quadratic in the offset


def test_exact_excess_loss_of_a_run_config_and_model():
    cfg = resolve_config("linear-regression", None, {"dim": 3, "hard_fraction": 0.3, "hard_scale": 0.2,
                                                     "hard_offset": 2.0, "inner_lr": 0.2, "shots": 6})
    theta = torch.tensor([0.3, 0.1, -0.2], dtype=D64)
    model = linear_maml(theta, 0.2).model
    fam = LinearRegression(dim=3, hard_fraction=0.3, hard_scale=0.2, hard_offset=2.0)
    assert lt.exact_excess_loss(model, cfg) == lt.exact_excess_loss(theta, cfg) == lt.excess_loss(theta, fam, 0.2, 6)
    assert lt.exact_excess_loss(lt.maml_optimum(fam, 0.2, 6), cfg) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: lt.maml_objective([0.0] * 3, FAMILIES["plain"], 0.1, 5, steps=2), "covers 0 or 1 inner steps, got 2"),
    (lambda: lt.maml_optimum(FAMILIES["plain"], -0.1, 5), "inner_lr must be a number >= 0, got -0.1"),
    (lambda: lt.maml_objective([0.0] * 2, FAMILIES["plain"], 0.1, 5), "theta has 2 entries but the tasks have dimension 3"),
    (lambda: lt.maml_optimum(LinearClassification(dim=3), 0.1, 5), "needs a linear-regression family"),
    (lambda: lt.exact_excess_loss(torch.zeros(1), resolve_config("sinusoid", None, {})), "covers the linear task"),
    (lambda: lt.exact_excess_loss(torch.zeros(5), resolve_config("linear-regression", None, {"inner_steps": 3})),
     "takes 3 inner steps"),
    (lambda: lt.exact_excess_loss(torch.zeros(5), resolve_config("linear-regression", None, {"hidden": [4]})),
     "hidden layers"),
    (lambda: lt.exact_excess_loss(torch.zeros(5), resolve_config("linear-classification", None, {})),
     "no closed form"),
    (lambda: lt.SampledLogisticObjective(LinearRegression(), 0.1, 5), "needs a linear-classification family"),
])
def test_what_the_theory_does_not_cover_is_a_one_line_error(call, match):
    with pytest.raises(MamlabError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------- classification
def test_logistic_one_step_losses_equal_maml_query_losses():
    fam = LinearClassification(dim=4, weight_mean=0.8)
    batch = fam.sample(50, 7, 9, torch.Generator().manual_seed(0)).to(dtype=D64)
    theta = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=D64)
    model = MLP(4, 1, hidden=(), bias=False).to(D64)
    with torch.no_grad():
        model[0].weight.copy_(theta[None])
    maml = MAML(model, F.binary_cross_entropy_with_logits, inner_lr=0.7)
    ours = lt.logistic_one_step_losses(theta, batch.support_x, batch.support_y, batch.query_x, batch.query_y, 0.7)
    torch.testing.assert_close(ours, maml.query_losses(batch).detach(), rtol=1e-12, atol=1e-14)


def test_sampled_logistic_optimum_is_stationary_for_maml_and_its_error_is_honest():
    fam = LinearClassification(dim=3, weight_mean=1.0)
    a = lt.SampledLogisticObjective(fam, 0.5, 8, tasks=4000, queries=20, seed=0)
    opt = a.optimum()
    assert opt.grad_norm < lt.GRAD_TOL
    # independently: the real MAML meta-objective on the same sample has zero gradient at θ̂
    model = MLP(3, 1, hidden=(), bias=False).to(D64)
    with torch.no_grad():
        model[0].weight.copy_(opt.theta[None])
    maml = MAML(model, F.binary_cross_entropy_with_logits, inner_lr=0.5)
    maml.query_losses(a.batch).mean().backward()
    assert float(model[0].weight.grad.norm()) < 1e-9
    assert opt.objective == pytest.approx(float(a.objective(opt.theta)), rel=1e-14)
    # a second, independent sample's optimum agrees within the stated Monte-Carlo error
    b = lt.SampledLogisticObjective(fam, 0.5, 8, tasks=4000, queries=20, seed=1).optimum()
    se = (opt.theta_se**2 + b.theta_se**2).sqrt()
    assert torch.all((opt.theta - b.theta).abs() < Z * se), (opt.theta, b.theta, se)
    assert torch.all(opt.theta_se > 0) and torch.all(opt.theta_se < 0.1)
    assert abs(opt.objective - b.objective) < Z * math.hypot(opt.objective_se, b.objective_se)
    # the excess of another θ is positive and paired over the sample's tasks
    ex = a.excess(torch.zeros(3))
    assert ex.mean > 0 and 0 < ex.ci < ex.mean and ex.n == 4000
    assert a.excess(opt.theta).mean == 0.0
