"""The edge of stability in MAML's inner loop: sharpness at θ over training against 2/α, and divergence.

Trains sinusoid MAML (Finn et al.'s setting otherwise: one inner step, Adam β = 0.001, meta-batch
25) for every inner step size α and training K given, keeping 11 evenly spaced checkpoints, then
runs ``mamlab analyze --studies stability`` over all of them (one report) and prints, per run:
the top Hessian eigenvalue of the support loss at the final θ (mean ± 95% CI over 20 held-out
tasks at the training K), 2/α, and how many of the held-out tasks diverged at 5 support points
after 1, 5 and 10 inner steps, with how many of them are sharp (λ_max > 2/α at 5 shots).

    python benchmarks/edge_of_stability.py --out /tmp/eos                       # 4 α × K=10, 10,000 its
    python benchmarks/edge_of_stability.py --iterations 70000 --shots 5,10 --out /tmp/eos-long
    python benchmarks/edge_of_stability.py --out /tmp/eos --analyze-only        # re-analyse the runs

The report is ``OUT/report/index.html`` (figure: λ_max against the iteration, a dashed 2/α per run)
and every number is in ``OUT/report/results.json``; the printed table is also ``OUT/table.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mamlab.analysis.pipeline import analyze_runs
from mamlab.config import resolve_config
from mamlab.train import train


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10000, help="meta-training iterations per run")
    parser.add_argument("--alphas", type=_floats, default=[0.001, 0.003, 0.01, 0.03],
                        help="inner step sizes α, comma-separated (default 0.001,0.003,0.01,0.03)")
    parser.add_argument("--shots", type=_ints, default=[10],
                        help="training support points K, comma-separated (default 10)")
    parser.add_argument("--tasks", type=int, default=600, help="held-out tasks of the divergence count")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the same for every run)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--analyze-only", action="store_true", help="analyse the runs already in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.iterations < 10:
        parser.error(f"--iterations must be >= 10 (10 checkpoints), got {args.iterations}")
    if args.tasks < 2:
        parser.error(f"--tasks must be >= 2, got {args.tasks}")
    torch.set_num_threads(args.threads)
    runs, times = [], {}
    for k in args.shots:
        for alpha in args.alphas:
            run_dir = args.out / "runs" / f"a{alpha:g}-K{k}"
            runs.append(run_dir)
            if args.analyze_only:
                continue
            config = resolve_config("sinusoid", None, {
                "iterations": args.iterations, "shots": k, "inner_lr": alpha, "seed": args.seed,
                "checkpoint_every": max(1, args.iterations // 10), "val_every": max(1, args.iterations // 10)})
            t0 = time.perf_counter()
            train(config, run_dir, progress=False, echo=lambda s: None)
            times[run_dir.name] = time.perf_counter() - t0
            print(f"trained {run_dir.name}: {args.iterations} iterations in {times[run_dir.name]:.1f} s",
                  flush=True)
    t0 = time.perf_counter()
    analyze_runs(runs, args.out / "report", tasks=args.tasks, seed=0, steps=10, studies=["stability"],
                 force=True, echo=lambda s: None)
    analysis_s = time.perf_counter() - t0
    payload = json.loads((args.out / "report" / "results.json").read_text())
    study = payload["results"]["studies"]["stability"]
    steps, shots = study["steps"], study["shots"]
    iterations = payload["results"]["runs"][0]["iterations"]
    k_test = 5 if 5 in shots else shots[0]
    i = shots.index(k_test)
    print(f"\nEdge of stability, sinusoid MAML, {iterations} iterations; λ_max: top Hessian eigenvalue of the "
          f"support loss at the final θ ({study['curve_tasks']} held-out tasks, training K); diverged: of "
          f"{args.tasks} held-out tasks at K={k_test} (query loss > {study['divergence_factor']:g}× step 0)")
    head = f"{'α':>7} {'K':>3} {'λ_max (mean ± CI)':>20} {'max':>8} {'2/α':>7} {'λ/(2/α)':>8}"
    head += "".join(f" {'div@' + str(s):>7}" for s in steps) + f" {'sharp@' + str(k_test):>8} {'sharp&div':>9}"
    print(head)
    rows = []
    for name, e in study["runs"].items():
        final = e["curve"]["sharpness"][-1]
        cells = e["contingency"][i][-1]
        row = {"run": name, "alpha": e["inner_lr"], "K": e["training_shots"],
               "lambda_max": [final["mean"], final["ci"]], "lambda_max_max": e["curve"]["sharpness_max"][-1],
               "two_over_alpha": e["two_over_alpha"], "diverged": dict(zip(map(str, steps), e["diverged"][i], strict=True)),
               "sharp": e["sharp"][i], "contingency": cells, "test_shots": k_test, "tasks": e["tasks"][i]}
        rows.append(row)
        line = (f"{e['inner_lr']:>7g} {e['training_shots']:>3} {final['mean']:>11.1f} ± {final['ci']:<6.1f} "
                f"{row['lambda_max_max']:>8.1f} {e['two_over_alpha']:>7.4g} "
                f"{final['mean'] / e['two_over_alpha']:>8.2f}")
        line += "".join(f" {d:>7}" for d in e["diverged"][i])
        line += f" {e['sharp'][i]:>8} {cells['sharp_diverged']:>9}"
        print(line)
    if times:
        print("training wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    print(f"analysis wall time: {analysis_s:.0f} s; report: {args.out / 'report' / 'index.html'}")
    (args.out / "table.json").write_text(json.dumps({"iterations": iterations, "rows": rows,
                                                     "train_seconds": times, "analysis_seconds": analysis_s},
                                                    indent=2))


if __name__ == "__main__":
    main()
