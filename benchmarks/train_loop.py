"""What ``mamlab train`` costs beyond the meta-step: the training loop against the bare step, in one process.

The reference is the bare meta-iteration (``zero_grad`` + ``meta_loss(batch).backward()`` + Adam's
step) on the run's own model, batch size and settings. Then ``mamlab.train.train`` runs the same
sinusoid training in turn with TensorBoard getting every iteration, with its default thinning
(``TENSORBOARD_POINTS``), and with TensorBoard off; every variant also samples its tasks, checks
for non-finite values, logs ``metrics.jsonl``, validates and checkpoints as a run does. Rounds
alternate the variants so load on a shared machine hits them alike; printed are the medians over
rounds of the wall time per iteration (the whole ``train`` call divided by its iterations) and
their ratios to the bare step. Usage:

    python benchmarks/train_loop.py                     # 10,000 iterations, 3 rounds, one thread
    python benchmarks/train_loop.py --iterations 20000 --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mamlab.runlog
import mamlab.train
from mamlab.config import resolve_config
from mamlab.experiments import build_family
from mamlab.train import TRAIN_SEED_OFFSET, build_run_algorithm, train


def bare_step(config, iterations: int) -> float:
    """Seconds per bare meta-iteration on fresh batches of the run's task family."""
    torch.manual_seed(config.seed)
    algorithm = build_run_algorithm(config)
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=config.meta_lr)
    family = build_family(config, "train")
    generator = torch.Generator().manual_seed(TRAIN_SEED_OFFSET + config.seed)
    batches = [family.sample(config.meta_batch, config.shots, config.queries, generator) for _ in range(50)]
    start = time.perf_counter()
    for i in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        algorithm.meta_loss(batches[i % len(batches)]).backward()
        optimizer.step()
    return (time.perf_counter() - start) / iterations


class _NoTensorBoard(mamlab.runlog.RunLogger):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["tensorboard"] = False
        super().__init__(*args, **kwargs)


def train_run(config, folder: Path, variant: str) -> float:
    """Seconds per iteration of a whole ``train`` call with TensorBoard ``variant``."""
    points, logger = mamlab.train.TENSORBOARD_POINTS, mamlab.train.RunLogger
    try:
        if variant == "every iteration":
            mamlab.train.TENSORBOARD_POINTS = 10**12
        elif variant == "off":
            mamlab.train.RunLogger = _NoTensorBoard
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        train(config, folder, progress=False, echo=lambda s: None)
        return (time.perf_counter() - start) / config.iterations
    finally:
        mamlab.train.TENSORBOARD_POINTS, mamlab.train.RunLogger = points, logger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = resolve_config("sinusoid", None, {"iterations": args.iterations, "val_every": 1000,
                                               "checkpoint_every": 1000})
    variants = ["bare step", "TensorBoard every iteration", "TensorBoard thinned (default)", "TensorBoard off"]
    every = max(1, config.iterations // mamlab.train.TENSORBOARD_POINTS)
    print(f"torch {torch.__version__}, {args.threads} thread(s); sinusoid, meta-batch {config.meta_batch}, "
          f"{config.iterations} iterations (validation and a checkpoint every 1,000); the default thinning "
          f"sends TensorBoard every {every}th iteration")
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        train(resolve_config("sinusoid", None, {"iterations": 20}), folder, progress=False,
              echo=lambda s: None)  # one-time imports out of the way
        for r in range(args.rounds):
            times["bare step"].append(bare_step(config, args.iterations))
            for variant, mode in zip(variants[1:], ("every iteration", "thinned", "off"), strict=True):
                times[variant].append(train_run(config, folder, mode))
            print(f"  round {r + 1}: " + ", ".join(f"{v} {t[-1] * 1e3:.3f} ms" for v, t in times.items()),
                  flush=True)
    ref = statistics.median(times["bare step"])
    print(f"\n  {'variant':<32}{'ms/iteration':>14}{'x bare step':>13}")
    for variant, t in times.items():
        m = statistics.median(t)
        print(f"  {variant:<32}{m * 1e3:>14.3f}{m / ref:>13.2f}")


if __name__ == "__main__":
    main()
