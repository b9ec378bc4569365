"""Meta-iterations per second of ``mamlab train`` on 1 process against 2 (torchrun, gloo) on the CPU.

Each configuration is a real ``mamlab train`` run in its own subprocess (2 processes through
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m mamlab train``), set far
longer than measured. The clock starts once a few warm-up iterations are logged and counts the
lines rank 0 appends (and flushes) to ``metrics.jsonl``, one per meta-iteration, over
``--window`` seconds; then the run is stopped with SIGTERM. So start-up, data loading,
validation and checkpoints are outside the measurement (the whole-run rate mamlab prints,
``trained N iterations in S s (X it/s ...)``, includes the warm-up and the last validation).
Configurations run round-robin, ``--repeat`` times, and the best of each is kept (the machine may
be shared). Ratios are against the 1-process, 1-thread run of the same invocation. Every process
of the 2-process runs uses one torch thread (``--threads 1``, ``OMP_NUM_THREADS=1``). Last, a
probe times the gloo all-reduce alone, for a buffer of each case's meta-gradient (plus the loss
and stop flag mamlab sends with it). The cases:

* ``sinusoid``: MLP 1-40-40-1 (1,761 parameters), meta-batch 25, K=10 support and 10 query points,
  1 inner step, second order;
* ``conv4``: Omniglot (the minimal split, the real images of ``--data``), 5-way 1-shot, 1 query
  drawing per class, Conv4 with 32 filters (28,485 parameters), meta-batch 8, 1 inner step of
  0.4, second order (full MAML).

What to expect on a 2-core machine. Each process pays, every iteration, for (a) sampling the
FULL meta-batch (every rank draws the same tasks so the stream does not depend on the number of
processes), (b) the forward and backward of its share of the tasks, (c) one gloo all-reduce of
the meta-gradient over loopback TCP, whose cost is mostly latency (thread wake-ups, two TCP
round trips; about 1-2 ms here whatever the size up to ~100 kB), and waiting for the slower rank
(the 25 tasks split 13/12; rank 0 also logs), and (d) the Adam step. Only (b) is halved.

* The sinusoid step is tiny: about 3 ms for all 25 tasks on one core. Halving (b) saves ~1.5 ms and
  (c) alone costs about as much or more, so 2 processes run at roughly half to two thirds the
  speed of one: communication dominates. Two threads in one process do not help either (the
  matrices are too small for intra-op parallelism; when another job holds the other core they
  are catastrophically slower, as the threads wait on each other).
* Conv4 is compute bound: about 130 ms per iteration on one core, against ~2 ms of all-reduce,
  so splitting the 8 tasks 4/4 across 2 processes on 2 cores approaches 2x (measured ~1.8x),
  while one process with 2 threads gains little (1.1-1.2x): the convolutions of 1-shot tasks on 28x28
  images are too small to parallelize well inside one operator.

Both depend on the other core being free: another job on a core hurts 2 processes most, since
each iteration waits for the slower rank. Usage::

    python benchmarks/processes.py                     # both cases, best of 2, ~3 minutes
    python benchmarks/processes.py --case sinusoid --repeat 3
    python benchmarks/processes.py --data /path/to/omniglot --window 15
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "omniglot"

# (label, processes, torch threads per process)
SETUPS = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]
# iterations skipped before the clock starts (graph set-up, allocator warm-up), and the least counted
WARMUP = {"sinusoid": 20, "conv4": 1}
MIN_COUNTED = {"sinusoid": 50, "conv4": 2}


def case_args(case: str, data: Path) -> list[str]:
    """The ``mamlab train`` arguments of a case: a run far longer than measured, no validation in it."""
    common = ["--iterations", "1000000", "--val-every", "1000000", "--checkpoint-every", "1000000",
              "--seed", "0", "--no-progress"]
    if case == "sinusoid":
        return ["sinusoid", "--meta-batch", "25", "--shots", "10", "--queries", "10", "--hidden", "40,40",
                "--inner-steps", "1", "--no-first-order", "--val-tasks", "25", *common]
    return ["omniglot", "--data", str(data), "--split", "minimal", "--ways", "5", "--shots", "1",
            "--queries", "1", "--filters", "32", "--meta-batch", "8", "--inner-steps", "1", "--inner-lr", "0.4",
            "--no-first-order", "--val-tasks", "8", *common]


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (torchrun's workers, each in a session of its own), from /proc."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the run (mamlab checkpoints and exits; torchrun passes it on), SIGKILL what remains."""
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def measure(case: str, argv: list[str], processes: int, threads: int, run_dir: Path, window: float,
            timeout: float) -> tuple[float, int]:
    """Meta-iterations per second of one run: lines of metrics.jsonl (one per iteration, flushed) over
    ``window`` seconds, once ``WARMUP[case]`` iterations are done, and at least ``MIN_COUNTED[case]``.

    Returns the rate and the iterations counted.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = [sys.executable, "-m", "mamlab"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        "-m", "mamlab"]
    cmd = [*launcher, "train", *argv, "--threads", str(threads), "--out", str(run_dir)]
    metrics = run_dir / "metrics.jsonl"
    log = open(run_dir.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.perf_counter() + timeout
    try:
        def wait_for(n: int) -> tuple[float, int]:
            while True:
                count = _lines(metrics)
                if count >= n:
                    return time.perf_counter(), count
                if proc.poll() is not None:
                    log.flush()
                    raise SystemExit(f"failed: {' '.join(cmd)}\n"
                                     f"{run_dir.with_suffix('.log').read_text()[-3000:]}")
                if time.perf_counter() > deadline:
                    raise SystemExit(f"timed out after {timeout:.0f} s: {' '.join(cmd)}")
                time.sleep(0.02)

        t1, n1 = wait_for(WARMUP[case])
        time.sleep(window)
        t2, n2 = wait_for(n1 + MIN_COUNTED[case])
    finally:
        _stop(proc)
        log.close()
    return (n2 - n1) / (t2 - t1), n2 - n1


def probe_allreduce(sizes: list[int], repeat: int = 300) -> None:
    """Run under torchrun (``--probe-allreduce``): print the mean time of one gloo all-reduce per size."""
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    for n in sizes:
        buffer = torch.randn(n)
        for _ in range(20):
            tdist.all_reduce(buffer)
        tdist.barrier()
        t0 = time.perf_counter()
        for _ in range(repeat):
            tdist.all_reduce(buffer)
        if tdist.get_rank() == 0:
            print(f"allreduce {n} {(time.perf_counter() - t0) / repeat * 1e6:.0f}", flush=True)
    tdist.destroy_process_group()


def allreduce_latency(sizes: list[int], timeout: float) -> dict[int, float]:
    """Microseconds per all-reduce of each float32 buffer size between 2 processes (gloo, loopback)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--probe-allreduce", ",".join(map(str, sizes))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    found = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("allreduce "))
    if proc.returncode != 0 or len(found) != len(sizes):
        raise SystemExit(f"the all-reduce probe failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {int(k): float(v) for k, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["sinusoid", "conv4", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each configuration (best kept)")
    parser.add_argument("--window", type=float, default=8.0, help="seconds counted per run")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Omniglot folder or zips")
    parser.add_argument("--timeout", type=float, default=180, help="seconds allowed per run")
    parser.add_argument("--probe-allreduce", metavar="SIZES", help=argparse.SUPPRESS)  # internal, under torchrun
    args = parser.parse_args()
    if args.probe_allreduce:
        probe_allreduce([int(n) for n in args.probe_allreduce.split(",")])
        return

    cases = ["sinusoid", "conv4"] if args.case == "all" else [args.case]
    if "conv4" in cases and not args.data.exists():
        print(f"conv4 skipped: no Omniglot data at {args.data} (give --data)")
        cases.remove("conv4")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, load average {load:.2f} at start; best of {args.repeat} runs, "
          f"{args.window:.0f} s counted each")
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mamlab-processes-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("MAMLAB_CACHE_DIR", str(work / "cache"))  # Omniglot's preprocessed images
        for case in cases:
            argv = case_args(case, args.data)
            if case == "conv4":  # build the image cache once, outside the measurements
                measure(case, argv, 1, 1, work / "conv4-warm", 0.0, args.timeout)
            best: dict[str, tuple[float, int]] = {}
            for r in range(args.repeat):  # round-robin, so a burst of load hits every setup alike
                for label, processes, threads in SETUPS:
                    rate, counted = measure(case, argv, processes, threads,
                                            work / f"{case}-{processes}p{threads}t-{r}", args.window, args.timeout)
                    if rate > best.get(label, (0.0, 0))[0]:
                        best[label] = (rate, counted)
            base = best[SETUPS[0][0]][0]
            for label, _, _ in SETUPS:
                rate, counted = best[label]
                rows.append((case, label, rate, rate / base, counted))
    # the meta-gradient all-reduce alone: the parameters (sinusoid MLP, Conv4 32 filters 5-way) + 2 extras
    sizes = {"sinusoid": 1761 + 2, "conv4": 28485 + 2}
    latency = allreduce_latency([sizes[c] for c in cases], args.timeout)
    print()
    print(f"{'case':<9} {'setup':<24} {'it/s':>8} {'vs 1p x 1t':>10} {'counted':>8}")
    for case, label, rate, ratio, counted in rows:
        print(f"{case:<9} {label:<24} {rate:>8.2f} {ratio:>9.2f}x {counted:>8}")
    for case in cases:
        rate = next(r[2] for r in rows if r[0] == case)
        print(f"{case}: one gloo all-reduce of {sizes[case]} floats between 2 processes takes "
              f"{latency[sizes[case]] / 1000:.2f} ms; one 1-process iteration {1000 / rate:.2f} ms")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n(load average {load:.2f} at the end; {time.perf_counter() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
