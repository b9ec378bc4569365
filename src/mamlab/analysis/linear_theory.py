"""The linear model, exactly: the one-step MAML objective of linear regression in closed form.

Linear regression tasks (``mamlab.tasks.LinearRegression``): a task draws weights w, inputs
x ~ N(0, Σ) and targets y = wᵀx + ε, ε ~ N(0, σ²); the model is f_θ(x) = θᵀx and the loss the
mean squared error over a set's examples. One inner SGD step of size α on K support points
(X: K×d, Σ̂ = XᵀX/K) gives

    θ' = θ − α ∇L̂_s(θ) = (I − 2αΣ̂)θ + 2αΣ̂w + (2α/K)Xᵀε,

so θ' − w = (I − 2αΣ̂)(θ − w) + (2α/K)Xᵀε and the expected query loss after adaptation,
E[(θ' − w)ᵀΣ(θ' − w)] + σ², is quadratic in θ. With the Gaussian fourth moment
E[Σ̂MΣ̂] = ΣMΣ + (ΣMΣ + tr(MΣ)Σ)/K (symmetric M):

    F(θ) = E_i[(θ − w_i)ᵀ A_i (θ − w_i)] + E_i[c_i],
    A   = E[(I − 2αΣ̂)Σ(I − 2αΣ̂)] = Σ − 4αΣ² + 4α²((1 + 1/K)Σ³ + tr(Σ²)Σ/K),
    c   = σ²(1 + 4α² tr(Σ²)/K).

A task type with weights w ~ N(m, C) contributes (θ − m)ᵀA(θ − m) + tr(AC). The minimizer is
θ* = (E A_i)⁻¹ E[A_i m_i]; pretraining (ERM on all tasks' examples pooled) minimizes the α = 0
objective, E_i[(θ − w_i)ᵀΣ_i(θ − w_i)] + σ², whose minimizer is θ_ERM = (E Σ_i)⁻¹ E[Σ_i m_i].
Zero inner steps is the α = 0 case. More than one inner step needs higher moments of Σ̂ and is
not covered: those calls raise ``MamlabError``.

Linear binary classification (logistic loss) has no closed form. ``SampledLogisticObjective``
fixes a large sample of tasks and examples, computes the one-step MAML objective on it exactly
(float64) and minimizes it to a gradient norm below 1e-10. What it returns is the optimum of the
*sampled* objective; its Monte-Carlo error is given as standard errors (the sandwich estimate
H⁻¹VH⁻¹/T for θ̂, the per-task spread for the objective).

All functions compute in float64 and are differentiable with respect to θ (torch).

Reference: L. Collins, A. Mokhtari, S. Shakkottai. Why Does MAML Outperform ERM? An
Optimization Perspective. arXiv:2010.14672, 2020 (the mixture of easy and hard tasks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mamlab.errors import MamlabError, check_positive
from mamlab.experiments import build_family
from mamlab.stats import Estimate, mean_ci
from mamlab.tasks.linear import LinearClassification, LinearRegression

__all__ = [
    "TaskType",
    "task_types",
    "adaptation_matrix",
    "noise_constant",
    "maml_objective",
    "maml_optimum",
    "erm_objective",
    "erm_optimum",
    "excess_loss",
    "maml_advantage",
    "linear_parameters",
    "check_exact_config",
    "exact_excess_loss",
    "logistic_one_step_losses",
    "SampledOptimum",
    "SampledLogisticObjective",
    "GRAD_TOL",
]

#: The sampled classification optimum is polished until its gradient norm is below this.
GRAD_TOL = 1e-10
_DT = torch.float64


@dataclass(frozen=True)
class TaskType:
    """One kind of task of a mixture: how often it occurs and its input and weight distributions.

    Args:
        probability: its share of the tasks.
        input_cov: Σ, the inputs' covariance ``[d, d]``.
        weight_mean: m, the mean of its weights ``[d]``.
        weight_cov: C, the covariance of its weights ``[d, d]``.
        noise: σ, the standard deviation of the target noise.
    """

    probability: float
    input_cov: torch.Tensor
    weight_mean: torch.Tensor
    weight_cov: torch.Tensor
    noise: float


def task_types(family: LinearRegression) -> list[TaskType]:
    """The task types of a linear-regression family: easy (and hard, where ``hard_fraction > 0``).

    Args:
        family: a ``mamlab.tasks.LinearRegression``.

    Returns:
        One ``TaskType`` per type with positive probability.
    """
    if not isinstance(family, LinearRegression):
        raise MamlabError(f"the exact theory needs a linear-regression family, got {type(family).__name__}")
    d = family.dim
    eye = torch.eye(d, dtype=_DT)
    cov_w = family.weight_std**2 * eye
    mean = torch.full((d,), family.weight_mean, dtype=_DT)
    p = family.hard_fraction
    out = []
    if p < 1:
        out.append(TaskType(1.0 - p, eye, mean, cov_w, family.noise))
    if p > 0:
        out.append(TaskType(p, family.hard_scale * eye, mean + family.hard_offset, cov_w, family.noise))
    return out


def _check_step(inner_lr: float, shots: int, steps: int) -> float:
    """α of the closed form (0 for zero steps); one-line errors for what it does not cover."""
    check_positive("inner_lr", inner_lr, allow_zero=True)
    check_positive("shots", shots, integer=True)
    if isinstance(steps, bool) or steps not in (0, 1):
        raise MamlabError(
            f"the exact linear theory covers 0 or 1 inner steps, got {steps!r}; more steps need higher "
            "moments of the support covariance and have no closed form here"
        )
    return float(inner_lr) if steps == 1 else 0.0


def adaptation_matrix(input_cov: torch.Tensor, inner_lr: float, shots: int) -> torch.Tensor:
    """A = E[(I − 2αΣ̂)Σ(I − 2αΣ̂)] for K = ``shots`` Gaussian support inputs with covariance Σ.

    Args:
        input_cov: Σ ``[d, d]``.
        inner_lr: α (0 gives Σ).
        shots: K.

    Returns:
        A ``[d, d]`` (float64).
    """
    s = torch.as_tensor(input_cov, dtype=_DT)
    a, k = float(inner_lr), float(shots)
    s2 = s @ s
    s3 = s2 @ s
    return s - 4 * a * s2 + 4 * a * a * ((1 + 1 / k) * s3 + torch.trace(s2) * s / k)


def noise_constant(input_cov: torch.Tensor, noise: float, inner_lr: float, shots: int) -> float:
    """c = σ²(1 + 4α² tr(Σ²)/K): the expected query loss the target noise adds after one step."""
    s = torch.as_tensor(input_cov, dtype=_DT)
    return float(noise) ** 2 * (1 + 4 * float(inner_lr) ** 2 * float(torch.trace(s @ s)) / shots)


def _theta(theta: Any, d: int) -> torch.Tensor:
    t = theta if isinstance(theta, torch.Tensor) else torch.as_tensor(theta)
    t = t.to(_DT).reshape(-1)
    if t.numel() != d:
        raise MamlabError(f"theta has {t.numel()} entries but the tasks have dimension {d}")
    return t


def maml_objective(theta: torch.Tensor | Sequence[float], family: LinearRegression, inner_lr: float,
                   shots: int, steps: int = 1) -> torch.Tensor:
    """F(θ): the exact expected query loss after ``steps`` (0 or 1) inner SGD steps from θ.

    Args:
        theta: θ, ``[d]`` (or ``[1, d]``, the linear model's weight); gradients flow through it.
        family: the linear-regression task distribution.
        inner_lr: α.
        shots: K, support examples per task.
        steps: 0 (no adaptation: the pooled population loss) or 1.

    Returns:
        F(θ) as a float64 scalar tensor (the expected mean squared error on a task's query set).
    """
    a = _check_step(inner_lr, shots, steps)
    types = task_types(family)
    t = _theta(theta, family.dim)
    total = t.new_zeros(())
    for ty in types:
        A = adaptation_matrix(ty.input_cov, a, shots)
        u = t - ty.weight_mean
        total = total + ty.probability * (u @ A @ u + torch.trace(A @ ty.weight_cov)
                                          + noise_constant(ty.input_cov, ty.noise, a, shots))
    return total


def maml_optimum(family: LinearRegression, inner_lr: float, shots: int, steps: int = 1) -> torch.Tensor:
    """θ* = (E A_i)⁻¹ E[A_i m_i], the minimizer of ``maml_objective`` (float64 ``[d]``)."""
    a = _check_step(inner_lr, shots, steps)
    types = task_types(family)
    mats = [ty.probability * adaptation_matrix(ty.input_cov, a, shots) for ty in types]
    rhs = sum(m @ ty.weight_mean for m, ty in zip(mats, types, strict=True))
    return torch.linalg.solve(sum(mats), rhs)


def erm_objective(theta: torch.Tensor | Sequence[float], family: LinearRegression) -> torch.Tensor:
    """The pooled population loss E_i[(θ − w_i)ᵀΣ_i(θ − w_i)] + σ² that pretraining minimizes."""
    return maml_objective(theta, family, 0.0, 1, steps=0)


def erm_optimum(family: LinearRegression) -> torch.Tensor:
    """θ_ERM = (E Σ_i)⁻¹ E[Σ_i m_i], where pretraining on all tasks' data converges (float64 ``[d]``)."""
    return maml_optimum(family, 0.0, 1, steps=0)


def excess_loss(theta: torch.Tensor | Sequence[float], family: LinearRegression, inner_lr: float,
                shots: int) -> float:
    """F(θ) − F(θ*): how much more θ loses after one inner step than the best initialization."""
    star = maml_optimum(family, inner_lr, shots)
    with torch.no_grad():
        return float(maml_objective(theta, family, inner_lr, shots)
                     - maml_objective(star, family, inner_lr, shots))


def maml_advantage(family: LinearRegression, inner_lr: float, shots: int) -> float:
    """F(θ_ERM) − F(θ*): the one-step meta-test loss MAML's optimum saves over pretraining's (>= 0)."""
    return excess_loss(erm_optimum(family), family, inner_lr, shots)


# ---------------------------------------------------------------------- runs
def linear_parameters(model: torch.nn.Module) -> torch.Tensor:
    """θ of a linear model without bias (``MLP(d, 1, hidden=(), bias=False)``) as a float64 ``[d]``."""
    params = list(model.parameters())
    if len(params) != 1 or params[0].dim() != 2 or params[0].shape[0] != 1:
        shapes = [tuple(p.shape) for p in params]
        raise MamlabError(
            f"the exact theory needs a linear model f(x) = θᵀx (one [1, d] weight), got {shapes}")
    return params[0].detach().to("cpu", _DT).reshape(-1)


def check_exact_config(config: Any) -> str | None:
    """Why the exact one-step theory does not apply to a run's configuration, or None if it does.

    It applies to linear-regression and linear-classification runs with a linear model (no hidden
    layers), adapted at test time by one plain SGD step on all parameters: MAML (second or first
    order) and the pretrain baseline with ``inner_steps = 1``.
    """
    if config.task not in ("linear-regression", "linear-classification"):
        return f"the exact theory covers the linear task families, not {config.task!r}"
    if config.task_options.get("hidden"):
        return f"the model has hidden layers {config.task_options['hidden']}; the theory needs a linear model"
    if config.algorithm not in ("maml", "pretrain"):
        return (f"algorithm {config.algorithm!r} does not adapt by one plain SGD step of a single α; "
                "the theory covers maml and pretrain runs")
    if config.algorithm_options.get("inner_params"):
        return "the run adapts only some parameters (inner_params); the theory adapts all"
    steps = config.algorithm_options.get("inner_steps", 1)
    if steps != 1:
        return f"the run takes {steps} inner steps; the exact theory covers one"
    return None


def exact_excess_loss(theta: torch.Tensor | torch.nn.Module, config: Any) -> float:
    """F(θ) − F(θ*) for a linear-regression run's configuration: its task family, α and K.

    The public entry for sweeps: a trained model (or its θ) and its ``TrainConfig`` give the exact
    excess meta-test loss after one inner step of ``config.inner_lr`` on ``config.shots`` examples.

    Args:
        theta: θ ``[d]`` or the trained linear model.
        config: the run's ``mamlab.config.TrainConfig``.

    Returns:
        The excess loss (>= 0 up to rounding).
    """
    reason = check_exact_config(config)
    if reason is None and config.task != "linear-regression":
        reason = "linear-classification has no closed form; use SampledLogisticObjective"
    if reason is not None:
        raise MamlabError(f"exact excess loss: {reason}")
    t = linear_parameters(theta) if isinstance(theta, torch.nn.Module) else theta
    return excess_loss(t, build_family(config, "test"), config.inner_lr, config.shots)


# ---------------------------------------------------------------------- classification
def logistic_one_step_losses(theta: torch.Tensor, support_x: torch.Tensor, support_y: torch.Tensor,
                             query_x: torch.Tensor, query_y: torch.Tensor, inner_lr: float) -> torch.Tensor:
    """Each task's query logistic loss after one SGD step of size α on its support set, ``[T]``.

    θ' = θ − α (1/K) Xₛᵀ(σ(Xₛθ) − yₛ); loss = mean over queries of BCE(X_q θ', y_q). Inputs are
    ``[T, N, d]`` and ``[T, N, 1]``; differentiable with respect to θ ``[d]``.
    """
    sy, qy = support_y[..., 0], query_y[..., 0]
    k = support_x.shape[1]
    residual = torch.sigmoid(torch.einsum("tkd,d->tk", support_x, theta)) - sy
    adapted = theta - inner_lr * torch.einsum("tkd,tk->td", support_x, residual) / k
    logits = torch.einsum("tqd,td->tq", query_x, adapted)
    return F.binary_cross_entropy_with_logits(logits, qy, reduction="none").mean(1)


@dataclass(frozen=True)
class SampledOptimum:
    """The minimizer of the sampled one-step objective, with its Monte-Carlo errors.

    Args:
        theta: θ̂ ``[d]`` (float64), the optimum of the *sampled* objective.
        theta_se: standard error of each coordinate of θ̂ as an estimate of the population optimum
            (sandwich H⁻¹VH⁻¹/T over the sampled tasks).
        objective: F̂(θ̂), the sampled objective at its optimum.
        objective_se: the standard error of F̂(θ̂) as an estimate of the population F(θ̂).
        grad_norm: ‖∇F̂(θ̂)‖ reached (< ``GRAD_TOL``).
        tasks: sampled tasks T.
    """

    theta: torch.Tensor
    theta_se: torch.Tensor
    objective: float
    objective_se: float
    grad_norm: float
    tasks: int


class SampledLogisticObjective:
    """The one-step MAML objective of linear binary classification on a fixed sample of tasks.

    Args:
        family: a ``mamlab.tasks.LinearClassification``.
        inner_lr: α.
        shots: K support examples per task.
        tasks: sampled tasks T (the Monte-Carlo error shrinks as 1/√T).
        queries: query examples per task (more queries: less noise; the expectation is the same).
        seed: seeds the sample.
    """

    def __init__(self, family: LinearClassification, inner_lr: float, shots: int, tasks: int = 20000,
                 queries: int = 50, seed: int = 0) -> None:
        if not isinstance(family, LinearClassification):
            raise MamlabError(f"the sampled logistic objective needs a linear-classification family, "
                              f"got {type(family).__name__}")
        check_positive("inner_lr", inner_lr, allow_zero=True)
        check_positive("tasks", tasks, integer=True)
        if tasks < 2:
            raise MamlabError(f"tasks must be an integer >= 2 (standard errors need two), got {tasks!r}")
        self.inner_lr, self.shots, self.tasks, self.queries = float(inner_lr), shots, tasks, queries
        self.seed = seed
        self.batch = family.sample(tasks, shots, queries, torch.Generator().manual_seed(seed)).to(dtype=_DT)
        self._optimum: SampledOptimum | None = None

    def losses(self, theta: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Per-task query losses after one step from θ, ``[T]`` (differentiable in θ)."""
        b = self.batch
        t = _theta(theta, b.support_x.shape[-1])
        return logistic_one_step_losses(t, b.support_x, b.support_y, b.query_x, b.query_y, self.inner_lr)

    def objective(self, theta: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """F̂(θ): the mean of ``losses(θ)``."""
        return self.losses(theta).mean()

    def optimum(self) -> SampledOptimum:
        """θ̂ = argmin F̂ by L-BFGS from θ = 0, then Newton steps until ‖∇F̂‖ < ``GRAD_TOL`` (cached)."""
        if self._optimum is None:
            self._optimum = self._solve()
        return self._optimum

    def _solve(self) -> SampledOptimum:
        d = self.batch.support_x.shape[-1]
        theta = torch.zeros(d, dtype=_DT, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=0.0,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = self.objective(theta)
            value.backward()
            return value

        opt.step(closure)
        t = theta.detach().clone()
        grad = torch.func.grad(self.objective)
        for _ in range(50):
            g = grad(t)
            if float(g.norm()) < GRAD_TOL:
                break
            t = t - torch.linalg.solve(torch.func.hessian(self.objective)(t), g)
        g = grad(t)
        if not float(g.norm()) < GRAD_TOL:
            raise MamlabError(
                f"the sampled logistic objective did not converge: gradient norm {float(g.norm()):.3g}")
        b = self.batch

        def one(th: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
                qy: torch.Tensor) -> torch.Tensor:
            return logistic_one_step_losses(th, sx[None], sy[None], qx[None], qy[None], self.inner_lr)[0]

        per_task = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0, 0))(
            t, b.support_x, b.support_y, b.query_x, b.query_y)
        h_inv = torch.linalg.inv(torch.func.hessian(self.objective)(t))
        v = torch.cov(per_task.T, correction=1).reshape(d, d)
        cov = h_inv @ v @ h_inv / self.tasks
        losses = self.losses(t).detach()
        return SampledOptimum(t, cov.diagonal().clamp_min(0).sqrt(), float(losses.mean()),
                              float(losses.std() / math.sqrt(self.tasks)), float(g.norm()), self.tasks)

    def excess(self, theta: torch.Tensor | Sequence[float]) -> Estimate:
        """F̂(θ) − F̂(θ̂) paired over the sampled tasks: mean and 95% CI, an estimate of F(θ) − F(θ̂)."""
        with torch.no_grad():
            diff = (self.losses(theta) - self.losses(self.optimum().theta)).numpy()
        mean, hw = mean_ci(diff)
        return Estimate(float(mean), float(hw), int(diff.size))
