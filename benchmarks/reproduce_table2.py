"""Reproduce Finn et al. 2017, Table 2 (left): 5-shot sinusoid regression MSE after 1, 5 and 10 steps.

Trains MAML with the paper's setting (K=10, one inner step, alpha=0.01, Adam beta=0.001,
meta-batch 25, 70,000 iterations) and the "pretrained on all tasks" baseline, then evaluates both
on the same 600 held-out tasks, 5-shot, at the training alpha, with 95% confidence intervals,
medians and the number of diverged tasks (loss non-finite or above 100x its step-0 loss).

Finn et al.'s paper states alpha=0.01; the official code's sinusoid command leaves the inner step
size at its default, 0.001: ``--inner-lr 0.001`` trains (and evaluates) at that step size.

    python benchmarks/reproduce_table2.py                  # the paper's 70,000 iterations
    python benchmarks/reproduce_table2.py --inner-lr 0.001 --out /tmp/t2-0.001
    python benchmarks/reproduce_table2.py --iterations 5000 --out /tmp/t2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from mamlab.analysis.studies import DIVERGENCE_FACTOR, Learner, diverged, support_sharpness
from mamlab.config import resolve_config
from mamlab.core.losses import per_task_loss
from mamlab.evaluate import eval_generator, evaluate_model
from mamlab.experiments import build_family, loss_for
from mamlab.stats import mean_ci, median_ci, paired_difference_ci
from mamlab.train import load_run, train

PAPER = {"MAML": {1: 0.67, 5: 0.38, 10: 0.35}, "pretrained": {1: 2.41, 5: 2.23, 10: 2.19}}


def _mean_ci(losses: torch.Tensor) -> tuple[float, float]:
    """Mean ± 95% CI half-width; an infinite mean (and no interval) when a task's loss is not finite."""
    if not bool(torch.isfinite(losses).all()):
        return math.inf, math.nan
    return mean_ci(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=70000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/table2"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the runs already in --out instead of training them")
    parser.add_argument("--inner-lr", type=float, default=0.01,
                        help="alpha, the inner step size of training (default 0.01, the paper's; with "
                             "--evaluate-only the runs' own alpha is used)")
    parser.add_argument("--eval-inner-lr", type=float, default=None,
                        help="alpha at evaluation (default: the training --inner-lr)")
    parser.add_argument("--stable-step", type=float, default=None, metavar="C",
                        help="also evaluate MAML with a per-task step size min(alpha, C/lambda_max), lambda_max "
                             "the top Hessian eigenvalue of the task's support loss at theta (0 < C < 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: fastest and steadiest for this tiny MLP)")
    args = parser.parse_args()
    for flag, value in (("--inner-lr", args.inner_lr), ("--eval-inner-lr", args.eval_inner_lr)):
        if value is not None and not value > 0:
            parser.error(f"{flag} must be a positive number, got {value}")
    if args.stable_step is not None and not 0 < args.stable_step < 2:
        parser.error(f"--stable-step must lie in (0, 2), got {args.stable_step}")
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        args.inner_lr = float(load_run(args.out / "maml").config.inner_lr)
    eval_lr = args.inner_lr if args.eval_inner_lr is None else args.eval_inner_lr
    results, times = {}, {}
    for name, method in (("MAML", "maml"), ("pretrained", "pretrain")):
        run_dir = args.out / method
        if args.evaluate_only:
            run = load_run(run_dir)
        else:
            config = resolve_config("sinusoid", None, {"iterations": args.iterations, "method": method,
                                                       "seed": args.seed, "inner_lr": args.inner_lr,
                                                       "val_every": 5000,
                                                       "checkpoint_every": 5000})
            t0 = time.perf_counter()
            run = train(config, run_dir, progress=True)
            times[name] = time.perf_counter() - t0
        results[name] = evaluate_model(run.algorithm, run.config, shots=5, steps=(0, 1, 5, 10), num_tasks=600,
                                       lr=eval_lr, seed=args.eval_seed)
        if method == "maml":
            iterations, maml_run = int(run.iteration or args.iterations), run
    print(f"\nFinn et al. 2017 Table 2, 5-shot sinusoid, {iterations} training iterations, "
          f"600 held-out tasks, training alpha={args.inner_lr:g}, evaluation alpha={eval_lr:g} "
          f"(mean query MSE ± 95% CI; paper in brackets)")
    print(f"{'steps':>5}  {'MAML':>24}  {'pretrained':>24}  {'pretrained − MAML (paired)':>28}"
          f"  {'MAML median':>11}  {'MAML tasks > 10':>15}  {'MAML diverged':>13}")
    rows = []
    for s in (0, 1, 5, 10):
        m, p = results["MAML"].losses[s], results["pretrained"].losses[s]
        (mm, mc), (pm, pc) = _mean_ci(m), _mean_ci(p)
        d, dc = paired_difference_ci(p, m) if bool(torch.isfinite(m).all() & torch.isfinite(p).all()) else (
            math.nan, math.nan)
        paper_m = f"[{PAPER['MAML'][s]:.2f}]" if s in PAPER["MAML"] else ""
        paper_p = f"[{PAPER['pretrained'][s]:.2f}]" if s in PAPER["pretrained"] else ""
        med = float(torch.where(torch.isfinite(m), m, torch.full_like(m, math.inf)).median())
        big = int(((m > 10) | ~torch.isfinite(m)).sum())
        div = int(diverged(m, results["MAML"].losses[0]).sum())
        print(f"{s:>5}  {mm:>8.3f} ± {mc:.3f} {paper_m:>7}  {pm:>8.3f} ± {pc:.3f} {paper_p:>7}  "
              f"{d:>16.3f} ± {dc:.3f}  {med:>11.3f}  {big:>15}  {div:>13}")
        rows.append({"steps": s, "maml": [mm, mc], "pretrained": [pm, pc], "difference": [d, dc],
                     "maml_median": med, "maml_tasks_over_10": big, "maml_diverged": div,
                     "pretrained_median": float(p.median())})
    print(f"diverged: query loss non-finite or above {DIVERGENCE_FACTOR:g}x its step-0 loss")
    if times:
        print("training wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
              + f" ({torch.get_num_threads()} torch thread(s))")
    payload = {"iterations": iterations, "inner_lr": args.inner_lr, "eval_inner_lr": eval_lr, "rows": rows,
               "train_seconds": times, "paper": PAPER}
    if args.stable_step is not None:
        payload["stable_step"] = _report_stable_step(maml_run, eval_lr, args.stable_step, args.eval_seed,
                                                     results["MAML"].losses)
    name = "table2-eval.json" if args.evaluate_only else "table2.json"
    (args.out / name).write_text(json.dumps(payload, indent=2))


def _report_stable_step(run: object, lr: float, factor: float, seed: int,
                        plain: dict[int, torch.Tensor]) -> dict[str, object]:
    """Evaluate MAML with step size min(α, C/λ_max) per task on the same 600 tasks; print and return the rows."""
    t0 = time.perf_counter()
    config, algorithm = run.config, run.algorithm  # type: ignore[attr-defined]
    batch = build_family(config, "test").sample(600, 5, config.queries, eval_generator(seed))  # evaluate_model's
    lam, converged = support_sharpness(Learner("MAML", algorithm, config, "maml"), batch, seed=seed)
    lrs = np.minimum(lr, factor / np.maximum(lam, 1e-12))
    per_task = per_task_loss(loss_for(config))
    losses: dict[int, list[float]] = {s: [] for s in (0, 1, 5, 10)}
    for i in range(batch.num_tasks):
        task = batch.slice(slice(i, i + 1))
        params, done = algorithm.adapt(task.support_x, task.support_y, steps=0), 0
        for s in losses:
            if s > done:
                params = algorithm.adapt(task.support_x, task.support_y, steps=s - done, start=params,
                                         lr=float(lrs[i]))
                done = s
            losses[s].append(float(per_task(algorithm.predict(params, task.query_x), task.query_y)[0]))
    out = {s: torch.tensor(v, dtype=torch.float64) for s, v in losses.items()}
    # the same tasks as evaluate_model's: identical losses before adaptation
    torch.testing.assert_close(out[0], plain[0].double(), rtol=1e-5, atol=1e-6)
    reduced = int((lrs < lr).sum())
    print(f"\nMAML with a per-task step size min(alpha, {factor:g}/lambda_max) at test time (lambda_max: top Hessian "
          f"eigenvalue of the 5-shot support loss at theta; {reduced} of 600 tasks got a smaller step, "
          f"power iteration converged on {int(converged.sum())}); same 600 tasks; "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"{'steps':>5}  {'MAML, stable step':>24}  {'median':>7}  {'diverged':>8}  "
          f"{'stable − plain (paired median)':>30}")
    rows = []
    for s, m in out.items():
        (mm, mc), med = _mean_ci(m), float(m.median())
        div = int(diverged(m, out[0]).sum())
        pm = median_ci((m - plain[s].double()).nan_to_num(nan=-math.inf, neginf=-math.inf, posinf=math.inf))
        paper = f"[{PAPER['MAML'][s]:.2f}]" if s in PAPER["MAML"] else ""
        print(f"{s:>5}  {mm:>8.3f} ± {mc:.3f} {paper:>7}  {med:>7.3f}  {div:>8}  "
              f"{pm[0]:>9.3f} [{pm[1]:.3f}, {pm[2]:.3f}]")
        rows.append({"steps": s, "mean": [mm, mc], "median": med, "diverged": div, "paired_median": list(pm)})
    return {"factor": factor, "reduced_tasks": reduced, "rows": rows}


if __name__ == "__main__":
    main()
