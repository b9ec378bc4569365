import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mamlab.analysis.landscape import (
    HessianEigen,
    gradient_norms_along_inner_trajectory,
    hessian_vector_product,
    top_hessian_eigenvalue,
)
from mamlab.errors import MamlabError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _quadratic(a: torch.Tensor):
    """0.5 θᵀAθ with θ split across two parameters, shapes [2] and [d-2] viewed as [.., 1]."""

    def loss(p):
        theta = torch.cat([p["u"].reshape(-1), p["w"].reshape(-1)])
        return 0.5 * theta @ a @ theta

    d = a.shape[0]
    params = {"u": torch.randn(2, generator=_gen(9), dtype=torch.float64),
              "w": torch.randn(d - 2, 1, generator=_gen(10), dtype=torch.float64)}
    return loss, params


def test_hvp_equals_a_times_v():
    a = _symmetric([4.0, 2.0, 1.0, -0.5, 0.1, 3.0])
    loss, params = _quadratic(a)
    v = {"u": torch.randn(2, generator=_gen(1), dtype=torch.float64),
         "w": torch.randn(4, 1, generator=_gen(2), dtype=torch.float64)}
    hv = hessian_vector_product(loss, params, v)
    expected = a @ torch.cat([v["u"], v["w"].reshape(-1)])
    assert torch.allclose(torch.cat([hv["u"], hv["w"].reshape(-1)]), expected, atol=1e-12)
    assert hv["w"].shape == (4, 1)
    assert not params["u"].requires_grad  # params untouched


def test_hvp_of_a_non_quadratic_matches_the_explicit_hessian():
    x = torch.randn(20, 3, generator=_gen(3), dtype=torch.float64)
    y = torch.randn(20, 1, generator=_gen(4), dtype=torch.float64)
    w = torch.randn(3, 1, generator=_gen(5), dtype=torch.float64)

    def loss_w(w_):
        return F.mse_loss(torch.tanh(x @ w_), y)

    h = torch.autograd.functional.hessian(loss_w, w).reshape(3, 3)
    v = torch.randn(3, 1, generator=_gen(6), dtype=torch.float64)
    hv = hessian_vector_product(lambda p: loss_w(p["w"]), {"w": w}, {"w": v})
    assert torch.allclose(hv["w"].reshape(-1), h @ v.reshape(-1), atol=1e-12)


def test_power_iteration_finds_top_eigenvalue_of_a_quadratic():
    a = _symmetric([5.0, 3.0, 1.0, -2.0, 0.5, 0.0])
    loss, params = _quadratic(a)
    top = top_hessian_eigenvalue(loss, params, iters=500, tol=1e-10, generator=_gen(0))
    assert isinstance(top, HessianEigen)
    assert top.converged
    assert top.eigenvalue == pytest.approx(5.0, abs=1e-6)
    assert 1 < top.iterations < 500
    # The same seed gives the same answer; a looser tolerance stops sooner.
    assert top_hessian_eigenvalue(loss, params, iters=500, tol=1e-10, generator=_gen(0)) == top
    loose = top_hessian_eigenvalue(loss, params, iters=500, tol=1e-3, generator=_gen(0))
    assert loose.iterations < top.iterations


def test_power_iteration_largest_algebraic_vs_largest_magnitude():
    a = _symmetric([2.0, 1.0, -6.0, 0.3], seed=1)  # a saddle: the biggest |λ| is negative
    loss, params = _quadratic(a)
    algebraic = top_hessian_eigenvalue(loss, params, iters=1000, tol=1e-10, generator=_gen(1))
    magnitude = top_hessian_eigenvalue(loss, params, iters=1000, tol=1e-10, generator=_gen(1),
                                       which="magnitude")
    assert magnitude.converged and magnitude.eigenvalue == pytest.approx(-6.0, abs=1e-6)
    assert algebraic.converged and algebraic.eigenvalue == pytest.approx(2.0, abs=1e-6)
    assert algebraic.iterations > magnitude.iterations  # it ran the shifted search too
    # Negative definite: the top algebraic eigenvalue is the one nearest zero.
    loss_neg, params_neg = _quadratic(_symmetric([-1.0, -3.0, -7.0], seed=2))
    assert top_hessian_eigenvalue(loss_neg, params_neg, iters=1000, tol=1e-10,
                                  generator=_gen(2)).eigenvalue == pytest.approx(-1.0, abs=1e-6)


def test_power_iteration_reports_non_convergence_and_zero_hessian():
    a = _symmetric([1.0, 0.999, 0.5, 0.1], seed=3)  # gap too small for 5 iterations
    loss, params = _quadratic(a)
    top = top_hessian_eigenvalue(loss, params, iters=5, tol=1e-12, generator=_gen(3))
    assert not top.converged and top.iterations == 5
    linear = top_hessian_eigenvalue(lambda p: p["w"].sum() * 3.0, {"w": torch.ones(3)}, generator=_gen(0))
    assert linear == HessianEigen(0.0, 1, True)


def test_gradient_norms_on_a_quadratic_match_the_closed_form():
    # mse of a linear model: L(w) = (1/K)‖Xw − y‖², H = 2XᵀX/K, and g_{k+1} = (I − lr·H) g_k.
    k_shots, d, lr, steps = 12, 4, 0.05, 6
    x = torch.randn(k_shots, d, generator=_gen(7), dtype=torch.float64)
    y = torch.randn(k_shots, 1, generator=_gen(8), dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    w0 = model.weight.detach().clone().reshape(-1)
    norms = gradient_norms_along_inner_trajectory(model, F.mse_loss, None, x, y, lr, steps)
    h = 2 * x.T @ x / k_shots
    g0 = h @ w0 - 2 * x.T @ y.reshape(-1) / k_shots
    expected = [float((torch.linalg.matrix_power(torch.eye(d, dtype=torch.float64) - lr * h, k) @ g0).norm())
                for k in range(steps + 1)]
    assert len(norms) == steps + 1
    assert norms == pytest.approx(expected, rel=1e-10)
    assert norms[-1] < norms[0]
    assert torch.equal(model.weight.detach().reshape(-1), w0)  # the model is not modified
    assert gradient_norms_along_inner_trajectory(model, F.mse_loss, None, x, y, lr, 0) == norms[:1]


def test_gradient_norms_with_a_partial_parameter_dict():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(10, 3, generator=_gen(11), dtype=torch.float64)
    y = torch.randn(10, 1, generator=_gen(12), dtype=torch.float64)
    head = {k: p for k, p in model.named_parameters() if k.startswith("2.")}
    norms_head = gradient_norms_along_inner_trajectory(model, F.mse_loss, head, x, y, 0.1, 3)
    norms_all = gradient_norms_along_inner_trajectory(model, F.mse_loss, None, x, y, 0.1, 3)
    assert norms_head[0] < norms_all[0]  # a sub-vector of the full gradient at the same θ_0
    assert norms_head[1] != pytest.approx(norms_all[1])


def _norms(y, lr, steps):
    x = torch.ones(3, 1)
    return gradient_norms_along_inner_trajectory(nn.Linear(1, 1), F.mse_loss, None, x, y, lr, steps)


@pytest.mark.parametrize("call, match", [
    (lambda loss, p: top_hessian_eigenvalue(loss, p, iters=0), "iters"),
    (lambda loss, p: top_hessian_eigenvalue(loss, p, tol=-1.0), "tol"),
    (lambda loss, p: top_hessian_eigenvalue(loss, p, which="smallest"), "which"),
    (lambda loss, p: top_hessian_eigenvalue(loss, {}), "non-empty"),
    (lambda loss, p: top_hessian_eigenvalue(lambda q: q["u"], p), "scalar"),
    (lambda loss, p: hessian_vector_product(loss, p, {"u": p["u"]}), "keys"),
    (lambda loss, p: hessian_vector_product(loss, p, {"u": p["u"], "w": p["u"]}), "shape"),
    (lambda loss, p: _norms(torch.ones(2, 1), 0.1, 1), "x and y"),
    (lambda loss, p: _norms(torch.ones(3, 1), 0.0, 1), "lr"),
    (lambda loss, p: _norms(torch.ones(3, 1), 0.1, -1), "steps"),
    (lambda loss, p: gradient_norms_along_inner_trajectory("model", F.mse_loss, None, torch.ones(3, 1),
                                                           torch.ones(3, 1), 0.1, 1), "nn.Module"),
])
def test_bad_input_raises_mamlab_error(call, match):
    loss, params = _quadratic(_symmetric([1.0, 2.0, 3.0]))
    with pytest.raises(MamlabError, match=match):
        call(loss, params)
