"""Generalization studies of meta-learned networks: pure functions from learners and episodes to numbers.

A :class:`Learner` is a network that is adapted to each task by plain SGD on the task's support
set: a MAML or first-order MAML run, the pretrain baseline (Finn et al. 2017), a randomly
initialized network, or head-only adaptation of a MAML network (ANIL, Raghu et al. 2020). Every
study takes the learners and the *same* ``TaskBatch`` for all of them, so per-task scores are
paired across learners; each number comes back as an :class:`~mamlab.stats.Estimate`
(mean ± 95% CI half-width over tasks) and differences between learners as paired estimates.

Divergence: with too large a step (e.g. a support-loss Hessian eigenvalue above 2/α) the inner
loop blows up on some tasks and their losses dwarf every mean. A task's loss has *diverged* when
it is not finite or exceeds ``DIVERGENCE_FACTOR`` (100) times the same loss at step 0, before
adaptation (:func:`diverged`). So next to every loss ``key`` (a list per step/condition, or one
value), a study also returns ``key_median`` (a :class:`~mamlab.stats.Median` over all
tasks, diverged ones counted as +inf, with its distribution-free 95% CI) and ``key_diverged``
(the number of diverged tasks); paired loss differences get ``key_median`` too.

Studies (all on held-out tasks unless stated):

* :func:`adaptation_curves`: query and support loss (and accuracy) after 0..S inner steps.
* :func:`shot_sweep`: query loss against the number of support examples K at fixed steps.
* :func:`generalization_gap`: training-distribution vs held-out tasks; support vs query loss.
* :func:`meta_overfitting_curve`: the same across a run's training checkpoints.
* :func:`distribution_shift`: query loss as tasks move away from the training distribution
  (:func:`sinusoid_shift_conditions`, :func:`rotation_conditions`).
* :func:`representation_change`: per-layer CKA/CCA between representations before and after
  adaptation, and each layer's relative parameter change (Raghu et al. 2020).
* :func:`landscape`: top Hessian eigenvalue of the support/query loss at θ and θ', and the
  gradient norm along the inner trajectory.
* :func:`stability`: the edge of stability: the support loss's top Hessian eigenvalue across a
  run's checkpoints against 2/α, and at the final θ the diverged tasks against K and inner steps,
  with the 2×2 table of sharp (λ_max > 2/α) × diverged tasks.
* ``exact`` (``mamlab.analysis.exact``): linear models against the exact one-step MAML optimum.

References:
    C. Finn, P. Abbeel, S. Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks. ICML 2017.
    A. Raghu, M. Raghu, S. Bengio, O. Vinyals. Rapid Learning or Feature Reuse? Towards
    Understanding the Effectiveness of MAML. ICLR 2020.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mamlab.algorithms import ANIL, MetaAlgorithm, build_algorithm
from mamlab.analysis.landscape import top_hessian_eigenvalue
from mamlab.analysis.representations import (
    capture_representations,
    head_parameter_names,
    layer_label,
    parametrized_layers,
    relative_parameter_change,
    representation_layers,
)
from mamlab.analysis.similarity import cca_similarity, linear_cka
from mamlab.config import TrainConfig
from mamlab.core.execution import TaskEngine
from mamlab.core.losses import per_task_loss
from mamlab.core.params import forward, parameters_of
from mamlab.errors import MamlabError, check_positive
from mamlab.evaluate import eval_generator
from mamlab.experiments import accuracy, build_model, is_classification, loss_for
from mamlab.stats import (
    Estimate,
    Median,
    mean_ci,
    median_estimate,
    paired_difference_ci,
    unpaired_difference_ci,
)
from mamlab.tasks.base import TaskBatch, TaskFamily
from mamlab.tasks.sinusoid import Sinusoid

__all__ = [
    "STUDIES",
    "KINDS",
    "RANDOM_INIT_SEED_OFFSET",
    "DIVERGENCE_FACTOR",
    "diverged",
    "robust_loss",
    "paired_median",
    "Learner",
    "Scores",
    "run_kind",
    "random_init_model",
    "anil_learner",
    "estimate_finite",
    "paired_estimate",
    "episodes",
    "adaptation_scores",
    "adaptation_curves",
    "shot_sweep",
    "generalization_gap",
    "meta_overfitting_curve",
    "sinusoid_shift_conditions",
    "rotate_batch",
    "rotation_conditions",
    "distribution_shift",
    "representation_change",
    "landscape",
    "CONTINGENCY_CELLS",
    "single_inner_lr",
    "support_sharpness",
    "stability_contingency",
    "sharpness_trajectory",
    "divergence_and_sharpness",
    "stability",
]

#: The studies ``mamlab.analysis.pipeline.analyze_runs`` can run, in report order.
STUDIES = ("adaptation", "shots", "generalization", "shift", "representations", "landscape", "stability",
           "exact")
#: Kinds of learner: trained runs (maml, fomaml, pretrain) and the baselines derived here.
KINDS = ("maml", "fomaml", "pretrain", "random", "anil")
#: The randomly initialized baseline is built under ``torch.manual_seed(RANDOM_INIT_SEED_OFFSET + seed)``.
RANDOM_INIT_SEED_OFFSET = 3_000_017
#: A task's loss has diverged when it is non-finite or above ``DIVERGENCE_FACTOR`` × its step-0 loss.
DIVERGENCE_FACTOR = 100.0


@dataclass
class Learner:
    """A trained (or baseline) network with the algorithm that adapts it per task.

    Args:
        name: its label in tables and figures (unique among the learners compared).
        algorithm: the ``MetaAlgorithm`` that adapts it (``load_run(...).algorithm``), or a bare
            network, which is then adapted by the config's algorithm (ANIL's for ``kind="anil"``).
        config: the run's configuration (task, loss, execution path).
        kind: one of ``KINDS``, or a registered algorithm's name.
    """

    name: str
    algorithm: MetaAlgorithm | nn.Module
    config: TrainConfig
    kind: str

    def __post_init__(self) -> None:
        if not isinstance(self.algorithm, MetaAlgorithm):
            options = dict(self.config.algorithm_options)
            name = "anil" if self.kind == "anil" else self.config.algorithm
            if name == "anil":
                options = {k: options[k] for k in ("inner_lr", "inner_steps") if k in options}
            self.algorithm = build_algorithm(name, self.algorithm, loss_for(self.config), options,
                                             execution=self.config.execution)

    @property
    def model(self) -> nn.Module:
        """The network; never modified."""
        return self.algorithm.model

    @property
    def inner_lr(self) -> float | None:
        """The inner step size of the learner's adaptation, where it has a single one."""
        lr = getattr(self.algorithm, "inner_lr", None)
        return None if lr is None else float(lr)

    @property
    def trained_steps(self) -> int:
        """The inner steps of the run the network comes from (its config's), else the algorithm's."""
        return int(self.config.algorithm_options.get("inner_steps", self.algorithm.inner_steps))

    @property
    def inner_params(self) -> list[str] | None:
        """The parameters adapted per task (``None``: all)."""
        return getattr(self.algorithm, "inner_params", None)


def run_kind(config: TrainConfig) -> str:
    """How a run's network was trained: ``"pretrain"``, ``"fomaml"``, ``"maml"`` or the algorithm's name."""
    if config.algorithm == "maml" and config.algorithm_options.get("first_order"):
        return "fomaml"
    return config.algorithm


def random_init_model(config: TrainConfig, seed: int = 0) -> nn.Module:
    """A freshly initialized network of the config's architecture, reproducible from ``seed``.

    The global torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED_OFFSET + int(seed))
        return build_model(config)


def anil_learner(learner: Learner, name: str | None = None) -> Learner:
    """Head-only adaptation (ANIL, Raghu et al. 2020) of ``learner``'s network, at its inner step size."""
    anil = ANIL(learner.model, loss_for(learner.config), inner_lr=learner.inner_lr or 0.01,
                head=head_parameter_names(learner.model), execution=learner.config.execution)
    return Learner(name or f"ANIL ({learner.name})", anil, learner.config, "anil")


# ---------------------------------------------------------------------- estimates
def estimate_finite(values: torch.Tensor | np.ndarray | Sequence[float]) -> Estimate:
    """Mean ± 95% CI of the finite values (NaN where fewer than 2); ``n`` counts those used."""
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        return Estimate(float(arr.mean()) if arr.size else math.nan, math.nan, int(arr.size))
    if np.all(arr == arr[0]):
        return Estimate(float(arr[0]), 0.0, int(arr.size))
    mean, hw = mean_ci(arr)
    return Estimate(mean, hw, int(arr.size))


def paired_estimate(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> Estimate:
    """Mean of ``a − b`` over paired tasks, with its 95% CI (tasks where either is non-finite dropped)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return Estimate(math.nan, math.nan, int(keep.sum()))
    d = x[keep] - y[keep]
    if np.all(d == d[0]):
        return Estimate(float(d[0]), 0.0, int(keep.sum()))
    mean, hw = paired_difference_ci(x[keep], y[keep])
    return Estimate(mean, hw, int(keep.sum()))


def _arr(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    return np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)


def diverged(loss: torch.Tensor | np.ndarray, initial: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per task: the loss is not finite, or above ``DIVERGENCE_FACTOR`` × ``initial`` (the step-0 loss)."""
    x, x0 = _arr(loss), _arr(initial)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(x) | (x > DIVERGENCE_FACTOR * x0)


def _as_inf(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """Values with NaN replaced by +inf: a NaN loss is a diverged one, ranked above every finite loss."""
    x = _arr(values)
    return np.where(np.isnan(x), np.inf, x)


def robust_loss(out: dict[str, Any], key: str, losses: Sequence[torch.Tensor | np.ndarray],
                initial: Sequence[torch.Tensor | np.ndarray], single: bool = False) -> None:
    """Set ``out[key]`` (mean ± CI of the finite values), ``key_median`` and ``key_diverged``.

    Args:
        out: the dict to fill.
        key: the loss's name, e.g. ``"query_loss"``.
        losses: per-task losses, one array per step or condition.
        initial: the same tasks' loss at step 0 (before adaptation), one array per entry of ``losses``.
        single: store one value instead of a one-element list.
    """
    means = [estimate_finite(v) for v in losses]
    medians = [median_estimate(_as_inf(v)) for v in losses]
    counts = [int(diverged(v, v0).sum()) for v, v0 in zip(losses, initial, strict=True)]
    if single:
        out[key], out[key + "_median"], out[key + "_diverged"] = means[0], medians[0], counts[0]
    else:
        out[key], out[key + "_median"], out[key + "_diverged"] = means, medians, counts


def paired_median(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> Median:
    """Median of ``a − b`` over paired tasks, 95% CI; a non-finite loss counts as +inf (both: a tie, 0)."""
    x, y = _as_inf(a), _as_inf(b)
    both = np.isinf(x) & np.isinf(y) & (np.sign(x) == np.sign(y))
    with np.errstate(invalid="ignore"):
        d = np.where(both, 0.0, x - y)
    return median_estimate(d)


def _best(means: Sequence[Estimate], medians: Sequence[Median], diverged_counts: Sequence[int],
          default: int) -> int:
    """Index of the lowest loss: by median where any task diverged, else by mean."""
    vals = np.asarray([m.median for m in medians] if any(diverged_counts) else [e.mean for e in means])
    ok = np.isfinite(vals)
    return int(np.flatnonzero(ok)[np.argmin(vals[ok])]) if ok.any() else default


def _unpaired(a: torch.Tensor, b: torch.Tensor) -> Estimate:
    """Mean of ``a`` − mean of ``b`` (independent tasks, Welch interval), non-finite values dropped."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if min(x.size, y.size) < 2:
        return Estimate(math.nan, math.nan, int(min(x.size, y.size)))
    mean, hw = unpaired_difference_ci(x, y)
    return Estimate(mean, hw, int(min(x.size, y.size)))


# ---------------------------------------------------------------------- episodes
def episodes(family: TaskFamily, num_tasks: int, shots: int, queries: int,
             generator: torch.Generator) -> TaskBatch:
    """``num_tasks`` tasks from ``family`` as one batch, drawn from ``generator`` in chunks of 200."""
    check_positive("tasks", num_tasks, integer=True)
    parts, done = [], 0
    while done < num_tasks:
        n = min(200, num_tasks - done)
        parts.append(family.sample(n, shots, queries, generator))
        done += n
    if len(parts) == 1:
        return parts[0]
    return TaskBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in
                       ("support_x", "support_y", "query_x", "query_y")))


@dataclass
class Scores:
    """Per-task scores ``[T, S+1]`` after 0..S inner steps: query/support loss, query accuracy."""

    steps: list[int]
    query_loss: torch.Tensor
    support_loss: torch.Tensor
    query_accuracy: torch.Tensor | None = None
    initial_query_loss: torch.Tensor | None = None
    initial_support_loss: torch.Tensor | None = None

    def q0(self) -> torch.Tensor:
        """Per-task query loss at step 0 (before adaptation)."""
        return self.query_loss[:, 0] if self.initial_query_loss is None else self.initial_query_loss

    def s0(self) -> torch.Tensor:
        """Per-task support loss at step 0 (before adaptation)."""
        return self.support_loss[:, 0] if self.initial_support_loss is None else self.initial_support_loss


def adaptation_scores(learner: Learner, batch: TaskBatch, steps: int) -> Scores:
    """Adapt ``learner`` to every task of ``batch`` for 1..``steps`` steps; score after each.

    Step 0 is the un-adapted network θ; step s is θ after s SGD steps on the support set.
    """
    check_positive("steps", steps, integer=True, allow_zero=True)
    maml = learner.algorithm
    dtype = next(learner.model.parameters()).dtype
    batch = batch.to(device=next(learner.model.parameters()).device, dtype=dtype)
    per_task = per_task_loss(loss_for(learner.config))
    classify = is_classification(learner.config)
    q_loss, s_loss, q_acc = [], [], []
    params = None
    for s in range(steps + 1):
        params = maml.adapt(batch.support_x, batch.support_y, steps=0 if s == 0 else 1,
                            start=params)
        with torch.no_grad():
            pq = maml.predict(params, batch.query_x)
            ps = maml.predict(params, batch.support_x)
            q_loss.append(per_task(pq, batch.query_y).double())
            s_loss.append(per_task(ps, batch.support_y).double())
            if classify:
                q_acc.append(accuracy(learner.config, pq, batch.query_y).double())
    return Scores(list(range(steps + 1)), torch.stack(q_loss, 1), torch.stack(s_loss, 1),
                  torch.stack(q_acc, 1) if classify else None)


def _final_scores(learner: Learner, batch: TaskBatch, steps: int) -> Scores:
    """Scores after exactly ``steps`` steps only (column 0), and the step-0 losses (``initial_*``)."""
    maml = learner.algorithm
    first = next(learner.model.parameters())
    batch = batch.to(device=first.device, dtype=first.dtype)
    theta = maml.adapt(batch.support_x, batch.support_y, steps=0)
    params = maml.adapt(batch.support_x, batch.support_y, steps=steps, start=theta) if steps else theta
    per_task = per_task_loss(loss_for(learner.config))
    with torch.no_grad():
        q0 = per_task(maml.predict(theta, batch.query_x), batch.query_y).double()
        s0 = per_task(maml.predict(theta, batch.support_x), batch.support_y).double()
        pq = maml.predict(params, batch.query_x)
        ps = maml.predict(params, batch.support_x)
        acc = (accuracy(learner.config, pq, batch.query_y).double().unsqueeze(1)
               if is_classification(learner.config) else None)
        return Scores([steps], per_task(pq, batch.query_y).double().unsqueeze(1),
                      per_task(ps, batch.support_y).double().unsqueeze(1), acc, q0, s0)


def _names(learners: Sequence[Learner]) -> list[str]:
    if not learners:
        raise MamlabError("no learners given; pass at least one")
    names = [lr.name for lr in learners]
    if len(set(names)) != len(names):
        raise MamlabError(f"learner names must be unique, got {names!r}")
    return names


# ---------------------------------------------------------------------- 1. adaptation curves
def adaptation_curves(learners: Sequence[Learner], batch: TaskBatch, steps: int,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Query/support loss (and accuracy) after 0..``steps`` inner steps, for each learner.

    Args:
        learners: the learners; the first is the reference of the paired differences.
        batch: the held-out tasks, the same for every learner.
        steps: the largest number of inner steps S.
        progress: called with each learner's name as it starts.

    Returns:
        ``steps``; per learner ``query_loss``/``support_loss``/``query_accuracy`` (one Estimate
        per step); ``paired_query_loss[name]``: learner − reference per step; ``extrapolation``
        per learner: ``trained_steps`` k, ``gain_after_trained`` (loss at k − loss at S, > 0:
        it kept improving), ``best_step``, ``rebound`` (loss at S − loss at the best step),
        ``query_minus_support`` at S (the support-set overfitting gap).
    """
    names = _names(learners)
    scores: dict[str, Scores] = {}
    for lr in learners:
        if progress is not None:
            progress(lr.name)
        scores[lr.name] = adaptation_scores(lr, batch, steps)
    ref = scores[names[0]]
    out: dict[str, Any] = {"steps": list(range(steps + 1)), "reference": names[0], "tasks": batch.num_tasks,
                           "divergence_factor": DIVERGENCE_FACTOR, "learners": {}, "paired_query_loss": {},
                           "paired_query_loss_median": {}, "paired_query_accuracy": {}, "extrapolation": {}}
    for lr in learners:
        sc = scores[lr.name]
        entry: dict[str, Any] = {"kind": lr.kind, "inner_lr": lr.inner_lr}
        robust_loss(entry, "query_loss", list(sc.query_loss.T), [sc.q0()] * (steps + 1))
        robust_loss(entry, "support_loss", list(sc.support_loss.T), [sc.s0()] * (steps + 1))
        if sc.query_accuracy is not None:
            entry["query_accuracy"] = [estimate_finite(sc.query_accuracy[:, s]) for s in range(steps + 1)]
        out["learners"][lr.name] = entry
        if lr.name != names[0]:
            out["paired_query_loss"][lr.name] = [paired_estimate(sc.query_loss[:, s], ref.query_loss[:, s])
                                                 for s in range(steps + 1)]
            out.setdefault("paired_query_loss_median", {})[lr.name] = [
                paired_median(sc.query_loss[:, s], ref.query_loss[:, s]) for s in range(steps + 1)]
            if sc.query_accuracy is not None and ref.query_accuracy is not None:
                out["paired_query_accuracy"][lr.name] = [
                    paired_estimate(sc.query_accuracy[:, s], ref.query_accuracy[:, s])
                    for s in range(steps + 1)]
        k = min(lr.trained_steps, steps)
        best = _best(entry["query_loss"], entry["query_loss_median"], entry["query_loss_diverged"], 0)
        out["extrapolation"][lr.name] = {
            "trained_steps": lr.trained_steps if lr.kind in ("maml", "fomaml") else None,
            "gain_after_trained": paired_estimate(sc.query_loss[:, k], sc.query_loss[:, steps]),
            "best_step": best,
            "rebound": paired_estimate(sc.query_loss[:, steps], sc.query_loss[:, best]),
            "query_minus_support": paired_estimate(sc.query_loss[:, steps], sc.support_loss[:, steps]),
            "gain_after_trained_median": paired_median(sc.query_loss[:, k], sc.query_loss[:, steps]),
            "rebound_median": paired_median(sc.query_loss[:, steps], sc.query_loss[:, best]),
            "query_minus_support_median": paired_median(sc.query_loss[:, steps], sc.support_loss[:, steps]),
        }
    return out


# ---------------------------------------------------------------------- 2. shots
def shot_sweep(learners: Sequence[Learner], batches: Mapping[int, TaskBatch], steps: int,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Query loss (and accuracy) after ``steps`` inner steps against the number of shots K.

    Args:
        learners: the learners; the first is the reference of the paired differences.
        batches: K → held-out tasks with K support examples (per class), the same for every learner.
        steps: the fixed number of inner steps.
        progress: called with each learner's name as it starts.
    """
    names = _names(learners)
    shots = sorted(batches)
    finals: dict[str, dict[int, Scores]] = {}
    for lr in learners:
        if progress is not None:
            progress(lr.name)
        finals[lr.name] = {k: _final_scores(lr, batches[k], steps) for k in shots}
    out: dict[str, Any] = {"shots": shots, "steps": steps, "reference": names[0],
                           "tasks": batches[shots[0]].num_tasks,
                           "divergence_factor": DIVERGENCE_FACTOR, "learners": {}, "paired_query_loss": {},
                           "paired_query_loss_median": {}}
    for name in names:
        entry: dict[str, Any] = {}
        robust_loss(entry, "query_loss", [finals[name][k].query_loss[:, 0] for k in shots],
                    [finals[name][k].q0() for k in shots])
        if finals[name][shots[0]].query_accuracy is not None:
            entry["query_accuracy"] = [estimate_finite(finals[name][k].query_accuracy[:, 0])  # type: ignore[index]
                                       for k in shots]
        out["learners"][name] = entry
        if name != names[0]:
            out["paired_query_loss"][name] = [
                paired_estimate(finals[name][k].query_loss[:, 0], finals[names[0]][k].query_loss[:, 0])
                for k in shots]
            out["paired_query_loss_median"][name] = [
                paired_median(finals[name][k].query_loss[:, 0], finals[names[0]][k].query_loss[:, 0])
                for k in shots]
    return out


# ---------------------------------------------------------------------- 3. generalization
def generalization_gap(learners: Sequence[Learner], heldout: TaskBatch, train: TaskBatch, steps: int,
                       same_distribution: bool = False) -> dict[str, Any]:
    """Scores on training-distribution vs held-out tasks, and support vs query loss, after ``steps``.

    Args:
        learners: the learners.
        heldout: held-out tasks (the evaluation stream).
        train: tasks from the meta-training distribution (a stream other than training's).
        steps: inner steps before scoring.
        same_distribution: the two distributions coincide (sinusoids), recorded with the result.

    Returns:
        Per learner: ``train_query_loss``, ``heldout_query_loss``, ``heldout_minus_train`` (an
        unpaired difference: different tasks), ``train_support_loss``, ``heldout_support_loss``,
        ``query_minus_support`` (paired over the held-out tasks) and accuracies when classifying.
    """
    _names(learners)
    out: dict[str, Any] = {"steps": steps, "same_distribution": bool(same_distribution),
                           "heldout_tasks": heldout.num_tasks, "train_tasks": train.num_tasks, "learners": {}}
    for lr in learners:
        h, t = _final_scores(lr, heldout, steps), _final_scores(lr, train, steps)
        entry: dict[str, Any] = {}
        robust_loss(entry, "train_query_loss", [t.query_loss[:, 0]], [t.q0()], single=True)
        robust_loss(entry, "heldout_query_loss", [h.query_loss[:, 0]], [h.q0()], single=True)
        entry["heldout_minus_train"] = _unpaired(h.query_loss[:, 0], t.query_loss[:, 0])
        robust_loss(entry, "train_support_loss", [t.support_loss[:, 0]], [t.s0()], single=True)
        robust_loss(entry, "heldout_support_loss", [h.support_loss[:, 0]], [h.s0()], single=True)
        entry["query_minus_support"] = paired_estimate(h.query_loss[:, 0], h.support_loss[:, 0])
        entry["query_minus_support_median"] = paired_median(h.query_loss[:, 0], h.support_loss[:, 0])
        if h.query_accuracy is not None and t.query_accuracy is not None:
            entry["train_query_accuracy"] = estimate_finite(t.query_accuracy[:, 0])
            entry["heldout_query_accuracy"] = estimate_finite(h.query_accuracy[:, 0])
        out["learners"][lr.name] = entry
    return out


def meta_overfitting_curve(snapshots: Sequence[tuple[int, nn.Module | MetaAlgorithm]], config: TrainConfig,
                           heldout: TaskBatch, train: TaskBatch, steps: int,
                           kind: str = "maml") -> dict[str, Any]:
    """Query loss after ``steps`` inner steps, on held-out and training-distribution tasks, per checkpoint.

    Args:
        snapshots: ``(iteration, algorithm or network)`` pairs, e.g. from a run's checkpoints, in any
            order.
        config: the run's configuration.
        heldout: held-out tasks (the same for every checkpoint).
        train: training-distribution tasks (the same for every checkpoint).
        steps: inner steps before scoring.
        kind: the learner kind (recorded).

    Returns:
        ``iterations`` ascending, ``heldout_query_loss`` and ``train_query_loss`` (one Estimate
        each, with ``_median`` and ``_diverged``), ``best_iteration`` (lowest mean held-out loss,
        median where a task diverged) and ``final_minus_best`` (paired
        over the held-out tasks: > 0 means the last checkpoint is worse than the best, i.e.
        meta-overfitting).
    """
    if not snapshots:
        raise MamlabError("no checkpoints given; the run needs at least one")
    snaps = sorted(snapshots, key=lambda s: s[0])
    held, trn, held0, trn0 = [], [], [], []
    for it, model in snaps:
        lr = Learner(f"iter {it}", model, config, kind)
        h, t = _final_scores(lr, heldout, steps), _final_scores(lr, train, steps)
        held.append(h.query_loss[:, 0])
        trn.append(t.query_loss[:, 0])
        held0.append(h.q0())
        trn0.append(t.q0())
    out: dict[str, Any] = {"iterations": [it for it, _ in snaps], "steps": steps}
    robust_loss(out, "heldout_query_loss", held, held0)
    robust_loss(out, "train_query_loss", trn, trn0)
    h_key = "heldout_query_loss"
    best = _best(out[h_key], out[h_key + "_median"], out[h_key + "_diverged"], len(snaps) - 1)
    out["best_iteration"] = snaps[best][0]
    out["final_minus_best"] = paired_estimate(held[-1], held[best])
    return out


# ---------------------------------------------------------------------- 4. distribution shift
def _bands(lo: float, hi: float, widths: Sequence[float]) -> list[tuple[float, float]]:
    edges = [hi]
    for w in widths:
        edges.append(edges[-1] + w)
    return [(lo, hi)] + list(zip(edges[:-1], edges[1:], strict=True))


def sinusoid_shift_conditions(config: TrainConfig, num_tasks: int, shots: int, queries: int,
                              seed: int) -> dict[str, list[tuple[str, TaskBatch]]]:
    """Sinusoid tasks in bands beyond the training ranges: amplitude, phase, and input x.

    Each axis starts with the training range itself, then three bands above its upper end
    (amplitude +1, +2, +2 beyond A_max, e.g. [5, 6], [6, 8], [8, 10]; phase +π/4, +π/4, +π/2
    beyond φ_max; x +1, +2, +2 beyond x_max, support and query both drawn there), the other
    ranges kept at training's. Each band's tasks are seeded from the evaluation stream of ``seed``.

    Returns:
        Axis (``"amplitude"``, ``"phase"``, ``"x"``) → ``[(band label, tasks), ...]``.
    """
    if config.task != "sinusoid":
        raise MamlabError(f"sinusoid shift conditions need a sinusoid run, got task {config.task!r}")
    amp, ph, xr = tuple(config.amplitude), tuple(config.phase), tuple(config.x_range)
    axes = {
        "amplitude": [(b, Sinusoid(b, ph, xr, config.noise)) for b in _bands(*amp, (1.0, 2.0, 2.0))],
        "phase": [(b, Sinusoid(amp, b, xr, config.noise)) for b in _bands(*ph, (math.pi / 4, math.pi / 4,
                                                                                  math.pi / 2))],
        "x": [(b, Sinusoid(amp, ph, b, config.noise)) for b in _bands(*xr, (1.0, 2.0, 2.0))],
    }
    out: dict[str, list[tuple[str, TaskBatch]]] = {}
    for a, (axis, families) in enumerate(axes.items()):
        out[axis] = []
        for b, (band, fam) in enumerate(families):
            gen = eval_generator(seed * 1000 + 100 * (a + 1) + b)
            label = ("train " if b == 0 else "") + f"[{band[0]:.3g}, {band[1]:.3g}]"
            out[axis].append((label, episodes(fam, num_tasks, shots, queries, gen)))
    return out


def rotate_batch(batch: TaskBatch, quarter_turns: int) -> TaskBatch:
    """Every image of ``batch`` (``[T, N, (C,) H, W]``) rotated by 90° × ``quarter_turns``."""
    if batch.support_x.dim() < 4:
        raise MamlabError("rotation needs image inputs [T, N, (C,) H, W], got "
                          f"{tuple(batch.support_x.shape)}")
    return TaskBatch(torch.rot90(batch.support_x, quarter_turns, dims=(-2, -1)), batch.support_y,
                     torch.rot90(batch.query_x, quarter_turns, dims=(-2, -1)), batch.query_y)


def rotation_conditions(batch: TaskBatch) -> dict[str, list[tuple[str, TaskBatch]]]:
    """Image tasks rotated by 0, 90, 180 and 270 degrees (support and query alike): one axis."""
    return {"rotation": [(f"{90 * r}°", rotate_batch(batch, r) if r else batch) for r in range(4)]}


def distribution_shift(learners: Sequence[Learner], conditions: Mapping[str, Sequence[tuple[str, TaskBatch]]],
                       steps: int) -> dict[str, Any]:
    """Query loss (and accuracy) after ``steps`` inner steps on each shifted condition.

    Args:
        learners: the learners; the first is the reference of the paired differences.
        conditions: axis → ``[(label, tasks), ...]``, the first of each axis in-distribution.
        steps: inner steps before scoring.

    Returns:
        Per axis: ``labels``, per learner ``query_loss`` (and ``query_accuracy``), one Estimate
        per condition; ``degradation[name]``: loss on each condition − loss in-distribution
        (unpaired: different tasks); ``paired_query_loss[name]``: learner − reference.
    """
    names = _names(learners)
    out: dict[str, Any] = {"steps": steps, "reference": names[0], "axes": {}}
    for axis, conds in conditions.items():
        labels = [c[0] for c in conds]
        finals = {lr.name: [_final_scores(lr, b, steps) for _, b in conds] for lr in learners}
        ax: dict[str, Any] = {"labels": labels, "learners": {}, "degradation": {}, "paired_query_loss": {}}
        for name in names:
            sc = finals[name]
            entry: dict[str, Any] = {}
            robust_loss(entry, "query_loss", [s.query_loss[:, 0] for s in sc], [s.q0() for s in sc])
            if sc[0].query_accuracy is not None:
                entry["query_accuracy"] = [estimate_finite(s.query_accuracy[:, 0]) for s in sc]  # type: ignore[index]
            ax["learners"][name] = entry
            ax["degradation"][name] = [_unpaired(s.query_loss[:, 0], sc[0].query_loss[:, 0]) for s in sc]
            if name != names[0]:
                ax["paired_query_loss"][name] = [paired_estimate(s.query_loss[:, 0], r.query_loss[:, 0])
                                                 for s, r in zip(sc, finals[names[0]], strict=True)]
                ax.setdefault("paired_query_loss_median", {})[name] = [
                    paired_median(s.query_loss[:, 0], r.query_loss[:, 0])
                    for s, r in zip(sc, finals[names[0]], strict=True)]
        out["axes"][axis] = ax
    return out


# ---------------------------------------------------------------------- 5. representations
def representation_change(learners: Sequence[Learner], batch: TaskBatch, steps: int,
                          cca: bool = True) -> dict[str, Any]:
    """Per layer: similarity of representations before vs after adaptation, and parameter change.

    For each task i, every layer's output on the task's query inputs under θ and under θ'_i
    (after ``steps`` inner steps) is compared by linear CKA (and SVCCA: mean canonical
    correlation over the directions keeping 99% of the variance, ridge-regularized for few
    inputs); each layer's parameters by the relative change ‖θ'_i − θ‖ / ‖θ‖. Means with 95% CIs
    over tasks; a layer whose output is constant on a task (e.g. an all-dead ReLU) is skipped for
    that task (``n`` counts the tasks used).

    Returns:
        Per learner: ``layers`` (labels), ``cka`` and ``cca`` (one Estimate per layer),
        ``param_layers`` (labels) and ``param_change`` (one Estimate per parametrized layer).
    """
    _names(learners)
    out: dict[str, Any] = {"steps": steps, "tasks": batch.num_tasks, "learners": {}}
    for lr in learners:
        model = lr.model
        maml = lr.algorithm
        first = next(model.parameters())
        b = batch.to(device=first.device, dtype=first.dtype)
        adapted = maml.adapt(b.support_x, b.support_y, steps=steps)
        theta = {k: p.detach() for k, p in parameters_of(model).items()}
        layers = list(representation_layers(model))
        groups = parametrized_layers(model)
        cka_v = np.full((b.num_tasks, len(layers)), np.nan)
        cca_v = np.full((b.num_tasks, len(layers)), np.nan)
        change = np.zeros((b.num_tasks, len(groups)))
        for i in range(b.num_tasks):
            task_params = {k: p[i] for k, p in adapted.items()}
            before = capture_representations(model, None, b.query_x[i], layers)
            after = capture_representations(model, task_params, b.query_x[i], layers)
            for j, layer in enumerate(layers):
                try:
                    cka_v[i, j] = linear_cka(before[layer], after[layer])
                    if cca:
                        cca_v[i, j] = cca_similarity(before[layer], after[layer])
                except MamlabError:  # constant representation on this task: undefined
                    pass
            rel = relative_parameter_change(theta, task_params, groups)
            change[i] = [rel[g] for g in groups]
        entry = {"kind": lr.kind, "layers": [layer_label(model, n) for n in layers],
                 "cka": [estimate_finite(cka_v[:, j]) for j in range(len(layers))],
                 "param_layers": [layer_label(model, g) for g in groups],
                 "param_change": [estimate_finite(change[:, j]) for j in range(len(groups))],
                 "adapted_params": list(adapted)}
        if cca:
            entry["cca"] = [estimate_finite(cca_v[:, j]) for j in range(len(layers))]
        out["learners"][lr.name] = entry
    return out


# ---------------------------------------------------------------------- 6. landscape
def _loss_on(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> Callable:
    """θ ↦ the loss of ``model`` under parameters θ on ``(x, y)``."""
    return lambda p: loss_fn(forward(model, p, x), y)


def _gradient_norms_along_adaptation(learner: Learner, batch: TaskBatch, steps: int) -> np.ndarray:
    """‖∇ L_support(θ_k)‖ of every task ``[T, steps + 1]`` along the learner's own inner trajectory.

    θ_k is the learner's algorithm after k steps of its ``adapt`` (SGD at α for MAML, learned
    step sizes for Meta-SGD, the proximal loop for iMAML, ...); the norm is over the adapted
    parameters, of the plain support loss.
    """
    algorithm, model, loss_fn = learner.algorithm, learner.model, loss_for(learner.config)
    params = algorithm.adapt(batch.support_x, batch.support_y, steps=0)
    norms = np.zeros((batch.num_tasks, steps + 1))
    for k in range(steps + 1):
        if k:
            params = algorithm.adapt(batch.support_x, batch.support_y, steps=1, start=params)
        for i in range(batch.num_tasks):
            p = {n: t[i].detach().requires_grad_(True) for n, t in params.items()}
            with torch.enable_grad():
                loss = loss_fn(forward(model, p, batch.support_x[i]), batch.support_y[i])
                grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
            norms[i, k] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    return norms


def landscape(learners: Sequence[Learner], batch: TaskBatch, steps: int, seed: int = 0,
              iters: int = 30, tol: float = 1e-3) -> dict[str, Any]:
    """Sharpness at θ and θ', and the gradient norm along the inner trajectory, over ``batch``'s tasks.

    Sharpness is the largest Hessian eigenvalue (power iteration on Hessian-vector products,
    at most ``iters`` products, relative tolerance ``tol``) of a task's loss with respect to the
    adapted parameters (all, or the head for ANIL): of the support loss at θ, of the support
    loss at θ'_i (after ``steps`` steps) and of the query loss at θ'_i.

    Returns:
        Per learner: ``sharpness_support_theta``, ``sharpness_support_adapted``,
        ``sharpness_query_adapted`` (Estimates over tasks), ``sharpness_change`` (paired:
        support sharpness at θ' − at θ), ``converged`` (fraction of power iterations that met
        ``tol``), and ``grad_norm`` (one Estimate per step 0..``steps``).
    """
    _names(learners)
    out: dict[str, Any] = {"steps": steps, "tasks": batch.num_tasks, "iters": iters, "tol": tol,
                           "learners": {}}
    for lr in learners:
        model = lr.model
        loss_fn = loss_for(lr.config)
        maml = lr.algorithm
        first = next(model.parameters())
        b = batch.to(device=first.device, dtype=first.dtype)
        adapted = maml.adapt(b.support_x, b.support_y, steps=steps)
        theta = parameters_of(model, list(adapted))
        s_theta, s_adapt, q_adapt, conv = [], [], [], []
        for i in range(b.num_tasks):
            sx, sy, qx, qy = b.support_x[i], b.support_y[i], b.query_x[i], b.query_y[i]

            gen = torch.Generator().manual_seed(int(seed) * 7919 + i)
            task_params = {k: p[i] for k, p in adapted.items()}
            for target, fn, at in ((s_theta, _loss_on(model, loss_fn, sx, sy), theta),
                                   (s_adapt, _loss_on(model, loss_fn, sx, sy), task_params),
                                   (q_adapt, _loss_on(model, loss_fn, qx, qy), task_params)):
                eig = top_hessian_eigenvalue(fn, at, iters=iters, tol=tol, generator=gen)
                target.append(eig.eigenvalue)
                conv.append(eig.converged)
        g = _gradient_norms_along_adaptation(lr, b, steps)
        out["learners"][lr.name] = {
            "kind": lr.kind,
            "sharpness_support_theta": estimate_finite(s_theta),
            "sharpness_support_adapted": estimate_finite(s_adapt),
            "sharpness_query_adapted": estimate_finite(q_adapt),
            "sharpness_change": paired_estimate(np.asarray(s_adapt), np.asarray(s_theta)),
            "converged": estimate_finite(np.asarray(conv, dtype=np.float64)),
            "grad_norm": [estimate_finite(g[:, s]) for s in range(steps + 1)],
        }
    return out


# ---------------------------------------------------------------------- 7. stability (edge of stability)
#: Tasks whose support-loss top eigenvalue exceeds 2/α are "sharp"; the contingency table's cells.
CONTINGENCY_CELLS = ("sharp_diverged", "sharp_stable", "flat_diverged", "flat_stable")


def single_inner_lr(learner: Learner) -> float | None:
    """The learner's inner step size α where it has a single positive one, else None (learned step sizes)."""
    try:
        lr = learner.inner_lr
    except (TypeError, ValueError, RuntimeError):  # e.g. a step size per parameter
        return None
    return lr if lr is not None and math.isfinite(lr) and lr > 0 else None


def _task_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per task i: Σ over tensors of ⟨a[i], b[i]⟩ (tensors shaped ``[T, ...]``) → ``[T]``."""
    return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _batched_power_iteration(op: Callable[[list[torch.Tensor]], list[torch.Tensor]], v: list[torch.Tensor],
                             iters: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest-magnitude eigenvalue of each task's block of a block-diagonal symmetric ``op``.

    ``v`` holds ``[T, ...]`` tensors, unit norm per task. A task stops moving once its residual
    ‖H v − λ v‖ <= tol·|λ| (or H v = 0); returns (eigenvalues ``[T]``, converged ``[T]``).
    """
    num = v[0].shape[0]
    eig = torch.zeros(num, dtype=torch.float64, device=v[0].device)
    done = torch.zeros(num, dtype=torch.bool, device=v[0].device)
    for _ in range(iters):
        hv = op(v)
        norm = _task_dot(hv, hv).sqrt()
        rq = _task_dot(v, hv)
        r = [h - _bcast(rq, h) * x for h, x in zip(hv, v, strict=True)]
        resid = _task_dot(r, r).sqrt()
        now = (resid <= tol * rq.abs()) | (norm == 0)
        eig = torch.where(done, eig, rq.double())
        done = done | now
        if bool(done.all()):
            break
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        v = [torch.where(_bcast(done, x), x, h / _bcast(safe, h)) for h, x in zip(hv, v, strict=True)]
    return eig, done


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def support_sharpness(learner: Learner, batch: TaskBatch, seed: int = 0, iters: int = 100,
                      tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per task: the top Hessian eigenvalue of its support loss at the learner's θ, and whether it converged.

    The Hessian is taken with respect to the parameters the learner adapts (all for MAML, the
    head for ANIL). All tasks are handled at once: the sum of the task losses, each at its own
    copy of θ, has a block-diagonal Hessian whose blocks are the tasks' Hessians, so one
    Hessian-vector product (double backward) serves every task; the task losses run on the
    algorithm's own execution path (batched, vmap or a loop). Power iteration per block, with
    the same shift as ``analysis.landscape.top_hessian_eigenvalue(which="algebraic")`` for blocks
    whose largest-magnitude eigenvalue is negative. The random start vectors come from ``seed``
    alone, so the same tasks get the same starts at every checkpoint and for every run.

    Args:
        learner: the network and the parameters it adapts.
        batch: the tasks (their support sets are used).
        seed: seeds the start vectors.
        iters: most Hessian-vector products per power-iteration run (>= 1).
        tol: relative residual tolerance (> 0).

    Returns:
        ``(eigenvalues [T], converged [T])`` as float64 and bool arrays.
    """
    check_positive("iters", iters, integer=True)
    check_positive("tol", tol)
    model, loss_fn = learner.model, loss_for(learner.config)
    first = next(model.parameters())
    b = batch.to(device=first.device, dtype=first.dtype)
    names = learner.inner_params
    theta = parameters_of(model, names)
    num = b.num_tasks
    leaves = [p.detach().unsqueeze(0).repeat(num, *([1] * p.dim())).requires_grad_(True)
              for p in theta.values()]
    engine = getattr(learner.algorithm, "engine", None)  # the algorithm's batched execution path
    with torch.enable_grad():
        if isinstance(engine, TaskEngine):
            shared = {k: p.detach() for k, p in parameters_of(model).items() if k not in theta}
            total = engine.losses(dict(zip(theta, leaves, strict=True)), shared, b.support_x, b.support_y,
                                  engine.path(first.device)).sum()
        else:
            total = sum(loss_fn(forward(model, dict(zip(theta, (t[i] for t in leaves), strict=True)),
                                        b.support_x[i]), b.support_y[i]) for i in range(num))
        grads = torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True)
    active = [g is not None and g.requires_grad for g in grads]
    outs = [g for g, a in zip(grads, active, strict=True) if a]

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        if not outs:  # the loss is at most linear in every parameter: H = 0
            return [torch.zeros_like(p) for p in leaves]
        vs = [x for x, a in zip(v, active, strict=True) if a]
        hv = torch.autograd.grad(outs, leaves, grad_outputs=vs, retain_graph=True, allow_unused=True)
        return [h.detach() if h is not None else torch.zeros_like(p) for h, p in zip(hv, leaves, strict=True)]

    gen = torch.Generator().manual_seed(int(seed))
    start = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in leaves]
    norm = _task_dot(start, start).sqrt()
    start = [s / _bcast(norm, s) for s in start]
    eig, ok = _batched_power_iteration(hvp, start, iters, tol)
    negative = eig < 0
    if bool(negative.any()):
        shift = torch.where(negative, eig, torch.zeros_like(eig)).to(first.dtype)

        def shifted(v: list[torch.Tensor]) -> list[torch.Tensor]:
            return [h - _bcast(shift, x) * x for h, x in zip(hvp(v), v, strict=True)]

        eig2, ok2 = _batched_power_iteration(shifted, start, iters, tol)
        eig = torch.where(negative, eig2 + shift.double(), eig)
        ok = torch.where(negative, ok & ok2, ok)
    return eig.cpu().numpy(), ok.cpu().numpy()


def stability_contingency(sharp: np.ndarray | Sequence[bool], diverged_tasks: np.ndarray | Sequence[bool]
                          ) -> dict[str, int]:
    """Tasks counted by sharp (λ_max > 2/α) or not × diverged or not: the 2×2 table, ``CONTINGENCY_CELLS``."""
    s = np.asarray(sharp, dtype=bool)
    d = np.asarray(diverged_tasks, dtype=bool)
    if s.shape != d.shape or s.ndim != 1:
        raise MamlabError(f"sharp and diverged must be 1-D and of one length, got shapes {s.shape} and "
                          f"{d.shape}")
    return {"sharp_diverged": int((s & d).sum()), "sharp_stable": int((s & ~d).sum()),
            "flat_diverged": int((~s & d).sum()), "flat_stable": int((~s & ~d).sum())}


def sharpness_trajectory(snapshots: Sequence[tuple[int, nn.Module | MetaAlgorithm]], config: TrainConfig,
                         batch: TaskBatch, *, kind: str = "maml", seed: int = 0, iters: int = 100,
                         tol: float = 1e-3) -> dict[str, Any]:
    """The support loss's top Hessian eigenvalue at θ across a run's checkpoints, on the same tasks.

    Args:
        snapshots: ``(iteration, algorithm or network)`` pairs, e.g. a run's checkpoints, any order.
        config: the run's configuration (its α is the algorithm's ``inner_lr``).
        batch: the tasks (the same for every checkpoint; the run's training K support points).
        kind: the learner kind.
        seed, iters, tol: as :func:`support_sharpness`.

    Returns:
        ``iterations`` ascending; per checkpoint ``sharpness`` (Estimate over tasks),
        ``sharpness_median`` (Median), ``sharpness_max``, ``above_two_over_alpha`` (tasks with
        λ_max > 2/α) and ``converged`` (fraction of tasks whose power iteration met ``tol``);
        ``inner_lr``, ``two_over_alpha`` and ``tasks``.
    """
    if not snapshots:
        raise MamlabError("no checkpoints given; the run needs at least one")
    snaps = sorted(snapshots, key=lambda s: s[0])
    out: dict[str, Any] = {"iterations": [int(it) for it, _ in snaps], "tasks": batch.num_tasks,
                           "sharpness": [], "sharpness_median": [], "sharpness_max": [],
                           "above_two_over_alpha": [], "converged": []}
    lr = None
    for it, model in snaps:
        learner = Learner(f"iter {it}", model, config, kind)
        lr = single_inner_lr(learner)
        if lr is None:
            raise MamlabError(f"the {config.algorithm} run has no single inner step size; 2/α is undefined")
        lam, ok = support_sharpness(learner, batch, seed, iters, tol)
        out["sharpness"].append(estimate_finite(lam))
        out["sharpness_median"].append(median_estimate(lam))
        out["sharpness_max"].append(float(np.max(lam)))
        out["above_two_over_alpha"].append(int((lam > 2.0 / lr).sum()))
        out["converged"].append(float(ok.mean()))
    out["inner_lr"], out["two_over_alpha"] = lr, 2.0 / lr  # type: ignore[operator]
    return out


def divergence_and_sharpness(learner: Learner, batches: Mapping[int, TaskBatch], steps: Sequence[int],
                             *, seed: int = 0, iters: int = 100, tol: float = 1e-3) -> dict[str, Any]:
    """At the learner's θ, per number of support points K: diverged tasks after each step count, and λ_max.

    A task diverged after s steps when its query loss is not finite or above
    ``DIVERGENCE_FACTOR`` × its step-0 query loss (:func:`diverged`). It is *sharp* when the top
    Hessian eigenvalue of its support loss at θ exceeds 2/α (:func:`support_sharpness`): for a
    quadratic loss exactly the condition under which gradient descent at α diverges.

    Args:
        learner: a learner with a single inner step size α.
        batches: K → the tasks with K support points (the same tasks for every K, ideally).
        steps: inner step counts (>= 1).
        seed, iters, tol: as :func:`support_sharpness`.

    Returns:
        ``shots`` (ascending) and ``steps``; per K (lists aligned with ``shots``): ``tasks``,
        ``diverged`` (one count per step count), ``sharpness`` (Estimate), ``sharpness_max``,
        ``sharp`` (tasks above 2/α), ``converged`` (fraction), ``contingency`` (one
        :func:`stability_contingency` per step count); and ``inner_lr``, ``two_over_alpha``.
    """
    lr = single_inner_lr(learner)
    if lr is None:
        raise MamlabError(f"learner {learner.name!r} has no single inner step size; 2/α is undefined")
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise MamlabError(f"steps must be integers >= 1, got {steps!r}")
    if not batches:
        raise MamlabError("no task batches given; pass one per number of support points")
    shots = sorted(batches)
    out: dict[str, Any] = {"shots": shots, "steps": steps, "inner_lr": lr, "two_over_alpha": 2.0 / lr,
                           "tasks": [], "diverged": [], "sharpness": [], "sharpness_max": [], "sharp": [],
                           "converged": [], "contingency": []}
    for k in shots:
        batch = batches[k]
        scores = adaptation_scores(learner, batch, steps[-1])
        q0 = scores.q0()
        lam, ok = support_sharpness(learner, batch, seed, iters, tol)
        sharp = lam > 2.0 / lr
        div = [diverged(scores.query_loss[:, s], q0) for s in steps]
        out["tasks"].append(batch.num_tasks)
        out["diverged"].append([int(d.sum()) for d in div])
        out["sharpness"].append(estimate_finite(lam))
        out["sharpness_max"].append(float(np.max(lam)))
        out["sharp"].append(int(sharp.sum()))
        out["converged"].append(float(ok.mean()))
        out["contingency"].append([stability_contingency(sharp, d) for d in div])
    return out


def stability(entries: Sequence[tuple[Learner, Sequence[tuple[int, nn.Module | MetaAlgorithm]]]],
              curve_batches: Mapping[int, TaskBatch], shot_batches: Mapping[int, TaskBatch],
              steps: Sequence[int] = (1, 5, 10), *, seed: int = 0, iters: int = 100,
              tol: float = 1e-3) -> dict[str, Any]:
    """The edge of stability: λ_max of the support loss over training against 2/α, and divergence.

    For each run (a learner and its checkpoints): :func:`sharpness_trajectory` on
    ``curve_batches[K]`` at the run's training K, then :func:`divergence_and_sharpness` at the
    final θ on ``shot_batches``. Runs without a single inner step size (Meta-SGD's learned ones)
    are skipped with the reason.

    Args:
        entries: ``(learner, snapshots)`` per run: its checkpoints as ``(iteration, algorithm)``
            pairs (at least one; the last is the final θ, the learner's own).
        curve_batches: K → the tasks of the training curve (keys must cover every run's K).
        shot_batches: K → the tasks of the divergence count.
        steps: inner step counts of the divergence count.
        seed, iters, tol: as :func:`support_sharpness`.

    Returns:
        ``runs`` (name → ``kind``, ``training_shots``, ``curve`` and the divergence dict's keys),
        ``skipped`` (name → reason), ``steps``, ``shots``, ``curve_tasks``, ``divergence_factor``.
    """
    _names([lr for lr, _ in entries])
    out: dict[str, Any] = {"runs": {}, "skipped": {}, "steps": sorted({int(s) for s in steps}),
                           "shots": sorted(shot_batches), "divergence_factor": DIVERGENCE_FACTOR,
                           "curve_tasks": None, "iters": iters, "tol": tol}
    for learner, snaps in entries:
        if single_inner_lr(learner) is None:
            out["skipped"][learner.name] = (f"{learner.name} ({learner.config.algorithm}) has no single "
                                            "inner step size α (it learns its step sizes): 2/α is undefined")
            continue
        k = learner.config.shots
        if k not in curve_batches:
            raise MamlabError(f"no curve tasks with K={k} support points; given K in {sorted(curve_batches)}")
        curve = sharpness_trajectory(snaps, learner.config,
                                     curve_batches[k], kind=learner.kind, seed=seed, iters=iters, tol=tol)
        out["curve_tasks"] = curve["tasks"]
        grid = divergence_and_sharpness(learner, shot_batches, steps, seed=seed, iters=iters, tol=tol)
        out["runs"][learner.name] = {"kind": learner.kind, "training_shots": k, "curve": curve, **grid}
    return out
