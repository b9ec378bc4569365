"""The ``mamlab`` command line: train, eval, demo (and analyze)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mamlab.errors import MamlabError, check_choice

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the command's --help."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers LOW,HIGH, got {text!r}") from None
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers LOW,HIGH, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = _Parser(prog="mamlab", description="Model-Agnostic Meta-Learning and generalization analysis.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser("train", help="meta-train a model (or a baseline) on a task family",
                       description="Meta-train on TASK (sinusoid, linear-regression, "
                       "linear-classification, omniglot). Flags override --config, which overrides "
                       "the papers' defaults for the task.")
    t.add_argument("task", nargs="?", help="task family: sinusoid, linear-regression, "
                   "linear-classification, omniglot")
    t.add_argument("--out", type=Path, help="run directory to create")
    t.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR from its latest checkpoint")
    t.add_argument("--force", action="store_true", help="replace what --out holds")
    t.add_argument("--config", type=Path, help="TOML file with configuration keys")
    t.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    t.add_argument("--baseline", choices=["pretrain"], help="train a baseline instead of MAML")
    t.add_argument("--iterations", type=int)
    t.add_argument("--meta-batch", type=int, dest="meta_batch")
    t.add_argument("--shots", type=int, help="support examples per task (per class for classification)")
    t.add_argument("--queries", type=int, help="query examples per task (per class for classification)")
    t.add_argument("--inner-lr", type=float, dest="inner_lr", help="α, the inner SGD step size")
    t.add_argument("--inner-steps", type=int, dest="inner_steps")
    t.add_argument("--meta-lr", type=float, dest="meta_lr", help="β, Adam's learning rate")
    t.add_argument("--first-order", action="store_const", const=True, dest="first_order")
    t.add_argument("--lr-schedule", dest="lr_schedule",
                   help="meta learning rate over the run: constant, or cosine (from β down to 0)")
    t.add_argument("--seed", type=int)
    t.add_argument("--execution", help="auto, batched, vmap or loop")
    t.add_argument("--hidden", type=_ints, help="hidden layer sizes, e.g. 40,40")
    t.add_argument("--val-every", type=int, dest="val_every")
    t.add_argument("--val-tasks", type=int, dest="val_tasks")
    t.add_argument("--checkpoint-every", type=int, dest="checkpoint_every")
    t.add_argument("--skip-nonfinite", action="store_const", const=True, dest="skip_nonfinite",
                   help="skip meta-batches with a non-finite loss or gradient instead of stopping")
    t.add_argument("--deterministic", action="store_const", const=True,
                   help="use torch's deterministic algorithms")
    t.add_argument("--amplitude", type=_floats, help="sinusoid amplitude range LOW,HIGH")
    t.add_argument("--phase", type=_floats, help="sinusoid phase range LOW,HIGH")
    t.add_argument("--x-range", type=_floats, dest="x_range", help="sinusoid input range LOW,HIGH")
    t.add_argument("--dim", type=int, help="input dimension of linear tasks")
    t.add_argument("--data", help="Omniglot folder or zip(s)")
    t.add_argument("--split", help="Omniglot split: minimal, vinyals, background")
    t.add_argument("--ways", type=int, help="N in N-way classification")
    t.add_argument("--filters", type=int, help="Conv4 filters per layer (64 in the paper)")
    t.add_argument("--no-rotate", action="store_const", const=False, dest="rotate",
                   help="Omniglot: no random 90-degree rotation of training classes")
    t.add_argument("--affine", action="store_const", const=True,
                   help="Omniglot: distort each training image by a random affine map")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    e = sub.add_parser("eval", help="meta-test a trained run on held-out tasks",
                       description="Adapt the run's model to held-out tasks from a seeded evaluation "
                       "stream and report the query loss (and accuracy) with 95% confidence intervals.")
    e.add_argument("run", type=Path, help="run directory")
    e.add_argument("--shots", type=int, help="support examples per task (default: the run's)")
    e.add_argument("--queries", type=int, help="query examples per task (default: the run's)")
    e.add_argument("--steps", default=None,
                   help="inner steps to score after (default 0,1,5,10; with --omniglot-runs the run's "
                   "inner_steps)")
    e.add_argument("--tasks", type=int, default=600, help="held-out tasks (default 600)")
    e.add_argument("--lr", type=float, help="inner step size (default: the run's inner_lr)")
    e.add_argument("--seed", type=int, default=0, help="evaluation stream seed (default 0)")
    e.add_argument("--ways", type=int, help="classification: N-way test tasks (default: the run's; at most "
                   "the model's number of outputs, labels 0..N-1)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--omniglot-runs", type=Path, dest="omniglot_runs",
                   help="evaluate on the 20 official one-shot runs (all_runs.zip or its folder)")

    a = sub.add_parser("analyze", help="generalization studies of trained runs, as an HTML report",
                       description="Run the generalization studies (adaptation curves, shot sweep, "
                       "generalization gap, distribution shift, representation change, landscape) on one "
                       "or more runs of one task family, on the same seeded held-out episodes, and write "
                       "OUT/index.html, OUT/results.json and the figures.")
    a.add_argument("runs", type=Path, nargs="+", help="run directories; the first is the reference")
    a.add_argument("--out", type=Path, required=True, help="report directory to create")
    a.add_argument("--tasks", type=int, default=200, help="held-out tasks (default 200)")
    a.add_argument("--steps", type=int, default=20, help="most inner steps of the adaptation curves (20)")
    a.add_argument("--seed", type=int, default=0, help="evaluation episodes' seed (default 0)")
    a.add_argument("--studies", help="comma-separated subset of the studies (default: all)")
    a.add_argument("--force", action="store_true", help="replace an existing report in --out")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    d = sub.add_parser("demo", help="train MAML and a baseline on sinusoids, compare, plot",
                       description="Train MAML and the pretrain baseline on sinusoids, evaluate both on "
                       "the same held-out tasks, print the comparison and write Finn et al.'s Figure 2.")
    d.add_argument("--out", type=Path, default=None, help="output directory (default: ./mamlab-demo)")
    d.add_argument("--iterations", type=int, default=None, help="training iterations per model")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    return parser


SMALL_MODEL_TASKS = ("sinusoid", "linear-regression", "linear-classification")


def _threads_for(task: str | None, requested: int | None) -> None:
    """One torch thread for the tiny MLP tasks unless --threads says otherwise.

    Measured with benchmarks/speed.py on 2 cores: the sinusoid MLP runs about as fast on one
    thread as on two when the machine is idle, and one to two orders of magnitude faster when
    another process holds the other core (intra-op threads then wait on each other).
    """
    if requested is None and task in SMALL_MODEL_TASKS:
        import torch

        torch.set_num_threads(1)


def _cmd_train(args: argparse.Namespace) -> int:
    from mamlab.config import load_toml, resolve_config
    from mamlab.train import train

    progress = not args.no_progress and sys.stderr.isatty()
    if args.resume is not None:
        from mamlab.train import read_config

        _threads_for(read_config(args.resume).task if (args.resume / "config.json").exists() else None,
                     args.threads)
        if args.out is not None and args.out != args.resume:
            raise MamlabError(
                f"--out {str(args.out)!r} conflicts with --resume {str(args.resume)!r}; give one"
            )
        train(None, args.resume, resume=True, progress=progress, iterations=args.iterations)
        return 0
    _threads_for(args.task, args.threads)
    if args.task is None:
        raise MamlabError("train needs a TASK (sinusoid, linear-regression, linear-classification, "
                          "omniglot) or --resume DIR")
    check_choice("task family", args.task, ("sinusoid", "linear-regression", "linear-classification",
                                            "omniglot"))
    keys = ("iterations", "meta_batch", "shots", "queries", "inner_lr", "inner_steps", "meta_lr",
            "lr_schedule", "first_order", "seed", "execution", "hidden", "val_every", "val_tasks",
            "checkpoint_every",
            "skip_nonfinite", "deterministic", "amplitude", "phase", "x_range", "dim", "data", "split",
            "ways", "filters", "rotate", "affine")
    overrides: dict[str, Any] = {k: getattr(args, k) for k in keys}
    if args.baseline:
        overrides["method"] = args.baseline
    file_values = load_toml(args.config) if args.config else None
    config = resolve_config(args.task, file_values, overrides, source=str(args.config or "config"))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if args.out is None:
        raise MamlabError("train needs --out DIR, the run directory to create")
    train(config, args.out, force=args.force, progress=progress)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mamlab.evaluate import evaluate_model, parse_steps
    from mamlab.train import load_run

    run = load_run(args.run)
    _threads_for(run.config.task, args.threads)
    if args.omniglot_runs is not None:
        from mamlab.evaluate import evaluate_on_oneshot_runs

        steps = None if args.steps is None else max(parse_steps(args.steps))
        result = evaluate_on_oneshot_runs(run.model, run.config, args.omniglot_runs, steps=steps,
                                          lr=args.lr)
        print(json.dumps(result, indent=2) if args.json else result["table"])
        return 0
    steps = parse_steps(args.steps or "0,1,5,10")
    if args.ways is not None:
        if run.config.task != "omniglot":
            raise MamlabError(f"--ways applies to omniglot runs; this run's task is {run.config.task!r}")
        if not 0 < args.ways <= run.config.ways:
            raise MamlabError(f"--ways must be between 1 and the model's {run.config.ways} outputs, "
                              f"got {args.ways}")
        run.config = dataclasses.replace(run.config, ways=args.ways)
    result = evaluate_model(run.model, run.config, shots=args.shots, queries=args.queries, steps=steps,
                            num_tasks=args.tasks, lr=args.lr, seed=args.seed)
    if args.json:
        print(json.dumps({"run": str(args.run), **result.to_dict()}, indent=2))
        return 0
    ways = f"{run.config.ways}-way " if run.config.task == "omniglot" else ""
    print(f"{run.config.method} on {run.config.task}: {result.num_tasks} held-out {ways}tasks, "
          f"{result.shots}-shot, {result.queries} queries, lr {result.lr}, eval seed {result.seed}")
    print(_table(result.summary()))
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    has_acc = any("accuracy" in r for r in rows)
    head = f"{'steps':>5}  {'query loss (95% CI)':>22}  {'median':>8}"
    lines = [head + (f"  {'accuracy (95% CI)':>20}" if has_acc else "")]
    for r in rows:
        line = f"{r['steps']:>5}  {r['loss']:>12.4f} ± {r['loss_ci95']:<7.4f}  {r['loss_median']:>8.4f}"
        if has_acc:
            line += f"  {100 * r['accuracy']:>10.2f}% ± {100 * r['accuracy_ci95']:.2f}%"
        lines.append(line)
    return "\n".join(lines)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from mamlab.analysis import analyze_runs
    from mamlab.train import read_config

    if (args.runs[0] / "config.json").exists():
        _threads_for(read_config(args.runs[0]).task, args.threads)
    path = analyze_runs(args.runs, args.out, tasks=args.tasks, seed=args.seed, steps=args.steps,
                        studies=args.studies, force=args.force,
                        progress=not args.no_progress and sys.stderr.isatty())
    print(f"report: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mamlab.demo import run_demo

    _threads_for("sinusoid", None)

    run_demo(args.out, iterations=args.iterations, seed=args.seed,
             progress=not args.no_progress and sys.stderr.isatty())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 failure, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mamlab import __version__

        print(f"mamlab {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"train": _cmd_train, "eval": _cmd_eval, "analyze": _cmd_analyze, "demo": _cmd_demo}
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            print(f"mamlab: error: threads must be an integer > 0, got {threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
    from mamlab.train import TrainingDiverged, TrainingInterrupted

    try:
        return commands[args.command](args)
    except TrainingInterrupted as e:
        print(f"mamlab: {e}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"mamlab: error: {e}", file=sys.stderr)
        return 1
    except MamlabError as e:
        print(f"mamlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mamlab: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"mamlab: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
