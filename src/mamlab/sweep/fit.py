"""Power laws fitted on log-log axes: slopes with t intervals, by ordinary least squares (numpy only).

``power_law_fit(y, M=..., N=...)`` fits ``log y = a + b_M log M + b_N log N`` over every point
(every seed's run is one point), and gives each slope a Student-t confidence interval from the
OLS covariance ``s² (XᵀX)⁻¹`` with ``n - p`` degrees of freedom. Points with ``y <= 0`` (or not
finite) cannot be on a log axis: they are left out and counted, never dropped silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mamlab.errors import MamlabError
from mamlab.stats import t_quantile

__all__ = ["Slope", "PowerLawFit", "power_law_fit"]


@dataclass(frozen=True)
class Slope:
    """A fitted exponent with the half-width of its confidence interval (``nan`` with no residual dof)."""

    value: float
    ci: float
    confidence: float = 0.95

    @property
    def low(self) -> float:
        """The lower end of the interval."""
        return self.value - self.ci

    @property
    def high(self) -> float:
        """The upper end of the interval."""
        return self.value + self.ci

    def contains(self, x: float) -> bool | None:
        """Whether ``x`` lies in the interval (``None`` when there is no interval)."""
        if not math.isfinite(self.ci):
            return None
        return self.low <= x <= self.high

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: value, ci (half-width), low, high, confidence."""
        return {"value": self.value, "ci": self.ci, "low": self.low, "high": self.high,
                "confidence": self.confidence}


@dataclass(frozen=True)
class PowerLawFit:
    """``y ≈ exp(intercept) · Π x_k^slopes[k]`` over ``n`` points; ``excluded`` points had ``y <= 0``."""

    slopes: dict[str, Slope]
    intercept: float
    n: int
    dof: int
    excluded: int
    residual_sd: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fit."""
        return {"slopes": {k: s.to_dict() for k, s in self.slopes.items()}, "intercept": self.intercept,
                "n": self.n, "dof": self.dof, "excluded_nonpositive": self.excluded,
                "residual_sd": self.residual_sd}


def power_law_fit(y: Sequence[float], confidence: float = 0.95, **xs: Sequence[float]) -> PowerLawFit:
    """Fit ``log y = a + Σ_k b_k log x_k`` by OLS and give each slope ``b_k`` a t interval.

    Args:
        y: the values (a gap, a loss), one per point; those ``<= 0`` or not finite are excluded
            (``PowerLawFit.excluded`` counts them).
        confidence: the intervals' coverage.
        **xs: the regressors by name (``M=[...], N=[...]``), each as long as ``y`` and > 0.

    Returns:
        The fit. The interval of a slope is ``b ± t_{(1+c)/2, n-p} · s · sqrt([(XᵀX)⁻¹]_kk)``,
        ``s² = RSS / (n - p)``, ``p`` the number of coefficients (intercept included); with no
        residual degrees of freedom the half-width is ``nan``.

    Raises:
        MamlabError: no regressor, lengths differ, a regressor value ``<= 0``, a regressor that
            does not vary over the kept points, or fewer kept points than coefficients.
    """
    if not xs:
        raise MamlabError("power_law_fit needs at least one regressor, e.g. M=[...]")
    yv = np.asarray(y, dtype=np.float64)
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in xs.items()}
    for k, v in cols.items():
        if v.shape != yv.shape or v.ndim != 1:
            raise MamlabError(f"regressor {k} has {v.size} values but y has {yv.size}; give one per point")
        if not np.all(np.isfinite(v) & (v > 0)):
            raise MamlabError(f"regressor {k} must be finite and > 0 (it goes on a log axis), "
                              f"got {v.tolist()}")
    keep = np.isfinite(yv) & (yv > 0)
    excluded = int((~keep).sum())
    p = len(cols) + 1
    n = int(keep.sum())
    if n < p:
        raise MamlabError(f"a power law in {', '.join(cols)} needs at least {p} points with y > 0, got {n} "
                          f"({excluded} excluded as <= 0 or not finite)")
    logs = {k: np.log(v[keep]) for k, v in cols.items()}
    for k, v in logs.items():
        if np.ptp(v) == 0:
            raise MamlabError(f"regressor {k} takes one value over the points; a slope in it needs two "
                              "or more")
    x = np.column_stack([np.ones(n), *logs.values()])
    ly = np.log(yv[keep])
    coef, _, rank, _ = np.linalg.lstsq(x, ly, rcond=None)
    if rank < p:
        raise MamlabError(f"the regressors {', '.join(cols)} are collinear over the points; their slopes "
                          "cannot be told apart")
    resid = ly - x @ coef
    dof = n - p
    if dof > 0:
        s2 = float(resid @ resid) / dof
        cov = s2 * np.linalg.inv(x.T @ x)
        t = t_quantile((1.0 + confidence) / 2.0, dof)
        half = [t * math.sqrt(max(float(cov[i, i]), 0.0)) for i in range(p)]
        sd = math.sqrt(s2)
    else:
        half, sd = [math.nan] * p, math.nan
    slopes = {k: Slope(float(coef[i + 1]), half[i + 1], confidence) for i, k in enumerate(cols)}
    return PowerLawFit(slopes, float(coef[0]), n, dof, excluded, sd)
