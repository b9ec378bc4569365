"""Meta-training speed and peak memory: mamlab beside a per-task loop, learn2learn, higher and TorchOpt.

One meta-iteration is ``zero_grad`` + the meta-gradient of second-order MAML + an Adam step. Each
(case, implementation) runs in its own spawned subprocess, so its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` (reset once the model and batch are built, so it is the
meta-iteration's peak over the resident model and batch), on the CPU the growth of the maximum RSS
over the RSS just before the first meta-iteration. Each meta-iteration is timed on its own
(``torch.cuda.synchronize`` around it on CUDA) after a few untimed warm-up iterations; printed are
the median meta-iterations per second, the peak memory, and both as ratios to the per-task loop
and to learn2learn, measured in the same run. A peer that cannot run says why in one line and
ratios to it are left out.

Implementations (``IMPLEMENTATIONS``: name → builder that returns a ``step()`` computing the
meta-gradient into ``.grad``; add one entry to add one):

* ``loop``: the per-task loop users write (``loop_step``), ``create_graph=True``, backward per task;
* ``mamlab``: ``mamlab.MAML`` on the auto path, ``mamlab:PATH`` on the execution path PATH
  (batched, vmap, loop, conv); ``mamlab:graph`` and ``mamlab:graph:conv`` replay its meta-gradient
  from a CUDA graph; ``mamlab:conv-nchw`` keeps NCHW maps on the conv path; a ``:cudnn-benchmark``
  suffix lets cuDNN time its convolution algorithms; ``anil``: ANIL on the same model (a different
  meta-gradient);
* ``learn2learn``: learn2learn 0.2.0's ``MAML`` (``clone``/``adapt``), loaded from the peers folder
  with its ``load_learn2learn_maml.py`` (the package's compiled parts do not build on new Pythons);
* ``higher``: higher 0.2.1, ``innerloop_ctx`` with ``copy_initial_weights=False``;
* ``torchopt``: TorchOpt 0.7.3's MAML pattern (``torchopt.MetaSGD`` on the module,
  ``extract_state_dict``/``recover_state_dict`` around each task, as its
  ``examples/few-shot/maml_omniglot.py``).

Every peer backpropagates each task's query loss as soon as it has it, as the loop does, so all of
them hold one task's graph at a time. ``--check`` compares every implementation's meta-gradient
with ``loop_step``'s in float64 on a tiny sinusoid case and a tiny Conv4 case
(``tests/test_benchmarks_speed.py`` runs the same comparison in CI).

Peers: ``--peers DIR``, else ``$MAMLAB_PEERS``, else ``<repo>/../shared/peers`` (from a git
worktree, also the main checkout's ``../shared/peers``); higher and TorchOpt are imported (on a
machine without internet, install them from the wheels in that folder, see its README.md).

Usage:

    python benchmarks/speed.py --case sinusoid --threads 1
    python benchmarks/speed.py --case conv4 --threads 1 --impls mamlab,mamlab:loop --repeat 2
    python benchmarks/speed.py --device cuda --case all --json speed.json
    python benchmarks/speed.py --device cuda --scale 32,128,512,1024      # tasks/s as T grows
    python benchmarks/speed.py --check                                   # float64 meta-gradients
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mamlab import ANIL, MAML, TaskBatch
from mamlab.core.graphs import GraphedMetaGradient
from mamlab.core.memory import is_out_of_memory
from mamlab.errors import MamlabError
from mamlab.models import MLP, Conv4
from mamlab.tasks import Sinusoid

__all__ = ["CASES", "TINY_CASES", "IMPLEMENTATIONS", "NOT_MAML", "Case", "Setup", "Job", "Unavailable",
           "make", "make_tiny", "loop_step", "rss_bytes", "default_peers", "load_learn2learn_maml", "meta_gradient",
           "relative_difference", "check", "measure", "run", "main"]

REPO = Path(__file__).resolve().parents[1]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[], None]


@dataclass(frozen=True)
class Case:
    """A benchmark workload: its description, default meta-batch and inner steps, iteration counts.

    ``iters``/``warmup`` map a device type (``"cpu"``, ``"cuda"``) to timed and untimed iterations.
    """

    desc: str
    tasks: int
    steps: int
    iters: dict[str, int]
    warmup: dict[str, int]


CASES: dict[str, Case] = {
    "sinusoid": Case("sinusoid MLP 1-40-40-1, K=10, 10 query, 2nd order", 25, 1,
                     {"cpu": 200, "cuda": 100}, {"cpu": 20, "cuda": 10}),
    "conv4": Case("Conv4+BN 28x28, 5-way 1-shot, 15 query, 2nd order", 32, 1,
                  {"cpu": 4, "cuda": 10}, {"cpu": 1, "cuda": 3}),
    "omniglot20": Case("Conv4+BN 28x28, 20-way 1-shot, 1 query per class, inner lr 0.1, 2nd order", 16, 5,
                       {"cpu": 3, "cuda": 8}, {"cpu": 1, "cuda": 2}),
}

#: The tiny float64 cases of ``--check`` and the CI test: (a sinusoid MLP, a Conv4 with affine BatchNorm).
TINY_CASES = ("sinusoid", "conv")


@dataclass
class Setup:
    """What a builder gets: the model (its parameters are θ), the batch, α, the loss, inner steps, peers."""

    model: nn.Module
    batch: TaskBatch
    lr: float
    loss_fn: LossFn
    steps: int
    peers: Path | None = None


class Unavailable(Exception):
    """An implementation cannot run here; the message says why in one line."""


def make(case: str, tasks: int | None = None, device: torch.device | str = "cpu",
         ways: int | None = None) -> tuple[nn.Module, TaskBatch, float, LossFn]:
    """The model, a batch of random tasks, the inner step size α and the loss of ``case``.

    Args:
        case: a key of ``CASES``.
        tasks: the meta-batch (default: the case's).
        device: where the model and batch live.
        ways: classes per task for the conv cases (default: the case's).

    Returns:
        ``(model, batch, lr, loss_fn)``, seeded, the same every call.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tasks = CASES[case].tasks if tasks is None else tasks
    if case == "sinusoid":
        model, batch, lr, loss_fn = MLP(1, 1, (40, 40)), Sinusoid().sample(tasks, 10, 10, g), 0.01, F.mse_loss
    else:
        # Finn et al.'s Omniglot settings (``mamlab train omniglot --ways 20 --print-config``):
        # 20-way 1-shot, 1 query per class, α = 0.1, 5 steps, meta-batch 16, Conv4 with 64 filters.
        ways = ways or (5 if case == "conv4" else 20)
        queries = 15 if case == "conv4" else 1
        lr = 0.4 if case == "conv4" else 0.1
        sx = torch.rand(tasks, ways, 1, 28, 28, generator=g)
        qx = torch.rand(tasks, ways * queries, 1, 28, 28, generator=g)
        sy = torch.arange(ways).expand(tasks, -1).contiguous()
        qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
        model, batch, loss_fn = Conv4(ways), TaskBatch(sx, sy, qx, qy), F.cross_entropy
    return model.to(device), batch.to(device), lr, loss_fn


def make_tiny(case: str, device: torch.device | str = "cpu") -> Setup:
    """A tiny float64 case for gradient checks (2 inner steps): ``"sinusoid"`` or ``"conv"``.

    The conv case is Conv4 (3-way, 6 filters, 16x16 binary images, so max-pooling windows hold
    ties) with BatchNorm weights drawn around zero, some negative; 3 tasks, 1 shot, 2 queries.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case == "sinusoid":
        model: nn.Module = MLP(1, 1, (8, 8))
        batch = Sinusoid().sample(4, 5, 5, g)
        lr, loss_fn = 0.05, F.mse_loss
    elif case == "conv":
        tasks, ways, queries = 3, 3, 2
        model = Conv4(ways, hidden=6, image_size=16)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.normal_(0.2, 1.0)
                    m.bias.normal_(0.0, 0.5)
        sx = (torch.rand(tasks, ways, 1, 16, 16, generator=g) > 0.6).float()
        qx = (torch.rand(tasks, ways * queries, 1, 16, 16, generator=g) > 0.6).float()
        sy = torch.arange(ways).expand(tasks, -1).contiguous()
        qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
        batch, lr, loss_fn = TaskBatch(sx, sy, qx, qy), 0.3, F.cross_entropy
    else:
        raise ValueError(f"tiny case must be one of {TINY_CASES}, got {case!r}")
    return Setup(model.to(device=device, dtype=torch.float64), batch.to(device, torch.float64), lr, loss_fn, 2)


def loop_step(model: nn.Module, batch: TaskBatch, lr: float, loss_fn: LossFn, steps: int = 1) -> None:
    """The plain per-task loop users write: ``steps`` SGD steps with ``create_graph=True``, backward per task.

    Leaves ∇θ of (1/T) Σ_i L_query(θ'_i) in the parameters' ``.grad`` (added to what is there).
    """
    names = [k for k, _ in model.named_parameters()]
    params = list(model.parameters())
    for i in range(batch.num_tasks):
        adapted = params
        for _ in range(steps):
            out = functional_call(model, dict(zip(names, adapted, strict=True)), (batch.support_x[i],))
            grads = torch.autograd.grad(loss_fn(out, batch.support_y[i]), adapted, create_graph=True)
            adapted = [p - lr * g for p, g in zip(adapted, grads, strict=True)]
        query = functional_call(model, dict(zip(names, adapted, strict=True)), (batch.query_x[i],))
        (loss_fn(query, batch.query_y[i]) / batch.num_tasks).backward()


def default_peers() -> Path:
    """The peers folder: ``$MAMLAB_PEERS``, else ``<repo>/../shared/peers`` (or the main checkout's)."""
    env = os.environ.get("MAMLAB_PEERS")
    if env:
        return Path(env)
    candidates = [REPO.parent / "shared" / "peers", REPO / "shared" / "peers"]
    git = REPO / ".git"
    if git.is_file():  # a git worktree: ".git" reads "gitdir: <main checkout>/.git/worktrees/<name>"
        text = git.read_text().strip()
        if text.startswith("gitdir:"):
            gitdir = Path(text.split(":", 1)[1].strip())
            main = next((p.parent for p in gitdir.parents if p.name == ".git"), None)
            if main is not None:
                candidates.append(main.parent / "shared" / "peers")
    return next((c for c in candidates if c.is_dir()), candidates[0])


def load_learn2learn_maml(peers: Path | None) -> type:
    """learn2learn 0.2.0's ``MAML`` class, loaded by ``peers/load_learn2learn_maml.py``.

    Raises:
        Unavailable: no loader in ``peers``.
    """
    if peers is None or not (Path(peers) / "load_learn2learn_maml.py").is_file():
        raise Unavailable(f"no load_learn2learn_maml.py in {peers} (give --peers DIR or set MAMLAB_PEERS)")
    if str(peers) not in sys.path:
        sys.path.insert(0, str(peers))
    from load_learn2learn_maml import learn2learn_maml

    return learn2learn_maml()


def _loop(s: Setup) -> Step:
    return lambda: loop_step(s.model, s.batch, s.lr, s.loss_fn, s.steps)


def _mamlab(execution: str) -> Callable[[Setup], Step]:
    def build(s: Setup) -> Step:
        maml = MAML(s.model, s.loss_fn, s.lr, inner_steps=s.steps, execution=execution)
        return lambda: maml.meta_loss(s.batch).backward()

    return build


def _mamlab_graph(execution: str) -> Callable[[Setup], Step]:
    """MAML on ``execution``, its meta-gradient replayed from a CUDA graph (``GraphedMetaGradient``)."""
    def build(s: Setup) -> Step:
        if s.batch.support_x.device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        graphed = GraphedMetaGradient(MAML(s.model, s.loss_fn, s.lr, inner_steps=s.steps, execution=execution))
        return lambda: graphed(s.batch)  # sets .grad (the measured loop zeroes it before every step)

    return build


def _within(builder: Callable[[Setup], Step],
            scope: Callable[[Setup], contextlib.AbstractContextManager]) -> Callable[[Setup], Step]:
    """``builder``'s implementation with each step run inside ``scope(setup)``: a setting changed for
    the step only, so other callers in this process keep theirs."""
    def build(s: Setup) -> Step:
        plain = builder(s)

        def step() -> None:
            with scope(s):
                plain()

        return step

    return build


@contextlib.contextmanager
def _nchw(s: Setup) -> Iterator[None]:
    """The conv path's maps in NCHW instead of channels-last (``mamlab.core.conv.LAYOUTS``)."""
    from mamlab.core import conv

    device = s.batch.support_x.device.type
    old = conv.LAYOUTS[device]
    conv.LAYOUTS[device] = torch.contiguous_format
    try:
        yield
    finally:
        conv.LAYOUTS[device] = old


@contextlib.contextmanager
def _cudnn_benchmark(s: Setup) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` on: cuDNN times its convolution algorithms for each new
    shape and keeps the fastest (no effect off CUDA)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def _anil(s: Setup) -> Step:
    anil = ANIL(s.model, s.loss_fn, s.lr, inner_steps=s.steps)
    return lambda: anil.meta_loss(s.batch).backward()


def _learn2learn(s: Setup) -> Step:
    learner = load_learn2learn_maml(s.peers)(s.model, lr=s.lr, first_order=False)
    b, t = s.batch, s.batch.num_tasks

    def step() -> None:
        for i in range(t):
            clone = learner.clone()
            for _ in range(s.steps):
                clone.adapt(s.loss_fn(clone(b.support_x[i]), b.support_y[i]))
            (s.loss_fn(clone(b.query_x[i]), b.query_y[i]) / t).backward()

    return step


def _higher(s: Setup) -> Step:
    import higher

    inner = torch.optim.SGD(s.model.parameters(), lr=s.lr)
    b, t = s.batch, s.batch.num_tasks

    def step() -> None:
        for i in range(t):
            with higher.innerloop_ctx(s.model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(s.steps):
                    diffopt.step(s.loss_fn(fmodel(b.support_x[i]), b.support_y[i]))
                (s.loss_fn(fmodel(b.query_x[i]), b.query_y[i]) / t).backward()

    return step


def _torchopt(s: Setup) -> Step:
    import torchopt

    inner = torchopt.MetaSGD(s.model, lr=s.lr)
    b, t = s.batch, s.batch.num_tasks

    def step() -> None:
        net_state = torchopt.extract_state_dict(s.model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner, by="reference")
        for i in range(t):
            for _ in range(s.steps):
                inner.step(s.loss_fn(s.model(b.support_x[i]), b.support_y[i]))
            (s.loss_fn(s.model(b.query_x[i]), b.query_y[i]) / t).backward()
            torchopt.recover_state_dict(s.model, net_state)
            torchopt.recover_state_dict(inner, opt_state)

    return step


#: name → builder: ``builder(setup)`` prepares and returns ``step()``, which adds the meta-gradient
#: of (1/T) Σ_i L_query(θ'_i) to ``setup.model``'s ``.grad``. One entry adds an implementation.
IMPLEMENTATIONS: dict[str, Callable[[Setup], Step]] = {
    "loop": _loop,
    "mamlab": _mamlab("auto"),
    "mamlab:batched": _mamlab("batched"),
    "mamlab:vmap": _mamlab("vmap"),
    "mamlab:loop": _mamlab("loop"),
    "mamlab:conv": _mamlab("conv"),
    "mamlab:conv-nchw": _within(_mamlab("conv"), _nchw),
    "mamlab:graph": _mamlab_graph("auto"),
    "mamlab:graph:conv": _mamlab_graph("conv"),
    "mamlab:conv:cudnn-benchmark": _within(_mamlab("conv"), _cudnn_benchmark),
    "mamlab:graph:conv:cudnn-benchmark": _within(_mamlab_graph("conv"), _cudnn_benchmark),
    "anil": _anil,
    "learn2learn": _learn2learn,
    "higher": _higher,
    "torchopt": _torchopt,
}

#: Implementations that compute a different meta-gradient on purpose (left out of ``--check``).
NOT_MAML: dict[str, str] = {"anil": "ANIL adapts only the head: a different meta-gradient by design"}

PEERS = ("learn2learn", "higher", "torchopt")


def default_impls(case: str, device: str) -> list[str]:
    """The implementations a comparison runs for ``case`` on ``device`` by default."""
    graph = ["mamlab:graph"] if device == "cuda" else []
    if case == "sinusoid":
        mamlab = ["mamlab", *graph, "mamlab:vmap", "mamlab:loop", "anil"]
    else:
        mamlab = ["mamlab", *graph, *[f"{g}:conv" for g in graph], "mamlab:conv", "mamlab:loop", "mamlab:vmap",
                  "anil"]
        if case == "omniglot20":
            mamlab = [m for m in mamlab if m != "anil"]
    return ["loop", *mamlab, *PEERS]


def meta_gradient(impl: str, case: str, device: torch.device | str = "cpu",
                  peers: Path | None = None) -> list[torch.Tensor]:
    """One meta-gradient of ``impl`` on the tiny float64 ``case`` (fresh model, same weights every call)."""
    s = make_tiny(case, device)
    s.peers = peers
    step = IMPLEMENTATIONS[impl](s)
    step()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in s.model.parameters()]


def relative_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max |got − want| over all entries, divided by max |want| (the whole gradient's scale)."""
    diff = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
    scale = max(w.abs().max().item() for w in want)
    return diff / scale


def check(impls: list[str], device: str = "cpu", peers: Path | None = None) -> dict[str, dict[str, object]]:
    """Each implementation's float64 meta-gradient against ``loop_step``'s on every tiny case.

    Returns:
        ``{case: {impl: relative difference | "skipped: why"}}``.
    """
    out: dict[str, dict[str, object]] = {}
    for case in TINY_CASES:
        want = meta_gradient("loop", case, device)
        rows: dict[str, object] = {}
        for impl in impls:
            if impl == "loop":
                continue
            if impl in NOT_MAML:
                rows[impl] = f"skipped: {NOT_MAML[impl]}"
                continue
            try:
                rows[impl] = relative_difference(meta_gradient(impl, case, device, peers), want)
            except (Unavailable, MamlabError) as e:
                rows[impl] = f"skipped: {e}"
            except ImportError as e:
                rows[impl] = f"skipped: not importable ({e.name})"
        out[case] = rows
    return out


@dataclass
class Job:
    """One measurement: a case (with its meta-batch and inner steps) and an implementation on a device."""

    case: str
    impl: str
    device: str = "cpu"
    tasks: int | None = None
    steps: int | None = None
    iters: int | None = None
    warmup: int | None = None
    threads: int | None = None
    peers: str | None = None
    profile: int = 0


def rss_bytes() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


#: Operations that only make tensor metadata (views, empty tensors): left out of the CPU op count.
_NO_WORK = frozenset(f"aten::{n}" for n in (
    "view", "as_strided", "resolve_conj", "resolve_neg", "empty", "empty_strided", "empty_like", "detach",
    "alias", "_reshape_alias", "expand", "t", "transpose", "unsqueeze", "squeeze", "permute", "select", "slice",
    "lift_fresh", "_unsafe_view", "unflatten", "split", "unbind", "chunk", "narrow", "to", "contiguous",
    "broadcast_tensors"))

#: Meta-iterations run under the profiler for each implementation ``--profile`` names.
PROFILE_ITERS = 3


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds covered by the union of ``(start, end)`` intervals (kernels on two streams may overlap)."""
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


def profile(iteration: Step, iters: int, device: torch.device, top: int = 5) -> dict[str, object]:
    """Run ``iteration`` ``iters`` times under ``torch.profiler``: what one meta-iteration launches.

    On CUDA: device operations (kernels, copies, fills) per iteration, the device's busy time per
    iteration (the union of their intervals) and the ``top`` kernels by device time. Busy time far
    below the timed iteration means the step is launch-bound (what a CUDA graph removes). On the
    CPU: aten operations per iteration that do work (leaf operations, views and empty tensors left
    out) and the ``top`` by self CPU time.

    Returns:
        ``{"kind", "ops_per_it", "busy_s", "top": [[name, seconds per it, calls per it], ...]}``
        (``busy_s`` None on the CPU).
    """
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            iteration()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    if cuda:
        work = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        if not work:
            raise RuntimeError("the profiler recorded no device operation (is CUPTI available?)")
        timed = [(e.name, e.time_range.elapsed_us() / 1e6) for e in work]
        busy: float | None = _busy_us([(e.time_range.start, e.time_range.end) for e in work]) / 1e6 / iters
        kind = "device operations (kernels, copies, fills)"
    else:
        timed = [(e.name, e.self_cpu_time_total / 1e6) for e in events
                 if e.device_type == torch.autograd.DeviceType.CPU and not e.cpu_children
                 and e.name.startswith("aten::") and e.name not in _NO_WORK]
        busy, kind = None, "aten operations that do work (leaf operations, views and empty tensors left out)"
    totals: dict[str, list[float]] = {}
    for name, seconds in timed:
        t = totals.setdefault(name, [0.0, 0.0])
        t[0] += seconds / iters
        t[1] += 1 / iters
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {"kind": kind, "ops_per_it": len(timed) / iters, "busy_s": busy, "iters": iters,
            "top": [[name, t, n] for name, (t, n) in ranked]}


def measure(job: Job) -> dict[str, object]:
    """Time ``job`` in this process: median meta-iterations per second and peak memory.

    With ``job.profile`` > 0, that many more iterations then run under ``profile`` (after the
    timing and the peak memory are read, so the profiler changes neither).

    Returns:
        ``{"it_s", "median_s", "times_s", "peak_bytes", "memory"}`` (and ``"profile"``), or
        ``{"skipped": why}`` (with ``"oom": True`` when it ran out of memory).
    """
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    case = CASES[job.case]
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    try:
        model, batch, lr, loss_fn = make(job.case, job.tasks, device)
        steps = case.steps if job.steps is None else job.steps
        setup = Setup(model, batch, lr, loss_fn, steps, Path(job.peers) if job.peers else None)
        step = IMPLEMENTATIONS[job.impl](setup)
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def iteration() -> None:
            opt.zero_grad()
            step()
            opt.step()

        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        else:
            rss_before = rss_bytes()
        warmup = case.warmup[device.type] if job.warmup is None else job.warmup
        iters = case.iters[device.type] if job.iters is None else job.iters
        for _ in range(warmup):
            iteration()
        sync()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            iteration()
            sync()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            memory = f"torch.cuda.max_memory_allocated (model and batch: {resident} bytes)"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
            memory = "growth of the maximum RSS over the RSS before the first meta-iteration"
        result = {"it_s": 1 / median, "median_s": median, "times_s": times, "peak_bytes": peak,
                  "memory": memory, "tasks": batch.num_tasks, "steps": steps, "warmup": warmup}
        if job.profile:
            try:
                result["profile"] = profile(iteration, job.profile, device)
            except Exception as e:  # the timing stands without it
                result["profile"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:160]}
        return result
    except (Unavailable, MamlabError) as e:
        return {"skipped": str(e)}
    except ImportError as e:
        return {"skipped": f"not importable ({e.name})"}
    except Exception as e:  # report, don't crash the whole benchmark
        if is_out_of_memory(e):
            return {"skipped": "out of memory", "oom": True}
        return {"skipped": f"{type(e).__name__}: {e}".splitlines()[0][:160]}


def _child(job: Job, queue: mp.Queue) -> None:
    queue.put(measure(job))


def run(job: Job) -> dict[str, object]:
    """``measure(job)`` in a spawned subprocess (its peak memory is its own); a killed process is reported."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(job, q))
    p.start()
    while True:
        try:
            result = q.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not p.is_alive():
                try:
                    result = q.get(timeout=1.0)
                except queue_module.Empty:
                    killed = p.exitcode is not None and p.exitcode < 0
                    why = "killed (likely out of memory)" if killed else "exited without a result"
                    result = {"skipped": f"process {why}, exit code {p.exitcode}", "oom": killed}
                break
    p.join()
    return result


def _memory(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= 2**30:
        return f"{sign}{n / 2**30:.2f} GB"
    return f"{sign}{n / 2**20:.0f} MB" if n >= 100 * 2**20 else f"{sign}{n / 2**20:.1f} MB"


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "-"


def compare(case: str, impls: list[str], base: Job, repeat: int, profiled: Sequence[str] = (),
            rows: dict[str, dict[str, object]] | None = None,
            done: Callable[[], None] = lambda: None) -> dict[str, dict[str, object]]:
    """Run every implementation of ``case`` (best median of ``repeat`` runs) and print the table;
    the implementations in ``profiled`` are also profiled (``profile``) and get a second table.

    Each result goes into ``rows`` (returned; a new dict by default) as it comes, and ``done()`` is
    called after each, so a run cut short keeps what it measured (``main`` writes its JSON then).
    """
    rows = {} if rows is None else rows
    for impl in impls:
        job = Job(**{**asdict(base), "case": case, "impl": impl,
                     "profile": PROFILE_ITERS if impl in profiled else 0})
        results = [run(job) for _ in range(repeat)]
        ok = [r for r in results if "it_s" in r]
        rows[impl] = max(ok, key=lambda r: r["it_s"]) if ok else results[0]
        r = rows[impl]  # as it comes, so a run cut short still leaves its numbers in the output
        print(f"  ({impl}: " + (f"{r['it_s']:.3f} it/s, peak {_memory(r['peak_bytes'])})" if "it_s" in r
                                 else f"skipped: {r['skipped']})"), flush=True)
        done()
    refs = {name: rows.get(name) for name in ("loop", "learn2learn")}
    refs = {k: (v if v and "it_s" in v else None) for k, v in refs.items()}
    print(f"  {'implementation':<19}{'it/s':>10}{'x loop':>8}{'x l2l':>8}   {'peak memory':>11}"
          f"{'x loop':>8}{'x l2l':>8}")
    for impl, r in rows.items():
        if "it_s" not in r:
            print(f"  {impl:<19}skipped: {r['skipped']}")
            continue
        loop, l2l = refs["loop"], refs["learn2learn"]
        print(f"  {impl:<19}{r['it_s']:>10.2f}{_ratio(r['it_s'], loop and loop['it_s']):>8}"
              f"{_ratio(r['it_s'], l2l and l2l['it_s']):>8}   {_memory(r['peak_bytes']):>11}"
              f"{_ratio(r['peak_bytes'], loop and loop['peak_bytes']):>8}"
              f"{_ratio(r['peak_bytes'], l2l and l2l['peak_bytes']):>8}")
    _print_profiles(rows)
    return rows


def _print_profiles(rows: dict[str, dict[str, object]]) -> None:
    """The profiled rows' operations per iteration, busy time and top operations."""
    profiled = {impl: r["profile"] for impl, r in rows.items() if "profile" in r}
    if not profiled:
        return
    kind = next((p["kind"] for p in profiled.values() if "kind" in p), "")
    print(f"  profile, {PROFILE_ITERS} meta-iterations under torch.profiler; per iteration: {kind}")
    for impl, p in profiled.items():
        if "error" in p:
            print(f"  {impl:<19}profile failed: {p['error']}")
            continue
        busy = ""
        if p["busy_s"] is not None:
            share = p["busy_s"] / rows[impl]["median_s"]
            busy = f", device busy {p['busy_s'] * 1e3:.3f} ms = {share:.0%} of the timed iteration"
        print(f"  {impl:<19}{p['ops_per_it']:.0f} operations{busy}")
        for name, t, n in p["top"]:
            print(f"  {'':<21}{t * 1e3:9.3f} ms {n:7.0f}x  {name[:90]}")


def scale(sizes: list[int], impls: list[str], base: Job, out: dict[str, dict[int, dict[str, object]]] | None = None,
          done: Callable[[], None] = lambda: None) -> dict[str, dict[int, dict[str, object]]]:
    """Conv4 5-way 1-shot at each meta-batch size: tasks per second and peak memory (one process each),
    into ``out`` (returned) as they come, calling ``done()`` after each."""
    out = {} if out is None else out
    for impl in impls:
        print(f"  {impl}")
        out[impl] = {}
        for size in sizes:
            job = Job(**{**asdict(base), "case": "conv4", "impl": impl, "tasks": size})
            r = run(job)
            if "it_s" in r:
                r["tasks_s"] = size * r["it_s"]
                print(f"    {size:>6} tasks: {r['tasks_s']:>10.1f} tasks/s  {r['it_s']:>8.3f} it/s  "
                      f"peak {_memory(r['peak_bytes'])}")
            else:
                print(f"    {size:>6} tasks: {'out of memory' if r.get('oom') else 'skipped: ' + r['skipped']}")
            out[impl][size] = r
            done()
    return out


def _fail(message: str) -> int:
    print(f"speed.py: error: {message}", file=sys.stderr)
    return 2


def _sizes(text: str) -> list[int] | None:
    """``"32,128"`` → ``[32, 128]``; None unless every entry is a positive integer."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        return None
    return sizes if sizes and min(sizes) >= 1 else None


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--impls", default=None,
                        help="comma-separated implementations (loop and learn2learn are always added to a "
                             f"comparison; --scale default: mamlab); known: {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--tasks", type=int, default=None, help="meta-batch (default: the case's)")
    parser.add_argument("--steps", type=int, default=None, help="inner steps (default: the case's)")
    parser.add_argument("--iters", type=int, default=None, help="timed meta-iterations (default: the case's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations")
    parser.add_argument("--repeat", type=int, default=1, help="repeat each measurement, keep the best median")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every implementation (default: torch's choice)")
    parser.add_argument("--peers", type=Path, default=None,
                        help="the peers folder (default: $MAMLAB_PEERS, else <repo>/../shared/peers)")
    parser.add_argument("--scale", default=None, metavar="T1,T2,...",
                        help="Conv4 5-way 1-shot tasks/s and peak memory at these meta-batch sizes")
    parser.add_argument("--check", action="store_true",
                        help="compare every implementation's float64 meta-gradient with the loop's (tiny cases)")
    parser.add_argument("--profile", nargs="?", const="all", default=None, metavar="IMPLS",
                        help=f"also run {PROFILE_ITERS} meta-iterations of these implementations (default: all "
                             "compared) under torch.profiler: operations per iteration, the device's busy "
                             "time (CUDA) and the top operations")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write all results to FILE")
    args = parser.parse_args(argv)

    for name in ("tasks", "steps", "iters", "repeat", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _fail(f"--{name} must be a positive integer, got {value}")
    if args.warmup is not None and args.warmup < 0:
        return _fail(f"--warmup must be 0 or more, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device cuda: CUDA is not available (torch {torch.__version__}); use --device cpu")
    impls = None if args.impls is None else [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls or [] if i not in IMPLEMENTATIONS]
    if unknown:
        return _fail(f"unknown implementation {unknown[0]!r}; known: {', '.join(IMPLEMENTATIONS)}")
    profiled = [] if args.profile in (None, "all") else [i.strip() for i in args.profile.split(",") if i.strip()]
    unknown = [i for i in profiled if i not in IMPLEMENTATIONS]
    if unknown:
        return _fail(f"--profile: unknown implementation {unknown[0]!r}; known: {', '.join(IMPLEMENTATIONS)}")
    compared = None if impls is None else ["loop", "learn2learn", *impls]
    missing = [i for i in profiled if compared is not None and i not in compared]
    if missing:
        return _fail(f"--profile names {missing[0]!r}, which --impls does not compare")
    if args.profile is not None and (args.check or args.scale is not None):
        return _fail("--profile goes with a comparison of implementations, not with --check or --scale")
    if args.scale is not None:
        sizes = _sizes(args.scale)
        if sizes is None:
            return _fail(f"--scale wants comma-separated positive integers (meta-batch sizes), got {args.scale!r}")
        args.scale = sizes
    if args.scale and any(not i.startswith("mamlab") for i in impls or []):
        bad = next(i for i in impls if not i.startswith("mamlab"))
        return _fail(f"--scale times mamlab implementations only, got {bad!r}; "
                     f"allowed: {', '.join(i for i in IMPLEMENTATIONS if i.startswith('mamlab'))}")
    peers = args.peers if args.peers is not None else default_peers()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {args.device} ({name}), {threads} thread(s) per implementation, "
          f"peers {peers}")
    report: dict[str, object] = {"torch": torch.__version__, "device": args.device, "device_name": name,
                                 "threads": threads, "peers": str(peers), "argv": sys.argv[1:] if argv is None
                                 else argv}
    def save() -> None:  # after every result, so a run cut short leaves what it measured
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")

    base = Job(case="", impl="", device=args.device, tasks=args.tasks, steps=args.steps, iters=args.iters,
               warmup=args.warmup, threads=args.threads, peers=str(peers))

    if args.check:
        chosen = impls or [i for i in IMPLEMENTATIONS if i != "loop"]
        print("float64 meta-gradients against loop_step's, max |g - loop| / max |loop| "
              "(tiny cases, 2 inner steps, 2nd order)")
        results = check(chosen, args.device, peers)
        for case, rows in results.items():
            print(f"  {case}")
            for impl, r in rows.items():
                print(f"    {impl:<19}{r:.2e}" if isinstance(r, float) else f"    {impl:<19}{r}")
        report["check"] = results
    elif args.scale:
        chosen = impls or ["mamlab"]
        print(f"\nscale: Conv4+BN 28x28, 5-way 1-shot, 15 query, {args.steps or 1} step(s), 2nd order")
        scale(args.scale, chosen, base, report.setdefault("scale", {}), save)
    else:
        report["cases"] = {}
        for case in list(CASES) if args.case == "all" else [args.case]:
            c = CASES[case]
            tasks = args.tasks or c.tasks
            steps = args.steps or c.steps
            iters = args.iters or c.iters[args.device]
            warmup = c.warmup[args.device] if args.warmup is None else args.warmup
            print(f"\n{case}: {c.desc}, {tasks} tasks, {steps} inner step(s); median of {iters} timed "
                  f"meta-iterations after {warmup} warm-up")
            chosen = default_impls(case, args.device) if impls is None else impls
            chosen = ["loop", "learn2learn", *[i for i in chosen if i not in ("loop", "learn2learn")]]
            entry = {"desc": c.desc, "tasks": tasks, "steps": steps, "iters": iters, "warmup": warmup,
                     "results": {}}
            report["cases"][case] = entry
            compare(case, chosen, base, args.repeat,
                    chosen if args.profile == "all" else [i for i in profiled if i in chosen], entry["results"], save)
    save()
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
