"""Compare the registered algorithms on Omniglot's minimal split with the same budget, and ablate MAML++.

Every run is ``mamlab train omniglot --preset omniglot-minimal-20way`` (so ``mamlab.train.train``)
in its own subprocess, with the preset's task settings for every algorithm: 20-way 1-shot on the
minimal split (218 training characters, 24 held out for validation), 3 query drawings per class,
Conv4 with 32 filters, random quarter turns and affine distortions, meta-batch 8, the same seed
(initialization, validation hold-out and task stream), ``--iterations`` meta-iterations each
(validation once, at the end; a checkpoint every tenth of the run). Per algorithm:

* ``fomaml``: 5 inner SGD steps of α = 0.1 (the preset's algorithm); Adam 2e-3, cosine.
* ``maml``: the same, second order.
* ``anil``: the same, second order, only the last (linear) layer adapts.
* ``metasgd``: per-element step sizes initialised to 0.1, 5 steps, second order.
* ``mamlpp``: MAML++ as its released configurations: LSLR (initial 0.1), multi-step loss, per-step
  BatchNorm, second order throughout (``first_order_epochs=0``), 5 steps; its schedules scaled to
  the run: an "epoch" is one iteration (``iterations_per_epoch=1``) and the multi-step loss lasts
  the first tenth of the run (``msl_epochs = iterations // 10``), as its released 10 of 100
  epochs. Cosine annealing of the meta learning rate is shared by all.
* ``imaml``: 5 inner steps of 0.1 on the proximal problem, λ = 2 (the registry default), 5 CG steps
  (Rajeswaran et al.'s).
* ``reptile``: Nichol et al.'s outer loop: plain SGD on θ − φ̄ with ε = 1 annealed linearly to 0
  (``--meta-optimizer sgd --meta-lr 1 --lr-schedule linear``); inner: 5 SGD steps of 0.1 on the
  task's support + query images (shots + queries = 4 per class), its default.
* ``pretrain``: Finn et al.'s baseline, supervised on the pooled images by Adam 2e-3 cosine,
  fine-tuned with 5 SGD steps of 0.1 at test time.

``--ablation`` adds MAML++ variants, each ``mamlpp`` with the schedules above: ``mamlpp-none``
(every trick off: second-order MAML), ``mamlpp-lslr``, ``mamlpp-msl``, ``mamlpp-bn`` (per-step
BatchNorm), ``mamlpp-da`` (derivative-order annealing alone: first order for the first half of the
run, as the paper's 50 of 100 epochs) and ``mamlpp-all`` (all four). ``--option NAME:KEY=VALUE`` changes a
run's option (an algorithm option, or a run option such as ``meta_lr``); NAME is an algorithm or an
ablation variant.

Independent runs go ``--jobs`` at a time, each ``python -m mamlab train ... --threads 1`` with
``OMP_NUM_THREADS=1``. Running the script again on the same ``--out`` skips finished runs and
resumes unfinished ones from their last checkpoint. Each finished run is then evaluated (the same
episodes for every run):

* Lake et al.'s 20 within-alphabet one-shot runs (``mamlab.evaluate.evaluate_on_oneshot_runs``):
  error, mean ± 95% CI over runs;
* 600 20-way and 600 5-way 1-shot episodes (1 query per class, classes within one run, eval seed
  0; ``omniglot_oneshot.episode_protocols``): accuracy ± 95% CI;

all after the run's own 5 inner steps. All three are transductive: mamlab's Conv4 BatchNorm
normalizes with the statistics of the batch it is given, and each run's 20 test images, or each
episode's queries, are classified together (as in Finn et al.'s code). Training time is the sum of
the iterations' wall times in the run's ``metrics.jsonl`` (validation included; data loading not).

    python benchmarks/compare_omniglot.py --out DIR --ablation --jobs 2     # 160 iterations per run
    python benchmarks/compare_omniglot.py --out DIR --algorithms maml,mamlpp --iterations 1000
    python benchmarks/compare_omniglot.py --out DIR --ablation --evaluate-only  # re-score what is trained

The first command (8 algorithms and 6 ablation variants, 160 iterations each) took 1,439 s on
the 2-core CPU machine, training and evaluation: 1.2-1.3 s per iteration for the second-order
runs, 0.4 s for first-order MAML and ANIL, 1.0 s for Reptile, 0.6 s for pretraining, about 40 s
to evaluate a run. The README ("Omniglot and the one-shot challenge") has its table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mamlab.algorithms import algorithm_spec  # noqa: E402
from mamlab.config import RUN_OPTIONS, load_preset, resolve_config  # noqa: E402
from mamlab.errors import MamlabError  # noqa: E402
from mamlab.evaluate import evaluate_on_oneshot_runs  # noqa: E402
from mamlab.experiments import task_spec
from mamlab.stats import paired_difference_ci  # noqa: E402
from mamlab.train import load_run  # noqa: E402
from omniglot_oneshot import DEFAULT_DATA, episode_protocols  # noqa: E402

__all__ = ["RunSpec", "ALGORITHMS", "ABLATION", "run_specs", "run_all", "train_seconds", "evaluate_run",
           "evaluate_all", "table", "main"]

PRESET = "omniglot-minimal-20way"
ALGORITHMS = ("fomaml", "maml", "anil", "metasgd", "reptile", "mamlpp", "imaml", "pretrain")
#: the MAML++ variants of ``--ablation``: name → (LSLR, MSL, per-step BatchNorm, derivative-order annealing)
ABLATION = {"mamlpp-none": (False, False, False, False), "mamlpp-lslr": (True, False, False, False),
            "mamlpp-msl": (False, True, False, False), "mamlpp-bn": (False, False, True, False),
            "mamlpp-da": (False, False, False, True), "mamlpp-all": (True, True, True, True)}
#: full-Omniglot 20-way 1-shot accuracy (%) as published (issue 10), for context only
PUBLISHED = {"maml": "95.8 (Finn et al.); 93.7 (Raghu et al.)", "anil": "96.2 (Raghu et al.)",
             "reptile": "88.14 non-transductive / 89.43 transductive (Nichol et al.)",
             "metasgd": "95.93 (Li et al.)", "mamlpp": "97.65 (Antoniou et al.)",
             "imaml": "94.46 GD / 96.18 HF (Rajeswaran et al.)"}


@dataclass
class RunSpec:
    """One training run of the comparison: its name (directory), algorithm and option overrides."""

    name: str
    algorithm: str
    options: dict[str, Any] = field(default_factory=dict)


def _base_options(algorithm: str, iterations: int) -> dict[str, Any]:
    """The per-algorithm choices of the module docstring (on top of the preset and the shared budget)."""
    accepted = {o.name for o in algorithm_spec(algorithm).options}
    options: dict[str, Any] = {k: v for k, v in {"inner_lr": 0.1, "inner_steps": 5}.items() if k in accepted}
    if algorithm == "mamlpp":  # an "epoch" of its schedules is one iteration: MSL for the first tenth
        options.update(iterations_per_epoch=1, msl_epochs=max(1, iterations // 10), first_order_epochs=0)
    if algorithm == "reptile":
        options.update(meta_optimizer="sgd", meta_lr=1.0, lr_schedule="linear")
    return options


def _parse_overrides(items: list[str], names: set[str]) -> dict[str, dict[str, str]]:
    """``NAME:KEY=VALUE`` items → {name: {key: text}} (one-line error for a malformed or unknown one)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        target, colon, assignment = item.partition(":")
        key, eq, text = assignment.partition("=")
        if not colon or not eq or not key:
            raise MamlabError(f"--option {item!r}: expected NAME:KEY=VALUE, e.g. mamlpp:msl_epochs=5")
        if target not in names:
            raise MamlabError(f"--option {item!r}: {target!r} is not a run of this comparison; "
                              f"allowed: {', '.join(sorted(names))}")
        out.setdefault(target, {})[key] = text
    return out


def _ablation(iterations: int) -> dict[str, dict[str, Any]]:
    """The switches of each ``--ablation`` variant; annealing: first order for the first half of the run."""
    return {name: {"lslr": lslr, "msl": msl, "per_step_bn": bn, "first_order_epochs": iterations // 2 if da else 0}
            for name, (lslr, msl, bn, da) in ABLATION.items()}


def run_specs(algorithms: list[str], iterations: int, ablation: bool = False,
              overrides: list[str] | None = None) -> list[RunSpec]:
    """The runs of the comparison with their options (``--option`` items applied and parsed)."""
    for a in algorithms:
        algorithm_spec(a)  # an unknown name fails before anything trains
    specs = [RunSpec(a, a, _base_options(a, iterations)) for a in algorithms]
    if ablation:
        specs += [RunSpec(n, "mamlpp", {**_base_options("mamlpp", iterations), **switches})
                  for n, switches in _ablation(iterations).items()]
    given = _parse_overrides(list(overrides or []), {s.name for s in specs})
    for s in specs:
        known = {o.name: o for o in (*RUN_OPTIONS, *algorithm_spec(s.algorithm).options)}
        for key, text in given.get(s.name, {}).items():
            if key not in known:
                raise MamlabError(f"--option {s.name}:{key}={text}: {key!r} is not an option of "
                                  f"{s.algorithm} or of the run")
            s.options[key] = known[key].parse(text)
    return specs


def _run_options(iterations: int) -> dict[str, int]:
    """The run options every run shares: its length, validation once at the end, ten checkpoints."""
    return {"iterations": iterations, "val_every": iterations, "checkpoint_every": max(1, iterations // 10)}


def _config(spec: RunSpec, data: Path, iterations: int) -> Any:
    """The resolved TrainConfig of a run (as ``mamlab train`` resolves its flags)."""
    return resolve_config("omniglot", load_preset(PRESET),
                          {"data": str(data), **_run_options(iterations), **spec.options},
                          source=f"preset {PRESET}", algorithm=spec.algorithm)


def _flags(values: dict[str, Any], algorithm: str) -> list[str]:
    """Command-line flags of ``mamlab train`` for option values."""
    known = {o.name: o for o in (*RUN_OPTIONS, *task_spec("omniglot").options, *algorithm_spec(algorithm).options)}
    flags = []
    for key, value in values.items():
        flag = known[key].flag
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def _command(spec: RunSpec, run_dir: Path, data: Path, iterations: int) -> list[str] | None:
    """The ``mamlab train`` command that trains (or resumes) a run; None when it is finished."""
    base = [sys.executable, "-m", "mamlab", "train"]
    tail = ["--threads", "1", "--no-progress"]
    if (run_dir / "config.json").exists():
        done = load_run(run_dir).iteration if (run_dir / "model.safetensors").exists() else None
        if done is not None and done >= iterations:
            return None
        return [*base, "--resume", str(run_dir), "--iterations", str(iterations), *tail]
    return [*base, "omniglot", "--preset", PRESET, "--algorithm", spec.algorithm, "--out", str(run_dir),
            *_flags({"data": str(data), **_run_options(iterations), **spec.options}, spec.algorithm), *tail]


def _eval_command(name: str, out: Path, data: Path, episodes: int) -> list[str]:
    """The subprocess that evaluates one trained run into ``OUT/eval/NAME.json``."""
    return [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--data", str(data),
            "--evaluate-run", name, "--episodes", str(episodes)]


def _evaluated(out: Path, name: str, iterations: int, episodes: int) -> bool:
    """Whether ``OUT/eval/NAME.json`` scores the finished run with these settings."""
    path = out / "eval" / f"{name}.json"
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    return (saved.get("iteration") == iterations and saved.get("episodes") == episodes
            and "episode_accuracy" in saved)


def run_all(specs: list[RunSpec], out: Path, data: Path, iterations: int, episodes: int = 600, jobs: int = 2,
            echo: Any = print) -> None:
    """Train (or resume) every unfinished run, then evaluate it, at most ``jobs`` subprocesses at a time.

    Each child runs with ``OMP_NUM_THREADS=1`` and one torch thread; its output goes to
    ``OUT/logs/NAME.log`` (training) or ``OUT/logs/NAME.eval.log``. A run's evaluation starts as
    soon as its training ends. A child that fails is reported; the others go on; then a
    ``MamlabError`` names the failed runs.
    """
    for s in specs:
        _config(s, data, iterations)  # a bad option is a one-line error before anything starts
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    queue: list[tuple[str, str, list[str]]] = []  # (name, kind, command)
    for s in specs:
        cmd = _command(s, out / "runs" / s.name, data, iterations)
        if cmd is not None:
            queue.append((s.name, "train", cmd))
        elif not _evaluated(out, s.name, iterations, episodes):
            queue.append((s.name, "eval", _eval_command(s.name, out, data, episodes)))
        else:
            echo(f"[{s.name}] trained and evaluated already, skipped")
    running: list[tuple[str, str, subprocess.Popen, Any, float]] = []
    failed = []
    while queue or running:
        while queue and len(running) < jobs:
            name, kind, cmd = queue.pop(0)
            log_path = out / "logs" / (f"{name}.log" if kind == "train" else f"{name}.eval.log")
            log = open(log_path, "a")  # noqa: SIM115 (closed when the child ends)
            echo(f"[{name}] {kind}: " + " ".join(cmd[1:]))
            running.append((name, kind, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            log, time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            name, kind, proc, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            lines = Path(log.name).read_text().strip().splitlines() or [""]
            echo(f"[{name}] {kind} exit {proc.returncode} after {time.perf_counter() - t0:.0f} s: {lines[-1]}")
            if proc.returncode != 0:
                failed.append(name)
            elif kind == "train":  # evaluate it next, before other runs start training
                queue.insert(0, (name, "eval", _eval_command(name, out, data, episodes)))
    if failed:
        raise MamlabError(f"training or evaluation failed for {', '.join(failed)}; see {out / 'logs'}")


def train_seconds(run_dir: Path) -> float:
    """Sum of the iterations' wall times logged in ``metrics.jsonl`` (validation included).

    An iteration logged twice (trained again after a resume from an earlier checkpoint) counts once,
    with its latest time.
    """
    seen: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "seconds" in row:
            seen[row["iteration"]] = row["seconds"]
    return sum(seen.values())


def evaluate_run(run_dir: Path, data: Path, episodes: int = 600) -> dict[str, Any]:
    """Score one trained run: the challenge and ``episodes`` 20- and 5-way 1-shot episodes (eval seed 0).

    All after the run's own inner steps; every run sees the same runs and episodes.
    """
    run = load_run(run_dir)
    c = run.config
    runs = data / "all_runs.zip" if (data / "all_runs.zip").exists() else data / "all_runs"
    challenge = evaluate_on_oneshot_runs(run.algorithm, c, runs)
    protocols = episode_protocols(run.algorithm, c, steps=(c.inner_steps,), num_tasks=episodes)
    return {"iteration": run.iteration, "episodes": episodes,
            "challenge": {k: v for k, v in challenge.items() if k != "table"},
            "protocols": {f"{w}-way": p.to_dict() for w, p in protocols.items()},
            "episode_accuracy": {f"{w}-way": p.accuracies[c.inner_steps].tolist() for w, p in protocols.items()},
            "transductive": {"challenge": True, "episodes": True}}


def _write_evaluation(out: Path, name: str, data: Path, episodes: int) -> dict[str, Any]:
    """``evaluate_run`` of run NAME, saved as ``OUT/eval/NAME.json``; returns the scores."""
    scores = evaluate_run(out / "runs" / name, data, episodes)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / f"{name}.json").write_text(json.dumps(scores))
    return scores


def evaluate_all(specs: list[RunSpec], out: Path, data: Path, iterations: int,
                 episodes: int = 600) -> dict[str, Any]:
    """The results of every run: its evaluation (``OUT/eval/NAME.json``, computed here where missing)."""
    results: dict[str, Any] = {}
    for s in specs:
        run_dir = out / "runs" / s.name
        if not _evaluated(out, s.name, iterations, episodes):
            _write_evaluation(out, s.name, data, episodes)
        scores = json.loads((out / "eval" / f"{s.name}.json").read_text())
        seconds = train_seconds(run_dir)
        results[s.name] = {"algorithm": s.algorithm, "options": s.options,
                           "config": json.loads((run_dir / "config.json").read_text()),
                           "iterations": scores["iteration"], "train_seconds": seconds,
                           "seconds_per_iteration": seconds / max(scores["iteration"], 1),
                           "challenge": scores["challenge"], "episodes": scores["protocols"],
                           "episode_accuracy": scores["episode_accuracy"],
                           "transductive": scores["transductive"]}
    base = "maml" if "maml" in results else next(iter(results))
    for name, r in results.items():  # the same episodes and runs for every model: paired differences
        r["paired_vs"] = base
        r["minus_base"] = {}
        if name != base:
            for w in ("20-way", "5-way"):
                d, ci = paired_difference_ci(r["episode_accuracy"][w], results[base]["episode_accuracy"][w])
                r["minus_base"][w] = {"mean": d, "ci95": ci}
            d, ci = paired_difference_ci(r["challenge"]["errors"], results[base]["challenge"]["errors"])
            r["minus_base"]["challenge"] = {"mean": d, "ci95": ci}
    return results


def _differences(minus: dict[str, dict[str, float]]) -> str:
    """The paired-difference columns of one row (challenge error in points; accuracies in %)."""
    cells = []
    for key, width in (("challenge", 20), ("20-way", 14), ("5-way", 14)):
        if key in minus:
            scale = 1.0 if key == "challenge" else 100.0
            cells.append(f"{scale * minus[key]['mean']:+.2f} ± {scale * minus[key]['ci95']:.2f}".rjust(width))
    return "".join("  " + c for c in cells)


def table(results: dict[str, Any]) -> str:
    """The printed comparison: challenge error, 20- and 5-way accuracy, training time, paired differences."""
    base = next(iter(results.values()))["paired_vs"] if results else ""
    lines = [f"{'run':<12}  {'iterations':>10}  {'challenge error %':>17}  {'20-way acc %':>14}  "
             f"{'5-way acc %':>14}  {'train s':>8}  {'s/it':>6}  {'− ' + base + ': challenge':>20}  "
             f"{'20-way':>14}  {'5-way':>14} (paired, ± 95% CI)"]
    for name, r in results.items():
        acc = {}
        for w in ("20-way", "5-way"):
            row = r["episodes"][w]["results"][0]
            acc[w] = f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_ci95']:.2f}"
        ch = r["challenge"]
        lines.append(f"{name:<12}  {r['iterations']:>10}  {ch['mean']:>8.2f} ± {ch['ci95']:<6.2f}  "
                     f"{acc['20-way']:>14}  {acc['5-way']:>14}  {r['train_seconds']:>8.0f}  "
                     f"{r['seconds_per_iteration']:>6.2f}" + _differences(r["minus_base"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, train what is not trained, evaluate, print the table, write results.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the comparison's folder (runs/, logs/, results.json)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated registered names")
    parser.add_argument("--iterations", type=int, default=160, help="meta-iterations of every run")
    parser.add_argument("--ablation", action="store_true", help="add the MAML++ ablation's variants")
    parser.add_argument("--option", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="a run's option, e.g. mamlpp:msl_epochs=5 or reptile:meta_lr=0.5 (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="training subprocesses at a time (1 thread each)")
    parser.add_argument("--episodes", type=int, default=600, help="20-way and 5-way test episodes each")
    parser.add_argument("--evaluate-only", action="store_true", help="only evaluate the runs in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the evaluation")
    parser.add_argument("--evaluate-run", metavar="NAME", help=argparse.SUPPRESS)  # a child of run_all
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.jobs < 1 or args.episodes < 2:
        raise MamlabError(f"--iterations and --jobs must be >= 1 and --episodes >= 2, got {args.iterations}, "
                          f"{args.jobs}, {args.episodes}")
    if not (args.data / "all_runs.zip").exists() and not (args.data / "all_runs").is_dir():
        raise MamlabError(f"Omniglot data not found in {args.data} (needs images_background_small1/2 and "
                          "all_runs); pass --data")
    torch.set_num_threads(args.threads)
    if args.evaluate_run is not None:
        scores = _write_evaluation(args.out, args.evaluate_run, args.data, args.episodes)
        print(f"[{args.evaluate_run}] challenge error {scores['challenge']['mean']:.2f} %")
        return scores
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    specs = run_specs(names, args.iterations, args.ablation, args.option)
    start = time.perf_counter()
    if not args.evaluate_only:
        run_all(specs, args.out, args.data, args.iterations, args.episodes, args.jobs)
    wall = time.perf_counter() - start
    results = evaluate_all(specs, args.out, args.data, args.iterations, args.episodes)
    text = table(results)
    print(f"\nOmniglot minimal split, 20-way 1-shot, {args.iterations} meta-iterations each (preset {PRESET}); "
          f"challenge: Lake et al.'s 20 runs; {args.episodes} episodes of 20- and 5-way 1-shot, eval seed 0; "
          "all after 5 inner steps, all transductive (BatchNorm on the batch of test images)")
    print(text)
    for name, value in PUBLISHED.items():
        print(f"published, full Omniglot 20-way 1-shot accuracy: {name}: {value}")
    data = {"iterations": args.iterations, "episodes": args.episodes, "jobs": args.jobs,
            "wall_seconds": None if args.evaluate_only else wall, "runs": results,
            "published_full_omniglot_20way_1shot": PUBLISHED}
    (args.out / "results.json").write_text(json.dumps(data, indent=2))
    return data


if __name__ == "__main__":
    try:
        main()
    except MamlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
