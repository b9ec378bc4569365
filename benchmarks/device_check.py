"""One prepared run of every check that needs a GPU: gradients, devices, resume across devices, speed.

Run on a machine with a CUDA GPU (never in CI); each step is timed, failures are recorded and the
next step still runs, and everything lands in ``--out`` (``device_check.json`` and the logs):

1. float64 meta-gradients on CUDA against the CPU (MAML, first-order MAML, ANIL; the sinusoid MLP
   on the batched path and a small conv + BatchNorm net on the vmap and loop paths): max relative
   difference, the target is 1e-10;
2. CUDA graphs (``mamlab.core.graphs``): float64 meta-gradients of replays against eager calls for
   every algorithm (MAML++ recaptured at each new epoch); ``benchmarks/speed.py --device cuda``
   times them (``mamlab:graph``);
3. seconds per meta-iteration of ``mamlab train omniglot`` 20-way 1-shot, 5 inner steps,
   meta-batch 16 (Finn et al.'s setting), when Omniglot data is given (the closing line's average
   and the median from ``metrics.jsonl``): second order (on CUDA also on the conv path, with
   ``--cuda-graph``, and both), then first order, and ``mamlab eval --omniglot-runs``; the results
   are saved after each run;
4. ``mamlab train`` on the GPU, resumed on the CPU (and the other way round), then evaluated; the
   GPU run again with ``--cuda-graph``, compared with the eager one;
5. ``mamlab analyze`` on the GPU;
6. the relative error of the meta-gradient under fp32, tf32 and bf16 (``benchmarks/precision.py``).

The order puts the "Speed near the hardware" issue's checks first; ``device_check.json`` is
rewritten after every step, so a run cut off by a time limit keeps what it finished.

Usage (``--data``: a folder holding images_background_small1/2.zip and all_runs.zip)::

    python benchmarks/device_check.py --out /tmp/check --data ../shared/data/omniglot
    python benchmarks/device_check.py --out /tmp/check --device cpu --quick   # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mamlab import TaskBatch, build_algorithm
from mamlab.models import MLP, Conv4
from mamlab.tasks import Sinusoid

ROOT = Path(__file__).resolve().parents[1]


class ConvBN(nn.Module):
    """A small conv net with batch-statistics BatchNorm (like Conv4, smaller)."""

    def __init__(self, ways: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8 * 7 * 7, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def _images(tasks: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.bernoulli(torch.full((tasks, n, 1, 28, 28), 0.2, dtype=torch.float64), generator=generator)


def gradients(device: torch.device) -> dict:
    """Max relative difference of float64 meta-gradients on ``device`` against the CPU."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    sinus = Sinusoid().sample(8, 5, 5, gen).to(dtype=torch.float64)
    labels = torch.arange(5).repeat(4, 1)
    conv = TaskBatch(_images(4, 5, gen), labels, _images(4, 5, gen), labels)
    cases = [("mlp", lambda: MLP(1, 1, hidden=(40, 40)), F.mse_loss, sinus, ["auto", "vmap", "loop"], 0.01),
             ("convbn", ConvBN, F.cross_entropy, conv, ["auto", "vmap", "loop"], 0.1)]
    for name, make, loss, batch, paths, lr in cases:
        torch.manual_seed(1)
        base = make().double()
        for algo in ("maml", "fomaml", "anil"):
            for path in paths:
                grads = {}
                for dev in ("cpu", device):
                    model = copy.deepcopy(base).to(dev)
                    a = build_algorithm(algo, model, loss, {"inner_lr": lr, "inner_steps": 3}, execution=path)
                    a.meta_loss(batch.to(device=dev)).backward()
                    grads[str(dev)] = torch.cat([p.grad.flatten().cpu() for p in a.parameters()])
                    used = a.resolved_execution(dev)
                ref, got = grads["cpu"], grads[str(device)]
                rel = float((got - ref).norm() / ref.norm())
                out[f"{name}/{algo}/{path}({used} on {device})"] = rel
    return out


def cuda_graphs(device: torch.device) -> dict:
    """``GraphedMetaGradient`` on ``device``: float64 meta-gradients of replays against eager calls,
    and the recaptures when the rule changes."""
    from mamlab.core.graphs import GraphedMetaGradient

    out: dict = {"float64_max_relative": {}, "captures": {}}
    gen = torch.Generator().manual_seed(0)
    sinus = [Sinusoid().sample(25, 10, 10, gen).to(device=device, dtype=torch.float64) for _ in range(3)]
    labels = torch.arange(5).repeat(4, 1)
    images = [TaskBatch(_images(4, 5, gen), labels, _images(4, 5, gen), labels).to(device=device)
              for _ in range(3)]
    cases = [(algo, "mlp", lambda: MLP(1, 1, hidden=(40, 40)), F.mse_loss, sinus, 0.01, "auto")
             for algo in ("maml", "fomaml", "anil", "mamlpp", "metasgd", "imaml", "reptile", "pretrain")]
    cases += [(algo, "convbn", ConvBN, F.cross_entropy, images, 0.1, "auto") for algo in ("maml", "mamlpp")]
    cases += [(algo, "conv4", lambda: Conv4(5, hidden=8), F.cross_entropy, images, 0.1, "conv")
              for algo in ("maml", "anil")]  # the conv path: the tasks as grouped convolutions
    def one_case(algo, make, loss, batches, lr, execution) -> tuple[float, int, str]:
        torch.manual_seed(1)
        models = [make().double().to(device) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        eager, graphed_alg = (build_algorithm(algo, m, loss, {"inner_lr": lr, "inner_steps": 2},
                                              execution=execution) for m in models)
        for a in (eager, graphed_alg):
            if algo == "mamlpp":
                a.iterations_per_epoch = 2  # a new epoch (new loss weights: a recapture) every 2 calls
        graphed = GraphedMetaGradient(graphed_alg)
        worst = 0.0
        for it, batch in enumerate(batches * 2, start=1):
            for a in (eager, graphed_alg):
                a.start_iteration(it, 10**6)
            eager.zero_grad(set_to_none=True)
            eager.meta_loss(batch).backward()
            graphed(batch)
            ref = torch.cat([p.grad.flatten() for p in eager.meta_parameters()])
            got = torch.cat([p.grad.flatten() for p in graphed_alg.meta_parameters()])
            worst = max(worst, float((got - ref).norm() / ref.norm()))
        return worst, graphed.captures, graphed_alg.resolved_execution()

    for algo, name, make, loss, batches, lr, execution in cases:
        try:
            worst, captures, path = one_case(algo, make, loss, batches, lr, execution)
        except Exception as e:  # noqa: BLE001 - one case failing must not hide the others
            out["float64_max_relative"][f"{name}/{algo}"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            continue
        out["float64_max_relative"][f"{name}/{algo}/{path}"] = worst
        out["captures"][f"{name}/{algo}"] = captures
    return out


def sh(cmd: list[str], log: Path, timeout: int = 600) -> tuple[int, str, float]:
    """Run a command, log its output, return (exit status, output, seconds)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"TIMEOUT after {timeout} s\n{e.stdout or ''}{e.stderr or ''}", 124
    seconds = time.perf_counter() - t0
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{text}\n[exit {rc}, {seconds:.1f} s]\n\n")
    return rc, text, seconds


def rate(text: str) -> float | None:
    """The seconds per iteration of mamlab train's closing line."""
    m = re.search(r"it/s, ([\d.]+) s/it", text)
    return float(m.group(1)) if m else None


def median_seconds(run_dir: Path) -> float | None:
    """The median wall time of a run's meta-iterations (``metrics.jsonl``), the last one (with its
    validation) left out: the steady rate, past the first iterations' one-time work."""
    from mamlab.runlog import read_metrics

    try:
        seconds = [r["seconds"] for r in read_metrics(run_dir) if "seconds" in r][:-1]
    except Exception:  # noqa: BLE001 - a run that failed has no metrics: say None
        return None
    return sorted(seconds)[len(seconds) // 2] if seconds else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", type=Path, default=None, help="Omniglot folder (zips); step 3 needs it")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a dry run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"
    device = torch.device(args.device)
    mam = [sys.executable, "-m", "mamlab"]
    results: dict = {"torch": torch.__version__, "device": str(device),
                     "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    n = 40 if args.quick else 200

    def save() -> None:
        (args.out / "device_check.json").write_text(json.dumps(results, indent=2, default=str))

    def step(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - record and go on: one failure must not hide the rest
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        print(f"== {name} ({results['seconds'][name]} s): {json.dumps(results[name], default=str)[:2000]}",
              flush=True)
        save()

    step("gradients_float64", lambda: gradients(device))
    if device.type == "cuda":
        step("cuda_graphs", lambda: cuda_graphs(device))

    if args.data is not None and (args.data / "all_runs.zip").exists():
        def omniglot() -> dict:
            r = results["omniglot_speed"] = {}  # saved after each run, so a cut-off step keeps what it has
            iters = 20 if args.quick else 60  # the median iteration of metrics.jsonl is the number
            variants = [("second", ["--no-first-order"])]
            if device.type == "cuda":  # the paths of the "Speed near the hardware" issue, second order
                variants += [("second-conv", ["--no-first-order", "--execution", "conv"]),
                             ("second-graph", ["--no-first-order", "--cuda-graph"]),
                             ("second-conv-graph", ["--no-first-order", "--execution", "conv", "--cuda-graph"])]
            variants.append(("first", ["--first-order"]))
            for order, flags in variants:
                d = args.out / f"omni-{order}"
                rc, text, secs = sh([*mam, "train", "omniglot", "--data", str(args.data), "--ways", "20",
                                     "--device", str(device), "--iterations", str(iters), "--no-progress",
                                     "--val-every", str(iters), "--checkpoint-every", str(iters),
                                     "--out", str(d), *flags], log)
                spi = rate(text)
                r[order] = {"exit": rc, "s_per_iteration": spi, "median_s": median_seconds(d),
                            "hours_for_60000": None if not spi else 60000 * spi / 3600, "wall_s": secs}
                save()
            rc, text, _ = sh([*mam, "eval", str(args.out / "omni-first"), "--device", str(device),
                              "--omniglot-runs", str(args.data / "all_runs.zip")], log)
            r["oneshot_eval"] = {"exit": rc, "last": text.strip().splitlines()[-1:]}
            return r

        step("omniglot_speed", omniglot)

    def across_devices() -> dict:
        small = ["--iterations", str(n), "--checkpoint-every", str(n // 2), "--val-every", str(n // 2),
                 "--no-progress", "--meta-batch", "10"]
        gpu, cpu = args.out / "sin-gpu", args.out / "sin-cpu"
        r = {}
        rc, text, _ = sh([*mam, "train", "sinusoid", "--out", str(gpu), "--device", str(device), *small], log)
        r["train_gpu"], r["sinusoid_s_per_it_gpu"] = rc, rate(text)
        r["resume_on_cpu"] = sh([*mam, "train", "--resume", str(gpu), "--iterations", str(2 * n),
                                 "--device", "cpu", "--no-progress"], log)[0]
        rc, text, _ = sh([*mam, "train", "sinusoid", "--out", str(cpu), "--device", "cpu", *small], log)
        r["train_cpu"], r["sinusoid_s_per_it_cpu"] = rc, rate(text)
        r["resume_on_gpu"] = sh([*mam, "train", "--resume", str(cpu), "--iterations", str(2 * n),
                                 "--device", str(device), "--no-progress"], log)[0]
        if device.type == "cuda":  # the same run with the meta-gradient replayed from a CUDA graph
            graphed = args.out / "sin-gpu-graph"
            rc, text, _ = sh([*mam, "train", "sinusoid", "--out", str(graphed), "--device", str(device),
                              "--cuda-graph", *small], log)
            r["train_gpu_graph"], r["sinusoid_s_per_it_gpu_graph"] = rc, rate(text)
            if rc == 0 and r["train_gpu"] == 0:
                from mamlab.checkpoint import load_checkpoint

                a = load_checkpoint(graphed / "checkpoints" / f"iter_{n:06d}").model_state
                b = load_checkpoint(gpu / "checkpoints" / f"iter_{n:06d}").model_state
                r["graph_vs_eager_max_abs_at_iteration_n"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        from mamlab.checkpoint import load_model

        a, b = load_model(gpu / "model.safetensors"), load_model(cpu / "model.safetensors")
        num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
        den = sum(float(b[k].norm() ** 2) for k in b) ** 0.5
        r["gpu_then_cpu_vs_cpu_then_gpu_relative"] = num / den
        for d in (gpu, cpu):
            rc, text, _ = sh([*mam, "eval", str(d), "--tasks", "100", "--device", str(device), "--json"], log)
            r[f"eval_{d.name}"] = json.loads(text[text.index("{"):])["results"] if rc == 0 else f"exit {rc}"
        return r

    step("resume_across_devices", across_devices)

    def analyze() -> dict:
        rc, text, secs = sh([*mam, "analyze", str(args.out / "sin-gpu"), "--out", str(args.out / "report"),
                             "--device", str(device), "--tasks", "40", "--steps", "5", "--no-progress"], log)
        return {"exit": rc, "seconds": secs, "last": text.strip().splitlines()[-2:]}

    step("analyze_on_device", analyze)

    def precision() -> dict:
        rc, text, _ = sh([sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--device", str(device),
                          "--seeds", "1" if args.quick else "3"], log)
        return {"exit": rc, "table": text.strip().splitlines()[-8:]}

    step("precision", precision)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    print(f"done; failed steps: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
