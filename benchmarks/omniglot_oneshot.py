"""Omniglot on the minimal split: meta-train MAML, then Lake et al.'s 20-way one-shot challenge.

Reads ../shared/data/omniglot (images_background_small1.zip, images_background_small2.zip,
all_runs.zip) or --data. Trains 20-way 1-shot first-order MAML on the 242 characters of the two
minimal background sets (24 of them held out for validation) with the configuration
that reached 16.75% challenge error (README): Conv4 with 32 filters, 5 inner steps of 0.1,
meta-batch 8, 3 query drawings per class, Adam 2e-3 with a cosine schedule over 7,000
iterations, random quarter-turn and per-image affine augmentation. Then it reports:

* the error on the 20 official within-alphabet one-shot runs (all_runs.zip), per run and mean,
  beside a pixel-space nearest-neighbour baseline measured on the same runs (and, with --mhd,
  the Modified Hausdorff Distance baseline, ~2.5 minutes);
* with --curve N, the challenge error of the checkpoints every N iterations (seconds each);
* the standard protocol where the data allows it: 600 20-way 1-shot episodes with 1 query per
  class, classes drawn within one run (the minimal split's only evaluation images).

    python benchmarks/omniglot_oneshot.py --out benchmarks/out/omniglot --threads 1
    python benchmarks/omniglot_oneshot.py --out benchmarks/out/omniglot --evaluate-only
    # the earlier configurations of the README's table
    python benchmarks/omniglot_oneshot.py --out DIR --queries 1 --no-affine --lr-schedule constant --iterations 5000
    python benchmarks/omniglot_oneshot.py --out DIR --queries 1 --iterations 9000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mamlab.algorithms import MetaAlgorithm
from mamlab.config import TrainConfig, resolve_config
from mamlab.evaluate import EvalResult, evaluate_model, evaluate_on_oneshot_runs
from mamlab.tasks.omniglot.oneshot import (
    evaluate_runs,
    load_runs,
    modified_hausdorff_classifier,
    pixel_nearest_neighbour,
)
from mamlab.train import load_run, train

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
PUBLISHED = {"deep convnet, minimal sets (Lake et al. 2015)": "24.0 / 22.3",
             "Bayesian Program Learning, minimal sets": "4.3 / 4.0",
             "Modified Hausdorff Distance (dataset authors' code)": "38.8"}


def episode_protocols(algorithm: MetaAlgorithm, config: TrainConfig, *, ways: Sequence[int] = (20, 5),
                      steps: Sequence[int] = (0, 5, 10), num_tasks: int = 600,
                      seed: int = 0) -> dict[int, EvalResult]:
    """The standard protocol on the minimal split: ``num_tasks`` N-way 1-shot episodes per N in ``ways``.

    Each episode has 1 query per class, its classes drawn within one of the 20 one-shot runs (the
    minimal split's only evaluation images), from the evaluation stream of ``seed`` (the same
    episodes for every model). A model with more outputs than N uses its first N (labels 0..N-1).
    The query images of an episode are classified together: BatchNorm normalizes them with their
    own batch statistics, so this evaluation is transductive (as in Finn et al.'s code).
    """
    return {w: evaluate_model(algorithm, config.with_options(ways=w), shots=1, queries=1, steps=tuple(steps),
                              num_tasks=num_tasks, seed=seed) for w in ways}


def protocol_text(result: EvalResult, ways: int, model_ways: int) -> str:
    """The printed lines of one ``episode_protocols`` result: accuracy ± 95% CI per step count."""
    lines = [f"{result.num_tasks} {ways}-way 1-shot episodes, 1 query per class, classes within one run "
             f"(eval seed {result.seed})" + (f" (the {model_ways}-way model's head, labels 0-{ways - 1})"
                                             if ways < model_ways else "") + ":"]
    for row in result.summary():
        lines.append(f"  {row['steps']:>2} steps: accuracy {100 * row['accuracy']:.2f}% "
                     f"± {100 * row['accuracy_ci95']:.2f}%")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/omniglot"))
    parser.add_argument("--iterations", type=int, default=7000)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=3, help="query drawings per class in meta-training")
    parser.add_argument("--meta-lr", type=float, default=0.002)
    parser.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--affine", action=argparse.BooleanOptionalAction, default=True,
                        help="random affine distortion of each training image")
    parser.add_argument("--first-order", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the run in --out")
    parser.add_argument("--mhd", action="store_true", help="also measure the MHD baseline (~2.5 min)")
    parser.add_argument("--curve", type=int, default=None, metavar="N",
                        help="also score the checkpoints every N iterations on the challenge")
    args = parser.parse_args()
    if not (args.data / "all_runs.zip").exists() and not (args.data / "all_runs").is_dir():
        print(f"Omniglot data not found in {args.data} (needs images_background_small1/2 and all_runs); "
              "pass --data", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate_only:
        run = load_run(args.out)
        previous = args.out / "omniglot_results.json"  # keep the training time measured when it trained
        seconds = json.loads(previous.read_text()).get("train_seconds") if previous.exists() else None
    else:
        config = resolve_config("omniglot", None, {
            "data": str(args.data), "split": "minimal", "ways": 20, "shots": 1, "queries": args.queries,
            "inner_steps": 5, "inner_lr": 0.1, "first_order": args.first_order,
            "meta_batch": args.meta_batch, "meta_lr": args.meta_lr, "lr_schedule": args.lr_schedule,
            "affine": args.affine, "seed": args.seed, "filters": args.filters,
            "iterations": args.iterations, "val_every": 250, "val_tasks": 16, "checkpoint_every": 250})
        t0 = time.perf_counter()
        run = train(config, args.out, progress=True)
        seconds = time.perf_counter() - t0
    c = run.config
    print(f"\nrun {args.out}: 20-way 1-shot {'first-order ' if run.algorithm.first_order else ''}MAML, Conv4 with "
          f"{c.filters} filters, {c.inner_steps} steps of {c.inner_lr}, meta-batch {c.meta_batch}, "
          f"{run.iteration} iterations" + (f", trained in {seconds:.0f} s" if seconds else ""))
    challenge = evaluate_on_oneshot_runs(run.algorithm, c, args.data / "all_runs.zip")
    print("\nLake et al. 20-way within-alphabet one-shot challenge, 20 runs (error %):")
    print(challenge["table"])
    if args.curve:
        curve = {}
        for it in range(args.curve, run.iteration + 1, args.curve):
            ckpt = args.out / "checkpoints" / f"iter_{it:06d}"
            if ckpt.is_dir():
                early = load_run(args.out, checkpoint=ckpt)
                curve[it] = evaluate_on_oneshot_runs(early.algorithm, c, args.data / "all_runs.zip")["mean"]
        print("challenge error of the checkpoints: " + ", ".join(f"{k}: {v:.2f}%" for k, v in curve.items()))
        challenge["curve"] = curve
    runs = load_runs(args.data / "all_runs.zip")
    nn = evaluate_runs(runs, pixel_nearest_neighbour)
    print(f"pixel nearest neighbour (28x28) on the same runs: {nn['mean']:.2f} ± {nn['ci95']:.2f}")
    baselines = {"pixel_nearest_neighbour": nn}
    if args.mhd:
        mhd = evaluate_runs(runs, modified_hausdorff_classifier, raw=True)
        print(f"Modified Hausdorff Distance (105x105) on the same runs: {mhd['mean']:.2f} ± {mhd['ci95']:.2f}")
        baselines["modified_hausdorff"] = mhd
    for name, value in PUBLISHED.items():
        print(f"published: {name}: {value}")
    protocols = episode_protocols(run.algorithm, c, steps=(0, c.inner_steps, 10))
    for ways, result in protocols.items():
        print("\n" + protocol_text(result, ways, c.ways))
    (args.out / "omniglot_results.json").write_text(json.dumps({
        "config": c.to_dict(), "iteration": run.iteration, "train_seconds": seconds,
        "challenge": {k: v for k, v in challenge.items() if k != "table"}, "baselines": baselines,
        "protocol_1shot": {f"{w}-way": p.to_dict() for w, p in protocols.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
