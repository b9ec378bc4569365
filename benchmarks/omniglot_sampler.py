"""Episodes per second of the vectorized Omniglot sampler against a naive per-episode Python loop.

    python benchmarks/omniglot_sampler.py [--data ../shared/data/omniglot] [--tasks 32] [--seconds 3]

5-way 1-shot 15-query episodes. Uses the minimal split's meta-training characters when the data is
there (read in place, preprocessed into a temporary cache), else synthetic images of the full
release's size (1623 characters x 20 drawings x 28 x 28).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from mamlab.tasks.omniglot import CharacterPool, Omniglot, OmniglotTasks

WAYS, SHOTS, QUERIES = 5, 1, 15


def naive_episode(images: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, ...]:
    """The reference: one episode, one image at a time, in Python."""
    classes = rng.sample(range(images.shape[0]), WAYS)
    sx, sy, qx, qy = [], [], [], []
    for label, c in enumerate(classes):
        drawings = rng.sample(range(images.shape[1]), SHOTS + QUERIES)
        for i, d in enumerate(drawings):
            (sx if i < SHOTS else qx).append(images[c, d].unsqueeze(0))
            (sy if i < SHOTS else qy).append(label)
    return torch.stack(sx), torch.tensor(sy), torch.stack(qx), torch.tensor(qy)


def rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def load_pool(data: Path) -> tuple[CharacterPool, str]:
    if (data / "images_background_small1.zip").is_file():
        with tempfile.TemporaryDirectory() as cache:
            o = Omniglot(data, "minimal", ways=WAYS, cache_dir=cache)
        pool = o.pools["train"]
        return pool, f"real data: minimal split, {len(pool)} characters from {data}"
    print(f"no Omniglot archives at {data}; using synthetic images of the real size", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(1623, 20, 28, 28, generator=g) > 0.85).float()
    pool = CharacterPool(images, tuple(f"A/character{i:04d}" for i in range(1623)),
                         torch.zeros(1623, dtype=torch.long), ("A",))
    return pool, "synthetic data: 1623 characters x 20 drawings"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--tasks", type=int, default=32, help="episodes per vectorized call")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = parser.parse_args()

    pool, what = load_pool(args.data)
    print(what)
    print(f"{WAYS}-way {SHOTS}-shot {QUERIES}-query episodes per second")
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    slow = rate(lambda: naive_episode(pool.images, rng), args.seconds)
    print(f"naive per-episode Python loop:     {slow:10.0f}")
    # torch's intra-op threads spin-wait on each other: when other processes hold the cores, one
    # thread can be far faster than several, so both are shown
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        for label, tasks in (("vectorized", OmniglotTasks(pool, ways=WAYS)),
                             ("vectorized + rotation", OmniglotTasks(pool, ways=WAYS, rotate=True))):
            fast = rate(lambda t=tasks: t.sample(args.tasks, SHOTS, QUERIES, gen), args.seconds) * args.tasks
            print(f"{label:22s} {threads} thread(s): {fast:10.0f}  ({fast / slow:5.1f}x the naive loop)")
    print(f"({args.tasks} episodes per vectorized call)")


if __name__ == "__main__":
    main()
