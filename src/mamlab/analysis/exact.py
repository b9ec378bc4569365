"""The ``exact`` study: trained linear models against the exact (or high-accuracy numerical) MAML optimum.

For linear-regression runs with a linear model and one inner step (``linear_theory``), the
one-step meta-test loss F(θ) is known in closed form, so every checkpoint θ of a run has an
exact excess meta-test loss F(θ) − F(θ*) with no sampling error; the pretrain baseline is also
measured against its own optimum θ_ERM (the pooled loss it minimizes), and the best
initialization's advantage over pretraining's, F(θ_ERM) − F(θ*), is exact too. As a check of the
whole chain, the exact F(θ) of each final model is printed next to its Monte-Carlo estimate on the
report's held-out episodes.

For linear-classification runs there is no closed form: the optimum θ̂ of the one-step objective
on a fixed sample of ``CLASSIFICATION_TASKS`` tasks (``linear_theory.SampledLogisticObjective``)
stands in for θ*, and every excess is the paired mean over those tasks with its 95% CI.

Runs the theory does not cover (other tasks, hidden layers, more inner steps, other algorithms)
are listed with the reason; if none is covered the study is skipped.

``exact_study`` computes the numbers, ``exact_section`` words them (figure first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mamlab.analysis import linear_theory as lt
from mamlab.analysis import studies as st
from mamlab.analysis.sections import TITLES, SectionContext, skipped_section
from mamlab.checkpoint import list_checkpoints
from mamlab.errors import MamlabError
from mamlab.experiments import build_family
from mamlab.report.html import Figure, Section, Table
from mamlab.report.plots import line_plot_ci
from mamlab.stats import Estimate
from mamlab.tasks.base import TaskBatch
from mamlab.train import Run, load_run

__all__ = ["exact_study", "exact_section", "CLASSIFICATION_TASKS", "CLASSIFICATION_QUERIES",
           "CLASSIFICATION_SEED", "MAX_POINTS"]

#: Tasks in the fixed sample whose one-step objective stands in for linear classification's.
CLASSIFICATION_TASKS = 10000
#: Query examples per sampled classification task.
CLASSIFICATION_QUERIES = 50
#: Seed of that sample (a stream distinct from training, validation and evaluation).
CLASSIFICATION_SEED = 5_000_011
#: At most this many of a run's checkpoints (evenly spaced, first and last kept) are evaluated.
MAX_POINTS = 50


def _checkpoints(run: Run) -> list[tuple[int, torch.Tensor]]:
    """(iteration, θ) for up to ``MAX_POINTS`` checkpoints of a run, then its final model."""
    points = {}
    for p in list_checkpoints(run.path, most=MAX_POINTS):
        snap = load_run(run.path, checkpoint=p)
        points[int(snap.iteration or 0)] = lt.linear_parameters(snap.model)
    points[int(run.iteration or 0)] = lt.linear_parameters(run.model)
    return sorted(points.items())


def _heldout(learner: st.Learner, heldout: TaskBatch) -> Estimate:
    """The Monte-Carlo one-step query loss of a learner on the report's held-out episodes."""
    return st.estimate_finite(st.adaptation_scores(learner, heldout, 1).query_loss[:, 1])


def _regression(run: Run, learner: st.Learner, heldout: TaskBatch) -> dict[str, Any]:
    cfg, fam = run.config, build_family(run.config, "test")
    alpha, shots = float(cfg.inner_lr), int(cfg.shots)
    star, erm = lt.maml_optimum(fam, alpha, shots), lt.erm_optimum(fam)
    f_star = float(lt.maml_objective(star, fam, alpha, shots))
    e_star = float(lt.erm_objective(erm, fam))
    points = _checkpoints(run)
    with torch.no_grad():
        losses = [float(lt.maml_objective(t, fam, alpha, shots)) for _, t in points]
        out: dict[str, Any] = {
            "iterations": [i for i, _ in points],
            "loss": losses,
            "excess": [v - f_star for v in losses],
            "final_loss": losses[-1],
            "theta_star": star.tolist(),
            "theta_erm": erm.tolist(),
            "loss_star": f_star,
            "loss_erm": float(lt.maml_objective(erm, fam, alpha, shots)),
            "advantage": lt.maml_advantage(fam, alpha, shots),
            "distance_to_optimum": float((points[-1][1] - star).norm()),
        }
        if learner.kind == "pretrain":
            out["erm_excess"] = [float(lt.erm_objective(t, fam)) - e_star for _, t in points]
        k = heldout.support_x.shape[1]
        out["heldout_shots"] = k
        out["heldout_exact"] = float(lt.maml_objective(points[-1][1], fam, alpha, k))
    out["heldout_loss"] = _heldout(learner, heldout)
    return out


def _classification(run: Run, learner: st.Learner, heldout: TaskBatch,
                    cache: dict[tuple[float, int], lt.SampledLogisticObjective]) -> dict[str, Any]:
    cfg = run.config
    alpha, shots = float(cfg.inner_lr), int(cfg.shots)

    def objective(a: float) -> lt.SampledLogisticObjective:
        if (a, shots) not in cache:
            cache[(a, shots)] = lt.SampledLogisticObjective(
                build_family(cfg, "test"), a, shots, tasks=CLASSIFICATION_TASKS,
                queries=CLASSIFICATION_QUERIES, seed=CLASSIFICATION_SEED)
        return cache[(a, shots)]

    obj, pooled = objective(alpha), objective(0.0)
    opt, erm = obj.optimum(), pooled.optimum()
    points = _checkpoints(run)
    out: dict[str, Any] = {
        "iterations": [i for i, _ in points],
        "excess": [obj.excess(t) for _, t in points],
        "theta_star": opt.theta.tolist(),
        "theta_star_se": opt.theta_se.tolist(),
        "theta_erm": erm.theta.tolist(),
        "loss_star": Estimate(opt.objective, 1.96 * opt.objective_se, opt.tasks),
        "grad_norm": opt.grad_norm,
        "advantage": obj.excess(erm.theta),
        "distance_to_optimum": float((points[-1][1] - opt.theta).norm()),
        "sample_tasks": CLASSIFICATION_TASKS,
    }
    if learner.kind == "pretrain":
        out["erm_excess"] = [pooled.excess(t) for _, t in points]
    with torch.no_grad():
        final = obj.losses(points[-1][1])
    out["final_loss"] = Estimate(float(final.mean()), 1.96 * float(final.std()) / math.sqrt(final.numel()),
                           final.numel())
    out["heldout_loss"] = _heldout(learner, heldout)
    return out


def exact_study(runs: Sequence[Run], learners: Sequence[st.Learner], heldout: TaskBatch) -> dict[str, Any]:
    """Every covered run's excess meta-test loss across its checkpoints, against the (exact) optimum.

    Args:
        runs: the loaded runs.
        learners: their learners, in the same order (names and kinds as the report shows them).
        heldout: the report's held-out episodes (the Monte-Carlo check of the final model).

    Returns:
        ``{"runs": {name: numbers}, "not_covered": {name: reason}, "exact": bool}``, or
        ``{"skipped": reason}`` when no run is covered.
    """
    covered: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    cache: dict[tuple[float, int], lt.SampledLogisticObjective] = {}
    for run, learner in zip(runs, learners, strict=False):
        reason = lt.check_exact_config(run.config)
        if reason is not None:
            reasons[learner.name] = reason
            continue
        try:
            if run.config.task == "linear-regression":
                entry = _regression(run, learner, heldout)
            else:
                entry = _classification(run, learner, heldout, cache)
        except MamlabError as e:
            reasons[learner.name] = str(e)
            continue
        entry.update(kind=learner.kind, inner_lr=float(run.config.inner_lr), shots=int(run.config.shots),
                     path=str(run.path))
        covered[learner.name] = entry
    if not covered:
        detail = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        return {"skipped": f"no run is covered by the exact linear theory ({detail})"}
    return {"runs": covered, "not_covered": reasons,
            "exact": runs[0].config.task == "linear-regression"}


# ---------------------------------------------------------------------- the section
def _value(v: float | Estimate) -> float:
    return v.mean if isinstance(v, Estimate) else float(v)


def _text(v: float | Estimate) -> str:
    if isinstance(v, Estimate):
        return f"{v.mean:.3g} ± {v.ci:.2g}"
    return f"{v:.3g}"


def _figure(c: SectionContext, name: str, entries: dict[str, Any], key: str, ylabel: str, title: str,
            caption: str) -> list[Figure]:
    """One log-log figure per distinct checkpoint schedule (runs sharing it are drawn together)."""
    groups: dict[tuple[int, ...], dict[str, Any]] = {}
    for n, e in entries.items():
        if key in e:
            groups.setdefault(tuple(e["iterations"]), {})[n] = e
    figs = []
    for g, (iters, members) in enumerate(groups.items()):
        keep = [i for i, it in enumerate(iters) if it > 0]
        if not keep:
            continue
        values = {n: [_value(e[key][i]) for i in keep] for n, e in members.items()}
        cis = {n: [e[key][i].ci if isinstance(e[key][i], Estimate) else 0.0 for i in keep]
               for n, e in members.items()}
        positive = [v for vs in values.values() for v in vs if v > 0]
        floor = min(positive) / 10 if positive else 1e-12
        clipped = any(v <= 0 for vs in values.values() for v in vs)
        series = {n: ([max(v, floor) for v in values[n]], cis[n]) for n in values}
        png = c.tmp / f"{name}{'' if g == 0 else f'_{g}'}.png"
        path = line_plot_ci(png, [iters[i] for i in keep], series,
                            xlabel="meta-iteration", ylabel=ylabel, title=title,
                            colors={n: c.colors.get(n, "#555555") for n in series}, logx=True, logy=True)
        note = " Iteration 0 is not drawn (log axis)." if len(keep) < len(iters) else ""
        if clipped:
            note += f" Values at or below 0 (rounding at the optimum) are drawn at {floor:.2g}."
        figs.append(Figure(path, caption + note))
    return figs


def exact_section(c: SectionContext, r: dict[str, Any], summary: list[str]) -> Section:
    """The ``exact`` study's section: excess-loss curves first, then the optima, the advantage, the check."""
    if "skipped" in r:
        return skipped_section("exact", r["skipped"])
    runs, exact = r["runs"], r["exact"]
    opt = "θ*" if exact else "θ̂"
    what = ("exact" if exact else
            f"estimated on a fixed sample of {CLASSIFICATION_TASKS} tasks (paired 95% CI; θ̂ minimizes the "
            "sampled objective)")
    figs = _figure(c, "exact_excess", runs, "excess", f"F(θ) − F({opt})", "Excess one-step meta-test loss",
                   f"Excess meta-test loss after one inner SGD step, F(θ) − F({opt}), of each run's "
                   "checkpoints, "
                   f"{what}; log-log axes.")
    if any("erm_excess" in e for e in runs.values()):
        figs += _figure(c, "exact_erm_excess", runs, "erm_excess", "L(θ) − L(θ_ERM)",
                        "Pretraining against its own optimum",
                        "Pooled (un-adapted) loss of the pretrain runs' checkpoints above its minimum θ_ERM, "
                        f"{what}: how far pretraining is from converging to what it optimizes.")
    rows, opt_rows = [], []
    for n, e in runs.items():
        rows.append([n, e["kind"], e["inner_lr"], e["shots"], e["iterations"][-1], _text(e["final_loss"]),
                     _text(e["excess"][-1]), _text(e["erm_excess"][-1]) if "erm_excess" in e else "—",
                     e["distance_to_optimum"], e["heldout_loss"]])
        opt_rows.append([n, ", ".join(f"{v:.4f}" for v in e["theta_star"]),
                         ", ".join(f"{v:.4f}" for v in e["theta_erm"]), _text(e["loss_star"]),
                         _text(e["advantage"])])
    note_loss = ("F(θ): exact expected query loss after one step; " if exact else
                 f"F(θ): the sampled objective ± 95% CI ({CLASSIFICATION_TASKS} tasks); ")
    tables = [
        Table(f"Final models against {opt}", ["learner", "kind", "α", "K", "iteration", "F(θ)",
                                              f"F(θ) − F({opt})", "L(θ) − L(θ_ERM)", f"‖θ − {opt}‖",
                                              "held-out Monte Carlo"], rows,
              note=note_loss + "held-out Monte Carlo: the mean query loss after one step on the report's "
              "held-out episodes ± 95% CI, an independent estimate of F(θ); L: the pooled loss pretraining "
              "minimizes."),
        Table("Optima", ["learner (its α, K)", opt, "θ_ERM", f"F({opt})", f"F(θ_ERM) − F({opt})"], opt_rows,
              note="θ_ERM: the pretraining optimum; F(θ_ERM) − F(θ*): how much MAML's best initialization "
              "beats pretraining's after one step (Collins et al. 2020)."),
    ]
    if r["not_covered"]:
        tables.append(Table("Runs not covered", ["learner", "reason"],
                            [[n, why] for n, why in r["not_covered"].items()]))
    text = [
        "For a linear model f_θ(x) = θᵀx on linear-regression tasks, the expected query loss after one inner "
        "SGD step is quadratic in θ (mamlab.analysis.linear_theory), so its minimizer θ* and every "
        "checkpoint's "
        "excess loss are exact." if exact else
        "Linear classification has no closed form: θ̂ is the minimizer (gradient norm < 1e-10) of the "
        "one-step "
        f"objective on a fixed sample of {CLASSIFICATION_TASKS} tasks; excesses are paired over those tasks "
        "with 95% CIs, and the Optima table's numbers carry that Monte-Carlo error."
    ]
    for n, e in runs.items():
        line = (f"{'Exact' if exact else 'Sampled optimum'} ({n}, α={e['inner_lr']:g}, K={e['shots']}): "
                f"F(θ) − F({opt}) = {_text(e['excess'][-1])} at "
                f"iteration {e['iterations'][-1]} (from {_text(e['excess'][0])} at iteration "
                f"{e['iterations'][0]}); "
                f"F(θ_ERM) − F({opt}) = {_text(e['advantage'])}.")
        if exact:
            h = e["heldout_loss"]
            agree = "within" if abs(h.mean - e["heldout_exact"]) <= h.ci else "outside"
            line += (f" Exact F(θ) at K={e['heldout_shots']}: {e['heldout_exact']:.4f}, held-out Monte Carlo "
                     f"{h.format(4)} ({agree} its 95% CI).")
        summary.append(line)
    return Section(TITLES["exact"], text, figs, tables)
