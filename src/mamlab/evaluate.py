"""The meta-test protocol: adapt to held-out tasks from a seeded evaluation stream, score with 95% CIs.

Every model is adapted by its own algorithm, as trained (``MetaAlgorithm.adapt``): MAML and the
pretrain baseline by SGD at their inner step size, an algorithm with learned step sizes with those.
Evaluation episodes come from their own generator (``eval_generator(seed)``), never from the
training stream, so every model evaluated with the same seed and settings sees the very same
tasks, and two models' per-task scores can be compared pairwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mamlab.algorithms import MetaAlgorithm, build_algorithm
from mamlab.config import TrainConfig
from mamlab.errors import MamlabError, check_positive
from mamlab.experiments import accuracy, build_family, is_classification, loss_for
from mamlab.stats import mean_ci, median_ci, unpaired_difference_ci
from mamlab.tasks.base import TaskBatch, TaskFamily

__all__ = ["evaluate_on_oneshot_runs", "pool_gap", "gap_summary", "finite_gap", "EVAL_SEED_OFFSET",
           "eval_generator", "eval_episodes", "EvalResult", "evaluate_model", "per_task_scores",
           "parse_steps"]

#: Evaluation streams are seeded with ``EVAL_SEED_OFFSET + seed``, away from training seeds.
EVAL_SEED_OFFSET = 1_000_003


def eval_generator(seed: int) -> torch.Generator:
    """The generator of the evaluation stream for ``seed`` (distinct from any training stream)."""
    return torch.Generator().manual_seed(EVAL_SEED_OFFSET + int(seed))


def eval_episodes(family: TaskFamily, num_tasks: int, shots: int, queries: int, seed: int,
                  chunk: int = 200) -> Iterator[TaskBatch]:
    """The held-out tasks for ``seed``, in meta-batches of at most ``chunk`` tasks.

    All ``num_tasks`` tasks are drawn in one call, so the tasks do not depend on ``chunk``.
    """
    check_positive("chunk", chunk, integer=True)
    batch = family.sample(num_tasks, shots, queries, eval_generator(seed))
    for start in range(0, num_tasks, chunk):
        s = slice(start, min(start + chunk, num_tasks))
        yield TaskBatch(batch.support_x[s], batch.support_y[s], batch.query_x[s], batch.query_y[s])


def parse_steps(text: str | Sequence[int]) -> list[int]:
    """``"0,1,5,10"`` → ``[0, 1, 5, 10]`` (sorted, unique, each >= 0)."""
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise MamlabError(f"steps must be comma-separated integers >= 0, got {text!r}") from None
    else:
        values = list(text)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise MamlabError(f"steps must be comma-separated integers >= 0, got {text!r}")
    return sorted(set(values))


@dataclass
class EvalResult:
    """Per-task query losses (and accuracies) after each number of inner steps."""

    shots: int
    queries: int
    steps: list[int]
    lr: float | None  # the inner step size, or None where the algorithm learns its own
    num_tasks: int
    seed: int
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    accuracies: dict[int, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """One row per step count: mean loss and accuracy with 95% CI half-widths.

        A task whose loss is not finite has diverged: the mean and its interval are then over the
        finite tasks, ``loss_diverged`` counts the others, and the median (with its
        distribution-free interval) counts them as +inf, so one exploding task cannot hide or
        abort the rest (a test-time step-size sweep stays possible).
        """
        rows = []
        for s in self.steps:
            raw = self.losses[s].double()
            losses = torch.where(torch.isnan(raw), torch.full_like(raw, float("inf")), raw)
            finite = losses[torch.isfinite(losses)]
            m, ci = mean_ci(finite) if finite.numel() >= 2 else (float("nan"), float("nan"))
            _, lo, hi = median_ci(losses)
            med = float(losses.median())  # torch's (lower) median, as mamlab 0.1.0 reported it
            row: dict[str, Any] = {"steps": s, "loss": m, "loss_ci95": ci, "loss_median": med,
                                   "loss_median_low": lo, "loss_median_high": hi,
                                   "loss_diverged": int(losses.numel() - finite.numel())}
            if s in self.accuracies:
                am, aci = mean_ci(self.accuracies[s])
                row.update(accuracy=am, accuracy_ci95=aci)
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary with the protocol that produced it."""
        return {"shots": self.shots, "queries": self.queries, "lr": self.lr, "tasks": self.num_tasks,
                "seed": self.seed, "results": self.summary()}


def as_algorithm(model: nn.Module | MetaAlgorithm, config: TrainConfig) -> MetaAlgorithm:
    """``model`` itself if it is an algorithm, else the config's algorithm around the network."""
    if isinstance(model, MetaAlgorithm):
        return model
    return build_algorithm(config.algorithm, model, loss_for(config), config.algorithm_options,
                           execution=config.execution, task_chunk=config.task_chunk)


def per_task_scores(algorithm: MetaAlgorithm, config: TrainConfig, batch: TaskBatch, steps: Sequence[int],
                    lr: float | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Query loss and accuracy of every task of ``batch`` after each number of ``steps``.

    ``lr`` replaces the algorithm's inner step size where it has a single one (MAML, pretrain).
    """
    losses: dict[int, torch.Tensor] = {}
    accs: dict[int, torch.Tensor] = {}
    params, done = None, 0
    per_task = torch.vmap(algorithm.loss_fn)
    options = {} if lr is None else {"lr": lr}
    for s in sorted(steps):
        params = algorithm.adapt(batch.support_x, batch.support_y, steps=s - done, start=params, **options)
        done = s
        pred = algorithm.predict(params, batch.query_x)
        with torch.no_grad():
            losses[s] = per_task(pred, batch.query_y).double()
            if is_classification(config):
                accs[s] = accuracy(config, pred, batch.query_y).double()
    return losses, accs


def evaluate_model(model: nn.Module | MetaAlgorithm, config: TrainConfig, *, shots: int | None = None,
                   queries: int | None = None, steps: Sequence[int] = (0, 1, 5, 10), num_tasks: int = 600,
                   lr: float | None = None, seed: int = 0, family: TaskFamily | None = None,
                   chunk: int = 200) -> EvalResult:
    """Meta-test a trained algorithm (or a network, adapted by the config's algorithm) on held-out tasks.

    Args:
        model: the trained ``MetaAlgorithm`` (``load_run(...).algorithm``), or its network.
        config: the run's configuration (task family, algorithm, execution path).
        shots: support examples per task (per class for classification); default the config's.
        queries: query examples per task (per class); default the config's.
        steps: the numbers of inner steps after which to score (0 = no adaptation).
        num_tasks: how many held-out tasks.
        lr: an inner step size to use instead of the algorithm's own (where it has a single one).
        seed: the evaluation stream's seed (same seed → same tasks for every model).
        family: the task distribution to test on (default the config's test split).
        chunk: tasks adapted together at a time (bounds memory).
    """
    shots = config.shots if shots is None else shots
    queries = config.queries if queries is None else queries
    check_positive("shots", shots, integer=True)
    check_positive("queries", queries, integer=True)
    check_positive("tasks", num_tasks, integer=True)
    if lr is not None:
        check_positive("lr", lr)
    steps = parse_steps(steps)
    family = build_family(config, "test") if family is None else family
    algorithm = as_algorithm(model, config)
    own = getattr(algorithm, "inner_lr", None)  # None: the algorithm learns its step sizes
    shown_lr = lr if lr is not None else (None if own is None else float(own))
    result = EvalResult(shots, queries, steps, shown_lr, num_tasks, seed)
    parts_l: dict[int, list[torch.Tensor]] = {s: [] for s in steps}
    parts_a: dict[int, list[torch.Tensor]] = {s: [] for s in steps}
    first = next(algorithm.model.parameters())
    for batch in eval_episodes(family, num_tasks, shots, queries, seed, chunk):
        batch = batch.to(device=first.device, dtype=first.dtype)
        losses, accs = per_task_scores(algorithm, config, batch, steps, lr)
        for s in steps:
            parts_l[s].append(losses[s])
            if s in accs:
                parts_a[s].append(accs[s])
    result.losses = {s: torch.cat(v) for s, v in parts_l.items()}
    result.accuracies = {s: torch.cat(v) for s, v in parts_a.items() if v}
    return result


def pool_gap(model: nn.Module | MetaAlgorithm, config: TrainConfig, *, num_tasks: int = 600,
             steps: Sequence[int] | None = None, shots: int | None = None, queries: int | None = None,
             seed: int = 0, lr: float | None = None, new: EvalResult | None = None) -> dict[str, EvalResult]:
    """The meta-generalization gap of a run trained on a finite pool (``train_tasks``).

    Scores the same model, after the same inner steps, on three kinds of episodes drawn from the
    evaluation stream of ``seed``:

    * ``"pool"``: tasks of the run's training pool, support and query sets split from the pool's
      own N examples (what meta-training minimized);
    * ``"recurring"``: tasks of the pool with fresh examples (parametric families only): the
      test error on recurring tasks of Fallah et al. 2021;
    * ``"new"``: new tasks of the same distribution (the config's test split).

    The gap is ``new − pool``; see :func:`gap_summary`.

    Args:
        model: the trained algorithm (or its network).
        config: the run's configuration; it must have ``train_tasks``.
        num_tasks: episodes of each kind (pool tasks are picked with replacement).
        steps: inner step counts to score (default the algorithm's own).
        shots, queries: per task (per class); default the config's.
        seed: the evaluation stream's seed.
        lr: an inner step size instead of the algorithm's own.
        new: the model's :func:`evaluate_model` result with these very settings, if already
            computed (it is the ``"new"`` entry; not recomputed).
    """
    from mamlab.tasks.finite import TaskPool

    if config.train_tasks is None:
        raise MamlabError("this run was trained on fresh tasks (no train_tasks): it has no pool to measure "
                          "a gap against; train with --train-tasks M")
    algorithm = as_algorithm(model, config)
    steps = [algorithm.inner_steps] if steps is None else steps
    pool = build_family(config, "train")
    if not isinstance(pool, TaskPool):  # pragma: no cover - build_family returns the pool with train_tasks
        raise MamlabError(f"the training split of {config.task!r} is not a task pool")
    kw = {"shots": shots, "queries": queries, "steps": steps, "num_tasks": num_tasks, "lr": lr, "seed": seed}
    out = {"pool": evaluate_model(algorithm, config, family=pool, **kw)}
    if pool.params is not None:
        out["recurring"] = evaluate_model(algorithm, config, family=pool.recurring_tasks(), **kw)
    out["new"] = evaluate_model(algorithm, config, **kw) if new is None else new
    return out


def finite_gap(a: torch.Tensor | Sequence[float],
               b: torch.Tensor | Sequence[float]) -> tuple[float, float] | None:
    """Mean of ``a`` minus mean of ``b`` over the finite values of each, with Welch's 95% half-width.

    ``a`` and ``b`` are per-task losses of different tasks (so unpaired); a diverged task (not
    finite) is left out of its side. None when a side has fewer than two finite values.
    """
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    a, b = a[torch.isfinite(a)], b[torch.isfinite(b)]
    if a.numel() < 2 or b.numel() < 2:
        return None
    return unpaired_difference_ci(a, b)


def gap_summary(results: dict[str, EvalResult]) -> list[dict[str, Any]]:
    """Per step count: each kind's mean loss ± CI, and the gaps ``new − pool`` (and ``new − recurring``).

    Episodes of different kinds are different tasks, so a gap's interval is the unpaired
    (Welch) one over the finite tasks of both kinds.
    """
    rows = []
    for s in results["new"].steps:
        row: dict[str, Any] = {"steps": s}
        for kind, r in results.items():
            summary = {x["steps"]: x for x in r.summary()}[s]
            row[kind] = {k: summary[k] for k in ("loss", "loss_ci95", "loss_median", "loss_diverged")}
            if "accuracy" in summary:
                row[kind].update(accuracy=summary["accuracy"], accuracy_ci95=summary["accuracy_ci95"])
        for ref in ("pool", "recurring"):
            gap = finite_gap(results["new"].losses[s], results[ref].losses[s]) if ref in results else None
            if gap is not None:
                row[f"gap_{ref}"] = {"loss": gap[0], "loss_ci95": gap[1]}
        rows.append(row)
    return rows


def evaluate_on_oneshot_runs(model: nn.Module | MetaAlgorithm, config: TrainConfig, path: str | Path, *,
                             steps: int | None = None, lr: float | None = None) -> dict[str, Any]:
    """Lake et al.'s one-shot challenge: adapt on each run's 20 training images, classify its 20 tests.

    BatchNorm normalizes with each batch's own statistics (as in training), so the 20 test images
    of a run are classified together, as MAML's reference evaluation does with its query sets.

    Returns:
        ``{"errors": [% per run], "mean": %, "ci95": %, "runs": 20, "steps", "lr", "table"}``.
    """
    from mamlab.tasks.omniglot.oneshot import evaluate_runs, load_runs

    if config.task != "omniglot":
        raise MamlabError(f"--omniglot-runs needs an omniglot run, this run's task is {config.task!r}")
    if config.ways != 20:
        raise MamlabError(f"the one-shot runs are 20-way but this model has {config.ways} outputs; "
                          "train with --ways 20")
    algorithm = as_algorithm(model, config)
    steps = algorithm.inner_steps if steps is None else steps
    check_positive("steps", steps, integer=True, allow_zero=True)
    if lr is not None:
        check_positive("lr", lr)
    options = {} if lr is None else {"lr": lr}
    first = next(algorithm.model.parameters())

    def classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
        params = algorithm.adapt(train_x[None].to(first), train_y[None].to(first.device), steps=steps,
                                 **options)
        return algorithm.predict(params, test_x[None].to(first))[0].argmax(-1).cpu()

    result = evaluate_runs(load_runs(path), classify)
    shown = lr if lr is not None else getattr(algorithm, "inner_lr", None)
    lines = [f"{'run':>4}  {'error %':>7}"]
    lines += [f"{i + 1:>4}  {e:>7.1f}" for i, e in enumerate(result["errors"])]
    lines.append(f"mean  {result['mean']:>7.2f} ± {result['ci95']:.2f} (95% CI over {result['runs']} runs), "
                 f"{steps} steps of lr {shown}")
    return {**result, "steps": steps, "lr": shown, "table": "\n".join(lines)}
