"""When does MAML beat pretraining? Collins et al.'s (2020) pattern on linear regression, exactly and measured.

The task family mixes easy and hard linear-regression tasks (``mamlab.tasks.LinearRegression``):
half the tasks (``--hard-fraction``) are hard, with inputs of covariance ``hard_scale · I`` (small
curvature) and weights centred at ``hard_offset`` in every coordinate instead of 0. Over a grid of
hardness spread (``--scales``: 1 means every task is equally hard) × hard tasks' offset
(``--offsets``), the script prints

* the exact advantage F(θ_ERM) − F(θ*) of MAML's best initialization over pretraining's, for one
  inner SGD step of α on K support points (``mamlab.analysis.linear_theory``; instant);
* a MAML run and a pretrain run trained by ``mamlab.train.train`` (linear model, same seed and
  budget), both evaluated by ``mamlab.evaluate.evaluate_model`` on the same held-out episodes:
  the paired difference of their one-step query MSE (pretrain − MAML, mean ± 95% CI over tasks);
* the exact one-step loss difference F(θ_pretrain) − F(θ_MAML) of those two trained models, which
  the paired Monte-Carlo estimate should bracket.

Collins et al. predict the advantage to be large only when task hardness varies (hard_scale < 1)
*and* the hard tasks' optima lie away from the easy ones' (hard_offset > 0). For this family the
theory gives exactly 0 on both edges of the grid: with hard_scale = 1 every A_i is the same
matrix, with hard_offset = 0 every type has the same centre, and either way θ* = θ_ERM.

    python benchmarks/maml_vs_pretrain_linear.py --out runs/collins            # the grid, ~3 minutes
    python benchmarks/maml_vs_pretrain_linear.py --out runs/collins --exact-only

Writes ``OUT/results.json`` (every number), ``OUT/advantage.png`` (heatmaps: exact and measured)
and the runs under ``OUT/runs/`` (``mamlab analyze OUT/runs/s0.1_o4/maml OUT/runs/s0.1_o4/pretrain
--studies exact`` shows their training curves against θ*).

Reference: L. Collins, A. Mokhtari, S. Shakkottai. Why Does MAML Outperform ERM? An Optimization
Perspective. arXiv:2010.14672, 2020.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mamlab.analysis import linear_theory as lt
from mamlab.config import resolve_config
from mamlab.evaluate import evaluate_model
from mamlab.experiments import build_family
from mamlab.stats import paired_difference_ci
from mamlab.train import train


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced if it holds results.json)")
    p.add_argument("--scales", type=_floats, default=[1.0, 0.3, 0.1], help="hard_scale values (1,0.3,0.1)")
    p.add_argument("--offsets", type=_floats, default=[0.0, 1.0, 2.0, 4.0], help="hard_offset values (0,1,2,4)")
    p.add_argument("--hard-fraction", type=float, default=0.5)
    p.add_argument("--dim", type=int, default=5)
    p.add_argument("--weight-std", type=float, default=0.5)
    p.add_argument("--inner-lr", type=float, default=0.3, help="α of the inner step (0.3)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--tasks", type=int, default=4000, help="held-out evaluation tasks (4000)")
    p.add_argument("--seed", type=int, default=0, help="training seed; evaluation uses seed 0")
    p.add_argument("--exact-only", action="store_true", help="print the exact grid only (no training)")
    return p.parse_args(argv)


def _options(args: argparse.Namespace, scale: float, offset: float) -> dict[str, Any]:
    return {"dim": args.dim, "weight_std": args.weight_std, "hard_fraction": args.hard_fraction,
            "hard_scale": scale, "hard_offset": offset, "inner_lr": args.inner_lr, "shots": args.shots,
            "queries": 10, "iterations": args.iterations, "seed": args.seed, "inner_steps": 1,
            "checkpoint_every": max(1, args.iterations // 10), "val_every": args.iterations, "val_tasks": 10}


def cell(args: argparse.Namespace, scale: float, offset: float, runs: Path) -> dict[str, Any]:
    """One grid point: the exact advantage, and (unless ``--exact-only``) the trained runs' comparison."""
    base = resolve_config("linear-regression", None, _options(args, scale, offset))
    fam = build_family(base, "test")
    out: dict[str, Any] = {"hard_scale": scale, "hard_offset": offset,
                           "exact_advantage": lt.maml_advantage(fam, args.inner_lr, args.shots),
                           "theta_star": lt.maml_optimum(fam, args.inner_lr, args.shots).tolist(),
                           "theta_erm": lt.erm_optimum(fam).tolist()}
    if args.exact_only:
        return out
    losses, exact = {}, {}
    t0 = time.perf_counter()
    for algo in ("maml", "pretrain"):
        cfg = resolve_config("linear-regression", None, _options(args, scale, offset), algorithm=algo)
        run = train(cfg, runs / f"s{scale:g}_o{offset:g}" / algo, progress=False, echo=lambda s: None,
                    force=True)
        losses[algo] = evaluate_model(run.algorithm, cfg, steps=(1,), num_tasks=args.tasks, seed=0).losses[1]
        exact[algo] = float(lt.maml_objective(lt.linear_parameters(run.model), fam, args.inner_lr, args.shots))
    mean, ci = paired_difference_ci(losses["pretrain"].double().numpy(), losses["maml"].double().numpy())
    out.update(seconds=time.perf_counter() - t0, measured={"mean": mean, "ci": ci, "n": args.tasks},
               trained_exact_difference=exact["pretrain"] - exact["maml"],
               maml_excess=exact["maml"] - float(lt.maml_objective(out["theta_star"], fam, args.inner_lr,
                                                                    args.shots)),
               pretrain_excess=exact["pretrain"] - float(lt.maml_objective(out["theta_star"], fam,
                                                                           args.inner_lr, args.shots)))
    return out


def heatmap(path: Path, cells: list[dict[str, Any]], scales: list[float], offsets: list[float],
            measured: bool) -> None:
    """Heatmaps of the exact advantage (and the measured paired difference) over the grid."""
    panels = [("exact F(θ_ERM) − F(θ*)", "exact_advantage")]
    if measured:
        panels.append(("measured: pretrain − MAML (one-step MSE)", "measured"))
    fig = Figure(figsize=(5.2 * len(panels), 3.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    grid = {(c["hard_scale"], c["hard_offset"]): c for c in cells}
    values = {key: np.array([[grid[(s, o)][key]["mean"] if key == "measured" else grid[(s, o)][key]
                              for o in offsets] for s in scales]) for _, key in panels}
    top = max(float(np.max(v)) for v in values.values())
    for i, (title, key) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        v = values[key]
        im = ax.imshow(v, cmap="viridis", vmin=min(0.0, float(v.min())), vmax=top or 1.0, aspect="auto")
        for r, s in enumerate(scales):
            for c, o in enumerate(offsets):
                text = f"{v[r, c]:.3f}"
                if key == "measured":
                    text += f"\n±{grid[(s, o)]['measured']['ci']:.3f}"
                ax.text(c, r, text, ha="center", va="center", fontsize=8,
                        color="white" if v[r, c] < 0.6 * (top or 1.0) else "black")
        ax.set_xticks(range(len(offsets)), [f"{o:g}" for o in offsets])
        ax.set_yticks(range(len(scales)), [f"{s:g}" for s in scales])
        ax.set_xlabel("hard tasks' weight offset (every coordinate)")
        ax.set_ylabel("hard tasks' input scale (1: no spread)")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.savefig(path, dpi=120, facecolor="white")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the grid, print the table, write ``results.json`` and ``advantage.png``; return the results."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs"
    if runs.exists() and not args.exact_only:
        shutil.rmtree(runs)
    t0 = time.perf_counter()
    cells = []
    head = f"{'scale':>6} {'offset':>6} {'exact advantage':>16}"
    if not args.exact_only:
        head += f" {'measured pretrain − MAML':>26} {'exact, trained models':>22} {'MAML excess':>12} " \
                f"{'pretrain excess':>16} {'s':>5}"
    print(f"α={args.inner_lr:g}, K={args.shots}, dim={args.dim}, hard fraction {args.hard_fraction:g}, "
          f"weight std {args.weight_std:g}, {args.iterations} iterations, {args.tasks} held-out tasks")
    print(head)
    for s in args.scales:
        for o in args.offsets:
            c = cell(args, s, o, runs)
            cells.append(c)
            line = f"{s:>6g} {o:>6g} {c['exact_advantage']:>16.4f}"
            if not args.exact_only:
                m = c["measured"]
                line += (f" {m['mean']:>+17.4f} ± {m['ci']:.4f} {c['trained_exact_difference']:>+22.4f} "
                         f"{c['maml_excess']:>12.4f} {c['pretrain_excess']:>16.4f} {c['seconds']:>5.1f}")
            print(line, flush=True)
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s")
    heatmap(args.out / "advantage.png", cells, args.scales, args.offsets, not args.exact_only)
    results = {"arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "cells": cells, "seconds": total}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
