"""Representation similarity: linear CKA and (SV)CCA between two layers' activations.

Both compare two representations of the same n inputs, ``x`` of shape ``[n, d1]`` and ``y`` of
shape ``[n, d2]`` (extra trailing dimensions, e.g. conv feature maps ``[n, c, h, w]``, are
flattened). Computation is in float64 on centered features; the result is a Python float in
[0, 1].

* ``linear_cka``: invariant to orthogonal transforms and isotropic scaling, not to general
  invertible linear maps; robust when d is larger than n (Kornblith et al. 2019).
* ``cca_similarity``: the mean canonical correlation, invariant to any invertible linear map;
  with ``keep_variance`` it is SVCCA (Raghu et al. 2017), as used to compare MAML's layers
  before and after adaptation (Raghu et al. 2020).

References:
    S. Kornblith, M. Norouzi, H. Lee, G. Hinton. Similarity of Neural Network Representations
    Revisited. ICML 2019.
    M. Raghu, J. Gilmer, J. Yosinski, J. Sohl-Dickstein. SVCCA: Singular Vector Canonical
    Correlation Analysis for Deep Learning Dynamics and Interpretability. NeurIPS 2017.
    A. Raghu, M. Raghu, S. Bengio, O. Vinyals. Rapid Learning or Feature Reuse? Towards
    Understanding the Effectiveness of MAML. ICLR 2020.
"""

from __future__ import annotations

import numpy as np
import torch

from mamlab.errors import MamlabError

__all__ = ["linear_cka", "cca_similarity", "canonical_correlations"]

# Singular values below this fraction of the largest count as zero (rank deficiency).
_RANK_TOL = 1e-10


def _centered(name: str, z: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``z`` as a centered float64 ``[n, d]`` tensor (trailing dims flattened), else MamlabError."""
    if isinstance(z, np.ndarray):
        z = torch.from_numpy(z)
    if not isinstance(z, torch.Tensor):
        raise MamlabError(f"{name} must be a torch.Tensor or numpy array, got {type(z).__name__}")
    if z.dim() < 2:
        raise MamlabError(f"{name} must have shape [n, d, ...], got {tuple(z.shape)}")
    z = z.detach().to(torch.float64).reshape(z.shape[0], -1)
    if z.shape[0] < 2 or z.shape[1] < 1:
        raise MamlabError(f"{name} needs at least 2 examples and 1 feature, got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise MamlabError(f"{name} must be finite; it has NaN or inf entries")
    return z - z.mean(dim=0, keepdim=True)


def _pair(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    xc, yc = _centered("x", x), _centered("y", y)
    if xc.shape[0] != yc.shape[0]:
        raise MamlabError(
            f"x and y must describe the same examples, got {xc.shape[0]} and {yc.shape[0]} rows"
        )
    return xc, yc.to(xc.device)


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA: ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) on centered features (Kornblith et al. 2019).

    Args:
        x: ``[n, d1, ...]`` activations of n examples.
        y: ``[n, d2, ...]`` activations of the same n examples.

    Returns:
        The similarity in [0, 1]; 1 iff y = c·x·Q for an orthogonal Q and scalar c ≠ 0.
    """
    xc, yc = _pair(x, y)
    n, d1, d2 = xc.shape[0], xc.shape[1], yc.shape[1]
    if n < max(d1, d2):  # n×n Gram matrices are cheaper: HSIC = <XXᵀ, YYᵀ>
        kx, ky = xc @ xc.T, yc @ yc.T
        cross, norm_x, norm_y = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross = (yc.T @ xc).pow(2).sum()
        norm_x, norm_y = (xc.T @ xc).norm(), (yc.T @ yc).norm()
    for name, norm in (("x", norm_x), ("y", norm_y)):
        if norm == 0:
            raise MamlabError(f"{name} is constant across examples; CKA is undefined for it")
    return float((cross / (norm_x * norm_y)).clamp(0.0, 1.0))


def _principal(name: str, zc: torch.Tensor, keep_variance: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of centered ``zc`` (SVD truncation applied)."""
    u, s, _ = torch.linalg.svd(zc, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        raise MamlabError(f"{name} is constant across examples; CCA is undefined for it")
    k = int((s > _RANK_TOL * s[0]).sum())
    if keep_variance is not None:
        explained = torch.cumsum(s[:k] ** 2, 0) / (s[:k] ** 2).sum()
        k = min(k, int((explained < keep_variance - 1e-12).sum()) + 1)
    return u[:, :k], s[:k]


def canonical_correlations(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                           keep_variance: float | None = 0.99,
                           regularization: float | None = None) -> torch.Tensor:
    """The canonical correlations ρ_1 >= ... >= ρ_k between ``x`` and ``y`` (k = min of the ranks).

    Args:
        x: ``[n, d1, ...]`` activations of n examples.
        y: ``[n, d2, ...]`` activations of the same n examples.
        keep_variance: SVCCA's first step: keep the fewest principal directions of each of x
            and y that explain this fraction of its variance (0.99 as in Raghu et al. 2017), to
            drop noise directions. ``None`` keeps every direction of non-zero variance.
        regularization: ridge ε added to each covariance, as a fraction of its mean eigenvalue
            over the kept directions: Σ → Σ + ε·mean(eig Σ)·I. ``None`` picks it from n and the
            kept dimensions k1, k2 (see below); 0 gives plain CCA.

    With n samples, at least k1 + k2 − (n − 1) canonical correlations of plain CCA are exactly 1
    whatever the data (the two subspaces must intersect), and all are biased upwards unless n
    is several times k1 + k2. The default therefore regularizes when n is small relative to
    the dimension: ε = 0.1·max(0, 2(k1 + k2)/(n − 1) − 1), i.e. no ridge once
    n − 1 >= 2(k1 + k2), ε = 0.1 at k1 + k2 = n − 1, growing continuously as n shrinks. The
    ridge also shrinks the correlations of identical representations below 1 (direction i by
    s_i²/(s_i² + ε·mean s²)), so compare only numbers computed with the same n, dimensions and
    ε; with n below d, prefer linear CKA.

    Returns:
        A float64 tensor of k canonical correlations in [0, 1], descending.
    """
    if keep_variance is not None and not 0.0 < float(keep_variance) <= 1.0:
        raise MamlabError(f"keep_variance must be in (0, 1] or None, got {keep_variance!r}")
    if regularization is not None and not float(regularization) >= 0.0:
        raise MamlabError(f"regularization must be >= 0 or None, got {regularization!r}")
    xc, yc = _pair(x, y)
    n = xc.shape[0]
    ux, sx = _principal("x", xc, keep_variance)
    uy, sy = _principal("y", yc, keep_variance)
    eps = regularization
    if eps is None:
        eps = 0.1 * max(0.0, 2.0 * (ux.shape[1] + uy.shape[1]) / (n - 1) - 1.0)
    # In principal coordinates each covariance is diagonal (s²/(n−1)), so whitening the ridge-
    # regularized covariance multiplies each direction by s/√(s² + ε·mean(s²)); at ε = 0 the
    # canonical correlations are the singular values of Uxᵀ Uy (cosines of principal angles).
    dx = sx / torch.sqrt(sx**2 + eps * (sx**2).mean())
    dy = sy / torch.sqrt(sy**2 + eps * (sy**2).mean())
    m = (dx[:, None] * (ux.T @ uy)) * dy[None, :]
    return torch.linalg.svdvals(m).clamp(0.0, 1.0)


def cca_similarity(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                   keep_variance: float | None = 0.99, regularization: float | None = None) -> float:
    """The mean canonical correlation between ``x`` and ``y`` (SVCCA similarity), in [0, 1].

    Args:
        x: ``[n, d1, ...]`` activations of n examples.
        y: ``[n, d2, ...]`` activations of the same n examples.
        keep_variance: SVD truncation before CCA (see ``canonical_correlations``); ``None``
            for plain CCA, which gives exactly 1 for y = x·A with A invertible.
        regularization: ridge ε, ``None`` for the n-dependent default of
            ``canonical_correlations``.

    Returns:
        (1/k) Σ ρ_i over the k = min(k1, k2) canonical correlations.
    """
    return float(canonical_correlations(x, y, keep_variance, regularization).mean())
