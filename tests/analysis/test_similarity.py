import numpy as np
import pytest
import torch

from mamlab.analysis.similarity import canonical_correlations, cca_similarity, linear_cka
from mamlab.errors import MamlabError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(d, d, g=g))
    return q


def test_cka_of_a_representation_with_itself_is_one():
    g = _gen()
    x = _randn(100, 20, g=g)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    wide = _randn(30, 200, g=g)  # n < d: the Gram-matrix path
    assert linear_cka(wide, wide) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    g = _gen(1)
    x = _randn(200, 16, g=g)
    y = x @ _randn(16, 8, g=g) + 0.5 * _randn(200, 8, g=g)
    base = linear_cka(x, y)
    assert 0.2 < base < 0.99
    assert linear_cka(x @ _orthogonal(16, g), 3.0 * y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, y @ _orthogonal(8, g) * 0.01) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, abs=1e-12)  # centering
    assert linear_cka(y, x) == pytest.approx(base, abs=1e-12)  # symmetric
    # Not invariant to anisotropic scaling (unlike CCA): a known property of linear CKA.
    stretch = torch.diag(torch.logspace(0, 3, 16, dtype=torch.float64))
    assert linear_cka(x, x @ stretch) < 0.9


def test_cka_one_dimensional_equals_squared_correlation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=300)
    b = 0.6 * a + rng.normal(size=300)
    r = np.corrcoef(a, b)[0, 1]
    assert linear_cka(a[:, None], b[:, None]) == pytest.approx(r**2, abs=1e-12)


def test_cka_of_independent_representations_is_small():
    g = _gen(2)
    value = linear_cka(_randn(2000, 10, g=g), _randn(2000, 12, g=g))
    assert value < 0.03  # E ≈ √(d1 d2)/n ≈ 0.005
    assert linear_cka(_randn(2000, 10, g=g), _randn(2000, 12, g=g)) != pytest.approx(value)


def test_cka_gram_and_feature_paths_agree_and_conv_features_flatten():
    g = _gen(3)
    x = _randn(40, 4, 3, 3, g=g)  # [n, c, h, w]: 36 features
    y = _randn(40, 50, g=g)
    flat = x.reshape(40, -1)
    assert linear_cka(x, y) == pytest.approx(linear_cka(flat, y), abs=1e-12)
    # Same quantity, two formulas: compare with an explicit HSIC through centering matrices.
    h = torch.eye(40, dtype=torch.float64) - 1.0 / 40
    kx, ky = h @ flat @ flat.T @ h, h @ y @ y.T @ h
    expected = (kx * ky).sum() / (kx.norm() * ky.norm())
    assert linear_cka(x, y) == pytest.approx(float(expected), abs=1e-12)
    assert linear_cka(x.numpy(), y.numpy()) == pytest.approx(float(expected), abs=1e-12)


def test_cca_of_invertible_linear_map_is_one():
    g = _gen(4)
    x = _randn(300, 10, g=g)
    a = _randn(10, 10, g=g) + 3 * torch.eye(10, dtype=torch.float64)
    assert cca_similarity(x, x @ a, keep_variance=None) == pytest.approx(1.0, abs=1e-10)
    rho = canonical_correlations(x, x @ a, keep_variance=None)
    assert rho.shape == (10,)
    assert torch.allclose(rho, torch.ones(10, dtype=torch.float64), atol=1e-10)
    # A rank-deficient copy (an invertible map into a higher-dimensional space) too.
    assert cca_similarity(x, x @ _randn(10, 25, g=g), keep_variance=None) == pytest.approx(1.0, abs=1e-10)


def test_cca_one_dimensional_equals_absolute_correlation():
    rng = np.random.default_rng(1)
    a = rng.normal(size=500)
    b = -0.4 * a + rng.normal(size=500)
    r = np.corrcoef(a, b)[0, 1]
    assert cca_similarity(a[:, None], b[:, None], keep_variance=None) == pytest.approx(abs(r), abs=1e-12)


def test_cca_independent_is_small_and_regularized_when_n_is_small():
    g = _gen(5)
    x, y = _randn(2000, 5, g=g), _randn(2000, 5, g=g)
    assert cca_similarity(x, y) < 0.1
    # d1 + d2 > n: plain CCA reports perfect correlation of independent noise ...
    small_x, small_y = _randn(30, 40, g=g), _randn(30, 40, g=g)
    assert cca_similarity(small_x, small_y, keep_variance=None, regularization=0.0) == pytest.approx(1.0)
    # ... the default ridge does not.
    assert cca_similarity(small_x, small_y, keep_variance=None) < 0.8


def test_svcca_truncation_keeps_the_signal_subspace():
    g = _gen(6)
    signal = _randn(500, 3, g=g)
    x = torch.cat([10 * signal, 0.01 * _randn(500, 20, g=g)], dim=1)
    y = torch.cat([10 * signal @ _randn(3, 3, g=g), 0.01 * _randn(500, 20, g=g)], dim=1)
    rho = canonical_correlations(x, y, keep_variance=0.99)
    assert rho.shape == (3,)  # 99% of the variance lies in the three signal directions
    assert rho.min() > 0.999
    assert cca_similarity(x, y, keep_variance=None, regularization=0.0) < 0.5  # noise dims dilute


@pytest.mark.parametrize("call, match", [
    (lambda x: linear_cka(x, x[:10]), "same examples"),
    (lambda x: linear_cka(x[0], x[0]), r"shape \[n, d"),
    (lambda x: linear_cka([[1.0]], x), "torch.Tensor or numpy"),
    (lambda x: linear_cka(torch.ones(20, 3), x), "constant"),
    (lambda x: linear_cka(x * float("nan"), x), "finite"),
    (lambda x: cca_similarity(torch.ones(20, 3), x), "constant"),
    (lambda x: cca_similarity(x, x, keep_variance=1.5), "keep_variance"),
    (lambda x: cca_similarity(x, x, regularization=-1.0), "regularization"),
])
def test_bad_input_raises_mamlab_error(call, match):
    x = _randn(20, 3, g=_gen(7))
    with pytest.raises(MamlabError, match=match):
        call(x)
