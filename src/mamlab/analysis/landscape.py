"""Loss-landscape probes: Hessian-vector products, the top Hessian eigenvalue, inner-loop gradients.

A loss here is a function of a parameter dict (``mamlab.core.params.Params``), e.g.
``lambda p: loss_fn(forward(model, p, x), y)``. Hessian-vector products use autograd's double
backward (Pearlmutter's trick): the gradient graph is built once, then every product H·v is one
more backward pass through it, never forming H.

Example:
    >>> params = parameters_of(model)
    >>> loss = lambda p: F.mse_loss(forward(model, p, x), y)
    >>> top = top_hessian_eigenvalue(loss, params, generator=torch.Generator().manual_seed(0))
    >>> top.eigenvalue, top.iterations, top.converged
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from mamlab.core.params import Params, forward, parameters_of, sgd_step
from mamlab.errors import MamlabError, check_choice, check_positive

__all__ = [
    "HessianEigen",
    "hessian_vector_product",
    "top_hessian_eigenvalue",
    "gradient_norms_along_inner_trajectory",
]

ParamLoss = Callable[[Params], torch.Tensor]


class HessianEigen(NamedTuple):
    """The result of power iteration: eigenvalue, Hessian-vector products used, convergence."""

    eigenvalue: float
    iterations: int
    converged: bool


def _check_params(params: Mapping[str, torch.Tensor]) -> Params:
    if not isinstance(params, Mapping) or not params:
        raise MamlabError(f"params must be a non-empty dict of tensors, got {type(params).__name__}")
    for k, p in params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise MamlabError(f"params[{k!r}] must be a floating-point tensor, got {type(p).__name__}")
    return {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}


class _HVP:
    """v ↦ H·v at fixed ``params``: the gradient graph is built once and reused for every v."""

    def __init__(self, loss_fn: ParamLoss, params: Mapping[str, torch.Tensor]) -> None:
        self.params = _check_params(params)
        with torch.enable_grad():
            loss = loss_fn(self.params)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise MamlabError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
            grads = torch.autograd.grad(loss, list(self.params.values()), create_graph=True,
                                        allow_unused=True)
        self.tensors = list(self.params.values())
        self.grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.tensors,
                                                                                  strict=True)]
        self.differentiable = [g.requires_grad for g in self.grads]

    def __call__(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = [g for g, d in zip(self.grads, self.differentiable, strict=True) if d]
        vs = [x for x, d in zip(v, self.differentiable, strict=True) if d]
        if not outs:  # the loss is (at most) linear in every parameter: H = 0
            return [torch.zeros_like(p) for p in self.tensors]
        hv = torch.autograd.grad(outs, self.tensors, grad_outputs=vs, retain_graph=True, allow_unused=True)
        return [h.detach() if h is not None else torch.zeros_like(p) for h, p in zip(hv, self.tensors,
                                                                                    strict=True)]


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def hessian_vector_product(loss_fn: ParamLoss, params: Mapping[str, torch.Tensor],
                           vector: Mapping[str, torch.Tensor]) -> Params:
    """H·v, where H = ∇²_θ loss_fn(θ) at θ = ``params`` (double backward, H never formed).

    Args:
        loss_fn: maps a parameter dict to a scalar loss tensor.
        params: the point θ; not modified.
        vector: v, a dict with the same keys and shapes as ``params``.

    Returns:
        H·v as a dict of detached tensors shaped like ``params``.
    """
    hvp = _HVP(loss_fn, params)
    if not isinstance(vector, Mapping) or set(vector) != set(hvp.params):
        keys = sorted(vector) if isinstance(vector, Mapping) else type(vector).__name__
        raise MamlabError(f"vector must have the keys of params {sorted(hvp.params)}, got {keys}")
    for k, p in hvp.params.items():
        if vector[k].shape != p.shape:
            raise MamlabError(f"vector[{k!r}] has shape {tuple(vector[k].shape)}; params[{k!r}] has "
                              f"{tuple(p.shape)}, they must match")
    out = hvp([vector[k].to(p) for k, p in hvp.params.items()])
    return dict(zip(hvp.params, out, strict=True))


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _power_iteration(op: Callable[[list[torch.Tensor]], list[torch.Tensor]], v: list[torch.Tensor],
                     iters: int, tol: float) -> tuple[float, int, bool]:
    """Largest-magnitude eigenvalue of the symmetric ``op`` from start ``v`` (unit norm)."""
    eig = 0.0
    for i in range(1, iters + 1):
        hv = op(v)
        norm = float(_dot(hv, hv)) ** 0.5
        if norm == 0.0:  # v lies in the null space; with a random start, H = 0 to working precision
            return 0.0, i, True
        eig = float(_dot(v, hv))  # Rayleigh quotient, ‖v‖ = 1
        residual = float(sum((h - eig * x).pow(2).sum() for h, x in zip(hv, v, strict=True))) ** 0.5
        if residual <= tol * abs(eig):
            return eig, i, True
        v = [h / norm for h in hv]
    return eig, iters, False


def top_hessian_eigenvalue(loss_fn: ParamLoss, params: Mapping[str, torch.Tensor], iters: int = 100,
                           tol: float = 1e-6, generator: torch.Generator | None = None,
                           which: str = "algebraic") -> HessianEigen:
    """The top eigenvalue of the loss Hessian at ``params``, by power iteration on H·v products.

    Plain power iteration converges to the eigenvalue of largest magnitude |λ|, which away from
    a minimum can be a large negative one. ``which="algebraic"`` (default: the sharpness, the
    largest λ) handles that: if the largest-magnitude eigenvalue λ_m is negative, it runs power
    iteration again on H − λ_m·I, whose eigenvalues λ − λ_m are all >= 0 and largest for the
    largest λ, and adds λ_m back. ``which="magnitude"`` returns λ_m itself (with its sign).

    Convergence: stops when the residual ‖H v − λ v‖ <= tol·|λ| (then some eigenvalue of H lies
    within tol·|λ| of λ, and the error is O(tol²·|λ|²/gap) for the top one), else after
    ``iters`` products per run. Close top eigenvalues converge slowly; check ``converged``.

    Args:
        loss_fn: maps a parameter dict to a scalar loss tensor.
        params: the point θ; not modified.
        iters: most Hessian-vector products per power-iteration run (>= 1).
        tol: relative residual tolerance (> 0).
        generator: seeds the random start vector (a CPU ``torch.Generator``); None uses torch's
            global RNG.
        which: ``"algebraic"`` (largest λ) or ``"magnitude"`` (largest |λ|).

    Returns:
        ``HessianEigen(eigenvalue, iterations, converged)``; ``iterations`` counts every H·v
        product (both runs for a shifted ``"algebraic"`` search).
    """
    check_positive("iters", iters, integer=True)
    check_positive("tol", tol)
    check_choice("which", which, ("algebraic", "magnitude"))
    hvp = _HVP(loss_fn, params)
    start = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in hvp.tensors]
    norm = float(_dot(start, start)) ** 0.5
    start = [s / norm for s in start]
    eig, n, ok = _power_iteration(hvp, start, iters, tol)
    if which == "magnitude" or eig >= 0.0:
        return HessianEigen(eig, n, ok)
    shift = eig

    def shifted(v: list[torch.Tensor]) -> list[torch.Tensor]:
        return [h - shift * x for h, x in zip(hvp(v), v, strict=True)]

    # Restart from the random vector: the last iterate has (nearly) lost the top direction.
    eig2, n2, ok2 = _power_iteration(shifted, start, iters, tol)
    return HessianEigen(eig2 + shift, n + n2, ok and ok2)


def gradient_norms_along_inner_trajectory(model: nn.Module,
                                          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                          params: Mapping[str, torch.Tensor] | None, x: torch.Tensor,
                                          y: torch.Tensor, lr: float, steps: int) -> list[float]:
    """‖∇θ L(θ_k)‖ along MAML's inner SGD trajectory θ_{k+1} = θ_k − lr·∇θ L(θ_k) on one task.

    Args:
        model: the network f_θ.
        loss_fn: ``loss_fn(prediction, target)`` → scalar loss, as given to ``MAML``.
        params: θ_0, the (possibly partial, as with ANIL) parameter dict adapted in the inner
            loop; ``None`` for all of the model's trainable parameters.
        x: the task's support inputs ``[K, ...]`` (one task, no task dimension).
        y: the task's support targets ``[K, ...]``.
        lr: the inner step size α (> 0).
        steps: the number of inner steps (>= 0).

    Returns:
        ``steps + 1`` floats: element k is the Euclidean norm, over all adapted parameters, of
        the gradient at θ_k, for k = 0 (the meta-learned θ) through ``steps`` (the adapted θ').
    """
    if not isinstance(model, nn.Module):
        raise MamlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_positive("lr", lr)
    check_positive("steps", steps, integer=True, allow_zero=True)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape[:1] != y.shape[:1]:
        raise MamlabError(f"x and y must be tensors sharing the example dimension, got {_describe(x)} "
                          f"and {_describe(y)}")
    theta = _check_params(parameters_of(model) if params is None else params)
    norms: list[float] = []
    for k in range(steps + 1):
        with torch.enable_grad():
            loss = loss_fn(forward(model, theta, x), y)
            grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        grads_d = {n: (g if g is not None else torch.zeros_like(p))
                   for (n, p), g in zip(theta.items(), grads, strict=True)}
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads_d.values()))))
        if k < steps:
            theta = {n: p.detach().requires_grad_(True) for n, p in sgd_step(theta, grads_d, lr).items()}
    return norms
