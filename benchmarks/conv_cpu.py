"""Ways to run second-order MAML on Conv4 on the CPU, timed side by side in one process.

The ideas measured for the CPU conv path (``mamlab.core.conv``, ``execution="conv"``, which is
channels-last + pool-first + the first BatchNorm folded into its convolution): NCHW against
channels-last memory, max-pooling before ReLU, grouped convolutions that run a chunk of tasks as
the groups of one convolution (input ``[N, T*C, H, W]``, weights ``[T*out, C, k, k]``, BatchNorm
per (task, channel) on that layout, the head as one ``baddbmm``), and the engine's loop and vmap
paths; ``mamlab:conv:CHUNK`` runs the conv path with ``task_chunk=CHUNK`` (chunks of tasks together,
as grouped convolutions: the conv path's default on CUDA devices). Every variant computes the same
meta-gradient as ``speed.py``'s plain per-task loop (the reference). The variants run in turn,
round after round, so a load change on a shared machine hits all of them alike; printed: the
median seconds per meta-iteration, its ratio to the loop's, the peak bytes autograd holds in
saved tensors (``mamlab.core.memory.peak_saved_bytes``, measured once per variant), and the same
peak counting each storage once (a tensor saved by two operations, as a ReLU's output that the
next convolution also saves, is in memory once). Usage:

    python benchmarks/conv_cpu.py                        # 8 tasks, 1 thread, 3 rounds
    python benchmarks/conv_cpu.py --tasks 32 --threads 2 --variants loop,mamlab:conv
    python benchmarks/conv_cpu.py --tasks 32 --variants loop,mamlab:conv,mamlab:conv:8,mamlab:conv:32,mamlab:vmap
    python benchmarks/conv_cpu.py --profile loop,mamlab:vmap,mamlab:conv   # torch.profiler's top ops
    python benchmarks/conv_cpu.py --tasks 32 --rss loop,mamlab:conv:32,mamlab:vmap  # peak RSS growth

``--rss`` runs one meta-gradient of each variant in a fresh process and prints the growth of its
peak resident memory over the memory held before the step: unlike the saved-tensor counts it sees
every temporary (a convolution's output before pooling, the gradients of backward), so it is the
CPU's nearest measure to ``torch.cuda.max_memory_allocated``.

The gradient difference printed is in float32, where second-order terms through BatchNorm amplify
rounding; ``tests/core/test_conv.py`` compares the conv path with the loop path in float64 (1e-10).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mamlab import MAML, TaskBatch
from mamlab.core.memory import peak_saved_bytes
from speed import loop_step, make, rss_bytes  # benchmarks/ is the script's directory

VARIANTS = ("loop", "mamlab:loop", "nchw+pool-first", "channels-last", "channels-last+pool-first",
            "mamlab:conv", "grouped:all", "grouped:4", "grouped:2", "mamlab:vmap", "mamlab:conv:32", "mamlab:conv:8")
DEFAULT = ("loop", "mamlab:loop", "nchw+pool-first", "channels-last", "channels-last+pool-first", "mamlab:conv",
           "grouped:all", "grouped:4")


def block(h: torch.Tensor, p: list[torch.Tensor], groups: int, pool_first: bool) -> torch.Tensor:
    """conv3x3 → BatchNorm (batch statistics) → ReLU → 2x2 max-pool, or pool before ReLU."""
    w, b, g, beta = p
    h = F.conv2d(h, w, b, padding=1, groups=groups)
    h = F.batch_norm(h, None, None, g, beta, training=True)
    return F.relu(F.max_pool2d(h, 2)) if pool_first else F.max_pool2d(F.relu(h), 2)


def task_forward(p: list[torch.Tensor], x: torch.Tensor, channels_last: bool, pool_first: bool) -> torch.Tensor:
    """Conv4 on one task's images ``[N, H, W]``."""
    h = x.unsqueeze(1) if x.dim() == 3 else x
    if channels_last:  # an explicit copy: a 1-channel tensor's .contiguous(channels_last) keeps NCHW strides
        h = torch.empty_like(h, memory_format=torch.channels_last).copy_(h)
    for i in range(4):
        h = block(h, p[4 * i:4 * i + 4], 1, pool_first)
    return F.linear(h.flatten(1), p[16], p[17])


def grouped_forward(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Conv4 on T tasks at once: task-batched parameters ``[T, ...]``, images ``[T, N, 1, H, W]``."""
    t, n = x.shape[:2]
    h = x.reshape(t, n, -1, *x.shape[-2:]).transpose(0, 1).reshape(n, -1, *x.shape[-2:])
    h = torch.empty_like(h, memory_format=torch.channels_last).copy_(h)
    for i in range(4):
        w, b, g, beta = p[4 * i:4 * i + 4]
        h = block(h, [w.flatten(0, 1), b.flatten(), g.flatten(), beta.flatten()], t, pool_first=True)
    h = h.reshape(n, t, -1).transpose(0, 1)  # [T, N, features]
    return torch.baddbmm(p[17].unsqueeze(1), h, p[16].transpose(1, 2))


def functional_step(model: torch.nn.Module, batch: TaskBatch, lr: float, channels_last: bool,
                    pool_first: bool) -> None:
    """The loop of ``speed.loop_step`` with ``task_forward`` instead of the modules' forward."""
    theta = list(model.parameters())
    for i in range(batch.num_tasks):
        loss = F.cross_entropy(task_forward(theta, batch.support_x[i], channels_last, pool_first),
                               batch.support_y[i])
        grads = torch.autograd.grad(loss, theta, create_graph=True)
        adapted = [p - lr * g for p, g in zip(theta, grads, strict=True)]
        query = task_forward(adapted, batch.query_x[i], channels_last, pool_first)
        (F.cross_entropy(query, batch.query_y[i]) / batch.num_tasks).backward()


def grouped_step(model: torch.nn.Module, batch: TaskBatch, lr: float, chunk: int) -> None:
    """Chunks of ``chunk`` tasks, each chunk one grouped forward, inner gradient and backward."""
    theta = list(model.parameters())

    def losses(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = grouped_forward(params, x)
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)

    for s in range(0, batch.num_tasks, chunk):
        part = batch.slice(slice(s, s + chunk))
        params = [p.unsqueeze(0).expand(part.num_tasks, *p.shape) for p in theta]
        grads = torch.autograd.grad(losses(params, part.support_x, part.support_y).sum(), params,
                                    create_graph=True)
        adapted = [p - lr * g for p, g in zip(params, grads, strict=True)]
        (losses(adapted, part.query_x, part.query_y).sum() / batch.num_tasks).backward()


def variant(name: str, model: torch.nn.Module, batch: TaskBatch, lr: float, loss_fn) -> Callable[[], None]:
    """One meta-gradient (into ``.grad``) of ``batch`` by the variant ``name``."""
    if name == "loop":
        return lambda: loop_step(model, batch, lr, loss_fn)
    if name.startswith("mamlab:"):  # mamlab:PATH, or mamlab:conv:CHUNK for chunks of CHUNK tasks together
        _, path, *chunk = name.split(":")
        maml = MAML(model, loss_fn, lr, execution=path, task_chunk=int(chunk[0]) if chunk else None)
        return lambda: maml.meta_loss(batch).backward()
    if name.startswith("grouped:"):
        chunk = batch.num_tasks if name == "grouped:all" else int(name.split(":")[1])
        return lambda: grouped_step(model, batch, lr, chunk)
    layouts = {"nchw+pool-first": (False, True), "channels-last": (True, False),
               "channels-last+pool-first": (True, True)}
    channels_last, pool_first = layouts[name]
    return lambda: functional_step(model, batch, lr, channels_last, pool_first)


def peak_saved_storage_bytes(fn: Callable[[], object]) -> int:
    """As ``peak_saved_bytes``, but a storage that several saved tensors share (a ReLU's output that the
    next convolution saves too) counts once, with its whole size: the memory the saved tensors hold."""
    live: dict[int, list[int]] = {}  # storage address -> [saved tensors alive on it, its bytes]
    state = {"live": 0, "peak": 0}

    class Held:
        def __init__(self, t: torch.Tensor) -> None:
            storage = t.untyped_storage()
            self.t, self.key = t, (storage.data_ptr(), storage.nbytes())
            entry = live.setdefault(self.key[0], [0, self.key[1]])
            if entry[0] == 0:
                state["live"] += entry[1]
                state["peak"] = max(state["peak"], state["live"])
            entry[0] += 1

        def __del__(self) -> None:
            entry = live[self.key[0]]
            entry[0] -= 1
            if entry[0] == 0:
                state["live"] -= entry[1]
                del live[self.key[0]]

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        fn()
    return state["peak"]


def rss_growth(name: str, tasks: int, threads: int, queue: mp.Queue) -> None:
    """In a fresh process: the growth (MiB) of peak RSS over one meta-gradient of variant ``name``."""
    torch.set_num_threads(threads)
    model, batch, lr, loss_fn = make("conv4")
    step = variant(name, model, batch.slice(slice(0, tasks)), lr, loss_fn)
    before = rss_bytes() / 2**20
    step()
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8, help="tasks in the meta-batch (speed.py's case: 32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--profile", default=None, metavar="VARIANTS",
                        help="instead of timing, print torch.profiler's ops by self CPU time for these variants")
    parser.add_argument("--rss", default=None, metavar="VARIANTS",
                        help="instead of timing, print each variant's peak RSS growth over one meta-gradient")
    args = parser.parse_args()
    names = (args.rss or args.profile or args.variants).split(",")
    unknown = [n for n in names if n not in VARIANTS and not n.startswith(("grouped:", "mamlab:conv:"))]
    if unknown:
        parser.error(f"unknown variants {unknown}; allowed: {', '.join(VARIANTS)}")
    if args.rss:
        ctx = mp.get_context("spawn")
        print(f"torch {torch.__version__}, {args.threads} thread(s), {args.tasks} tasks: peak RSS growth over one "
              "meta-gradient, each variant in a fresh process")
        for n in names:
            queue = ctx.Queue()
            proc = ctx.Process(target=rss_growth, args=(n, args.tasks, args.threads, queue))
            proc.start()
            growth = queue.get()
            proc.join()
            print(f"  {n:<26} +{growth:8.1f} MiB")
        return
    torch.set_num_threads(args.threads)
    model, batch, lr, loss_fn = make("conv4")
    batch = batch.slice(slice(0, args.tasks))
    steps = {n: variant(n, model, batch, lr, loss_fn) for n in names}
    if args.profile:
        for n, step in steps.items():
            step()  # warm-up
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            print(f"{n}: one meta-gradient of {args.tasks} tasks, {args.threads} thread(s)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
        return
    grads, saved, stored = {}, {}, {}
    for n, step in steps.items():  # warm-up; the gradients, to check every variant against the loop
        model.zero_grad()
        saved[n] = peak_saved_bytes(step)
        model.zero_grad()
        stored[n] = peak_saved_storage_bytes(step)
        grads[n] = torch.cat([p.grad.flatten() for p in model.parameters()])
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n, step in steps.items():
            model.zero_grad()
            start = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - start)
    median = {n: sorted(ts)[len(ts) // 2] for n, ts in times.items()}
    ref = names[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.tasks} tasks, {args.rounds} rounds; "
          f"ratios against {ref}")
    for n in names:
        err = ((grads[n] - grads[ref]).norm() / grads[ref].norm()).item()
        print(f"  {n:<26} {median[n]:7.3f} s/it  {median[ref] / median[n]:5.2f}x   saved tensors "
              f"{saved[n] / 2**20:7.1f} MiB  {saved[n] / saved[ref]:5.2f}x   distinct storages "
              f"{stored[n] / 2**20:7.1f} MiB   grad rel. diff {err:.1e}")


if __name__ == "__main__":
    main()
