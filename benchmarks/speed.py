"""Meta-training speed and peak memory: mamlab against a plain per-task loop measured in the same run.

Each (case, implementation) runs in its own subprocess so peak memory (max RSS growth over the
process's RSS just before the first meta-iteration) is its own. Prints meta-iterations per second,
peak memory, and ratios against the per-task loop. ``mamlab`` is MAML on the auto path,
``mamlab:PATH`` on the execution path PATH (for Conv4: conv, loop, vmap); ``anil`` is ANIL on
the same model (only the head adapts; the auto path). learn2learn and higher are timed too when
importable. Usage:

    python benchmarks/speed.py            # both cases
    python benchmarks/speed.py --case sinusoid --repeat 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mamlab import ANIL, MAML, TaskBatch
from mamlab.models import MLP, Conv4
from mamlab.tasks import Sinusoid

CASES = {
    "sinusoid": {"desc": "sinusoid MLP 1-40-40-1, 25 tasks, K=10, 10 query, 1 step, 2nd order",
                 "iters": 200, "warmup": 20},
    "conv4": {"desc": "Conv4+BN 28x28, 5-way 1-shot, 15 query, 32 tasks, 1 step, 2nd order",
              "iters": 4, "warmup": 1},
}


def make(case: str) -> tuple[torch.nn.Module, TaskBatch, float, object]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if case == "sinusoid":
        return MLP(1, 1, (40, 40)), Sinusoid().sample(25, 10, 10, g), 0.01, F.mse_loss
    ways, tasks = 5, 32
    sx = torch.rand(tasks, ways, 1, 28, 28, generator=g)
    qx = torch.rand(tasks, ways * 15, 1, 28, 28, generator=g)
    sy = torch.arange(ways).expand(tasks, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(15).expand(tasks, -1).contiguous()
    return Conv4(ways), TaskBatch(sx, sy, qx, qy), 0.4, F.cross_entropy


def loop_step(model: torch.nn.Module, batch: TaskBatch, lr: float, loss_fn) -> None:
    """The plain per-task loop users write: adapt with create_graph=True, backward per task."""
    names = [k for k, _ in model.named_parameters()]
    params = list(model.parameters())
    for i in range(batch.num_tasks):
        loss = loss_fn(functional_call(model, dict(zip(names, params, strict=True)), (batch.support_x[i],)),
                       batch.support_y[i])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        adapted = [p - lr * g for p, g in zip(params, grads, strict=True)]
        query = functional_call(model, dict(zip(names, adapted, strict=True)), (batch.query_x[i],))
        (loss_fn(query, batch.query_y[i]) / batch.num_tasks).backward()


def learn2learn_step(model, batch, lr, loss_fn, learner) -> None:
    for i in range(batch.num_tasks):
        clone = learner.clone()
        clone.adapt(loss_fn(clone(batch.support_x[i]), batch.support_y[i]))
        (loss_fn(clone(batch.query_x[i]), batch.query_y[i]) / batch.num_tasks).backward()


def higher_step(model, batch, lr, loss_fn, inner_opt) -> None:
    import higher

    for i in range(batch.num_tasks):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(loss_fn(fmodel(batch.support_x[i]), batch.support_y[i]))
            (loss_fn(fmodel(batch.query_x[i]), batch.query_y[i]) / batch.num_tasks).backward()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(case: str, impl: str, queue: mp.Queue, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    try:
        model, batch, lr, loss_fn = make(case)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        if impl == "loop":
            def step() -> None:
                loop_step(model, batch, lr, loss_fn)
        elif impl == "anil":  # the same model, only its head adapted (Raghu et al. 2020)
            maml = ANIL(model, loss_fn, lr)

            def step() -> None:
                maml.meta_loss(batch).backward()
        elif impl.startswith("mamlab"):
            execution = impl.split(":")[1] if ":" in impl else "auto"
            maml = MAML(model, loss_fn, lr, execution=execution)

            def step() -> None:
                maml.meta_loss(batch).backward()
        elif impl == "learn2learn":
            import learn2learn as l2l

            learner = l2l.algorithms.MAML(model, lr=lr)

            def step() -> None:
                learn2learn_step(model, batch, lr, loss_fn, learner)
        elif impl == "higher":
            inner = torch.optim.SGD(model.parameters(), lr=lr)

            def step() -> None:
                higher_step(model, batch, lr, loss_fn, inner)
        else:
            raise ValueError(impl)
        before = rss_mb()
        base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for _ in range(CASES[case]["warmup"]):
            opt.zero_grad()
            step()
            opt.step()
        n = CASES[case]["iters"]
        t0 = time.perf_counter()
        for _ in range(n):
            opt.zero_grad()
            step()
            opt.step()
        elapsed = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put({"it_s": n / elapsed, "peak_mb": max(peak, base_peak) - before})
    except ImportError as e:
        queue.put({"skipped": f"not importable ({e.name})"})
    except Exception as e:  # report, don't crash the whole benchmark
        queue.put({"skipped": f"{type(e).__name__}: {e}"[:120]})


def run(case: str, impl: str, threads: int | None) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=measure, args=(case, impl, q, threads))
    p.start()
    result = q.get()
    p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--repeat", type=int, default=1, help="repeat each measurement, keep the best")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--impls", default=None,
                        help="comma-separated subset, e.g. loop,mamlab (the loop reference is always run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every implementation (default: torch's choice)")
    args = parser.parse_args()
    cases = list(CASES) if args.case == "all" else [args.case]
    impls = {"sinusoid": ["loop", "mamlab", "mamlab:vmap", "mamlab:loop", "anil", "learn2learn", "higher"],
             "conv4": ["loop", "mamlab", "mamlab:conv", "mamlab:loop", "mamlab:vmap", "anil", "learn2learn",
                       "higher"]}
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s) per implementation")
    report = {}
    for case in cases:
        print(f"\n{case}: {CASES[case]['desc']}")
        rows = {}
        chosen = impls[case] if args.impls is None else ["loop", *[i for i in args.impls.split(",") if i != "loop"]]
        for impl in chosen:
            results = [run(case, impl, args.threads) for _ in range(args.repeat)]
            ok = [r for r in results if "it_s" in r]
            rows[impl] = max(ok, key=lambda r: r["it_s"]) if ok else results[0]
        ref = rows["loop"]
        for impl, r in rows.items():
            if "skipped" in r:
                print(f"  {impl:<14} skipped: {r['skipped']}")
                continue
            print(f"  {impl:<14} {r['it_s']:>9.2f} it/s  {r['it_s'] / ref['it_s']:>6.2f}x loop   "
                  f"peak +{r['peak_mb']:>7.0f} MB  {r['peak_mb'] / max(ref['peak_mb'], 1):>5.2f}x loop")
        report[case] = rows
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
