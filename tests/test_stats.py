import json
import math

import numpy as np
import pytest
import torch

from mamlab.errors import MamlabError
from mamlab.stats import (
    Estimate,
    estimate,
    mean_ci,
    median_ci,
    median_estimate,
    normal_quantile,
    paired_difference_ci,
    t_quantile,
    unpaired_difference_ci,
)

# Student-t quantiles from standard tables (R's qt(), 10 significant digits).
T_TABLE = [
    (0.975, 1, 12.70620474),
    (0.975, 2, 4.302652730),
    (0.975, 3, 3.182446305),
    (0.975, 5, 2.570581836),
    (0.975, 9, 2.262157163),
    (0.975, 10, 2.228138852),
    (0.975, 30, 2.042272456),
    (0.975, 49, 2.009575237),
    (0.975, 100, 1.983971519),
    (0.975, 1000, 1.962339081),
    (0.995, 3, 5.840909309),
    (0.995, 29, 2.756385904),
    (0.95, 20, 1.724718243),
    (0.9, 7, 1.414923928),
    (0.999, 4, 7.173182220),
]


@pytest.mark.parametrize("p, df, expected", T_TABLE)
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-6)


def test_t_quantile_large_df_and_non_integer_df():
    z = normal_quantile(0.975)
    assert z == pytest.approx(1.959963985, abs=1e-8)
    assert t_quantile(0.975, math.inf) == z
    # The Cornish–Fisher branch (df > 1000) joins the exact inversion continuously ...
    for p in (0.9, 0.975, 0.9995):
        assert t_quantile(p, 1000.0) == pytest.approx(t_quantile(p, 1000.0 + 1e-9), abs=1e-9)
    # ... and tends to the normal quantile.
    assert t_quantile(0.975, 1e6) == pytest.approx(z + (z**3 + z) / 4e6, abs=1e-10)
    # Non-integer df lies between its integer neighbours (Welch's test needs it).
    assert t_quantile(0.975, 3) > t_quantile(0.975, 3.5) > t_quantile(0.975, 4)
    assert t_quantile(0.5, 7) == 0.0


def _coverage(n: int, reps: int, rng: np.random.Generator) -> tuple[float, float]:
    """Coverage of the 95% t interval, and of the same interval with a normal quantile."""
    true_mean, z = 1.5, normal_quantile(0.975)
    hits = hits_z = 0
    for _ in range(reps):
        sample = rng.normal(true_mean, 2.0, size=n)
        m, hw = mean_ci(sample)
        hits += abs(m - true_mean) <= hw
        hits_z += abs(m - true_mean) <= z * sample.std(ddof=1) / math.sqrt(n)
    return hits / reps, hits_z / reps


@pytest.mark.parametrize("n", [10, 50])
def test_mean_ci_covers_true_mean_at_nominal_rate(n):
    reps = 2000
    cov, cov_z = _coverage(n, reps, np.random.default_rng(n))
    tol = 4 * math.sqrt(0.95 * 0.05 / reps)  # 4 binomial standard errors ≈ 0.0195
    assert abs(cov - 0.95) < tol, cov
    if n == 10:  # the test has power: a normal quantile under-covers (≈ 0.918) at n = 10
        assert cov_z < 0.95 - tol, cov_z


@pytest.mark.parametrize("n", [10, 50])
def test_median_ci_covers_true_median_at_least_at_nominal_rate(n):
    # A heavy-tailed, skewed distribution (lognormal): the order-statistic interval needs no moments.
    reps, true_median = 2000, math.exp(0.5)
    rng = np.random.default_rng(100 + n)
    hits = 0
    for _ in range(reps):
        med, low, high = median_ci(rng.lognormal(0.5, 2.0, size=n))
        assert low <= med <= high
        hits += low <= true_median <= high
    tol = 4 * math.sqrt(0.95 * 0.05 / reps)
    # exact coverage of [x_(j), x_(n+1-j)] is 1 - 2 P(B <= j-1): 0.9786 (n=10), 0.9672 (n=50)
    exact = {10: 1 - 2 * 11 / 1024, 50: 0.9672}[n]
    assert hits / reps >= 0.95 - tol and abs(hits / reps - exact) < tol, hits / reps


def test_median_ci_known_values_inf_and_small_n():
    assert median_ci([float(v) for v in range(1, 11)]) == (5.5, 2.0, 9.0)  # j = 2 for n = 10
    med, low, high = median_ci([1, 2, math.inf, 4, 5, 6, 7, math.inf, 9, 10])  # two diverged tasks
    assert (med, low, high) == (6.5, 2.0, math.inf)
    assert median_ci([3.0, 1.0, 2.0]) == (2.0, -math.inf, math.inf)  # n < 6: no 95% interval
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[1:] == (1.0, 6.0)  # n = 6: the range, 96.9%
    m = median_estimate(torch.arange(101, dtype=torch.float64))
    assert (m.median, m.n) == (50.0, 101) and m.low < 50 < m.high and json.dumps(m.to_dict())
    with pytest.raises(MamlabError, match="NaN"):
        median_ci([1.0, math.nan])
    with pytest.raises(MamlabError, match="confidence"):
        median_ci([1.0, 2.0], confidence=1.5)


def test_mean_ci_known_value_and_input_types():
    values = [1.0, 2.0, 3.0, 4.0]
    m, hw = mean_ci(values)
    assert m == 2.5
    assert hw == pytest.approx(3.182446305 * math.sqrt(5 / 3) / 2, abs=1e-9)
    assert mean_ci(np.array(values)) == (m, hw)
    m_t, hw_t = mean_ci(torch.tensor(values, dtype=torch.float64))
    assert (m_t, hw_t) == pytest.approx((m, hw))
    m99, hw99 = mean_ci(values, confidence=0.99)
    assert m99 == m and hw99 > hw


def test_paired_ci_narrower_than_unpaired_when_correlated():
    rng = np.random.default_rng(0)
    n = 200
    difficulty = rng.normal(0.0, 1.0, size=n)  # shared episode difficulty
    a = 0.70 + 0.1 * difficulty + rng.normal(0.0, 0.01, size=n)
    b = 0.65 + 0.1 * difficulty + rng.normal(0.0, 0.01, size=n)
    d_paired, hw_paired = paired_difference_ci(a, b)
    d_unpaired, hw_unpaired = unpaired_difference_ci(a, b)
    assert d_paired == pytest.approx(d_unpaired)
    assert hw_paired < hw_unpaired / 5
    assert abs(d_paired - 0.05) < hw_paired * 2  # the truth lies in (about) the interval
    assert (d_paired, hw_paired) == mean_ci(a - b)


def test_unpaired_ci_welch_known_value():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [2.0, 4.0, 6.0]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    diff, hw = unpaired_difference_ci(a, b)
    assert diff == pytest.approx(2.5 - 4.0)
    assert hw == pytest.approx(t_quantile(0.975, df) * math.sqrt(va + vb))


def test_estimate_dataclass():
    est = estimate([0.1, 0.2, 0.3])
    assert isinstance(est, Estimate)
    assert est.n == 3 and est.confidence == 0.95
    assert (est.mean, est.ci) == mean_ci([0.1, 0.2, 0.3])
    assert est.low == est.mean - est.ci and est.high == est.mean + est.ci
    assert json.loads(json.dumps(est.to_dict())) == {"mean": est.mean, "ci": est.ci, "n": 3,
                                                     "confidence": 0.95}
    assert Estimate(0.12345, 0.00421, 10).format() == "0.123 ± 0.004"
    assert str(Estimate(1.0, 0.5, 4)) == "1.000 ± 0.500"


@pytest.mark.parametrize("call, match", [
    (lambda: mean_ci([1.0]), "at least 2"),
    (lambda: mean_ci([1.0, float("nan")]), "finite"),
    (lambda: mean_ci([[1.0, 2.0]]), "1-D"),
    (lambda: mean_ci(["a", "b"]), "numbers"),
    (lambda: mean_ci([1.0, 2.0], confidence=1.0), "confidence"),
    (lambda: mean_ci([1.0, 2.0], confidence=95), "confidence"),
    (lambda: paired_difference_ci([1.0, 2.0], [1.0, 2.0, 3.0]), "same length"),
    (lambda: t_quantile(1.5, 3), "p must be"),
    (lambda: t_quantile(0.9, 0), "df must be"),
    (lambda: t_quantile(0.9, float("nan")), "df must be"),
    (lambda: normal_quantile(0.0), "p must be"),
])
def test_bad_input_raises_mamlab_error(call, match):
    with pytest.raises(MamlabError, match=match):
        call()
