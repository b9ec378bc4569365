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
import time
from pathlib import Path

import torch

from mamlab.analysis.studies import DIVERGENCE_FACTOR, diverged
from mamlab.config import resolve_config
from mamlab.evaluate import evaluate_model
from mamlab.stats import mean_ci, paired_difference_ci
from mamlab.train import load_run, train

PAPER = {"MAML": {1: 0.67, 5: 0.38, 10: 0.35}, "pretrained": {1: 2.41, 5: 2.23, 10: 2.19}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=70000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/table2"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the runs already in --out instead of training them")
    parser.add_argument("--inner-lr", type=float, default=0.01,
                        help="alpha, the inner step size of training (default 0.01, the paper's)")
    parser.add_argument("--eval-inner-lr", type=float, default=None,
                        help="alpha at evaluation (default: the training --inner-lr)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: fastest and steadiest for this tiny MLP)")
    args = parser.parse_args()
    for flag, value in (("--inner-lr", args.inner_lr), ("--eval-inner-lr", args.eval_inner_lr)):
        if value is not None and not value > 0:
            parser.error(f"{flag} must be a positive number, got {value}")
    eval_lr = args.inner_lr if args.eval_inner_lr is None else args.eval_inner_lr
    torch.set_num_threads(args.threads)
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
    print(f"\nFinn et al. 2017 Table 2, 5-shot sinusoid, {args.iterations} training iterations, "
          f"600 held-out tasks, training alpha={args.inner_lr:g}, evaluation alpha={eval_lr:g} "
          f"(mean query MSE ± 95% CI; paper in brackets)")
    print(f"{'steps':>5}  {'MAML':>24}  {'pretrained':>24}  {'pretrained − MAML (paired)':>28}"
          f"  {'MAML median':>11}  {'MAML tasks > 10':>15}  {'MAML diverged':>13}")
    rows = []
    for s in (0, 1, 5, 10):
        m, p = results["MAML"].losses[s], results["pretrained"].losses[s]
        (mm, mc), (pm, pc) = mean_ci(m), mean_ci(p)
        d, dc = paired_difference_ci(p, m)
        paper_m = f"[{PAPER['MAML'][s]:.2f}]" if s in PAPER["MAML"] else ""
        paper_p = f"[{PAPER['pretrained'][s]:.2f}]" if s in PAPER["pretrained"] else ""
        med, big = float(m.median()), int((m > 10).sum())
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
    name = "table2-eval.json" if args.evaluate_only else "table2.json"
    (args.out / name).write_text(json.dumps({"iterations": args.iterations, "inner_lr": args.inner_lr,
                                             "eval_inner_lr": eval_lr, "rows": rows,
                                             "train_seconds": times, "paper": PAPER}, indent=2))


if __name__ == "__main__":
    main()
