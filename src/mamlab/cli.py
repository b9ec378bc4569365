"""The ``mamlab`` command line: train, eval, demo (and analyze)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mamlab.errors import MamlabError, StorageError, check_choice

__all__ = ["main", "run", "build_parser", "default_threads"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the command's --help."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _task_names() -> list[str]:
    from mamlab.experiments import TASKS

    return list(TASKS)


def _algorithm_names() -> list[str]:
    from mamlab.algorithms import ALGORITHMS

    return list(ALGORITHMS)


def _preset_names() -> list[str]:
    from mamlab.config import presets

    return list(presets())


def _option_groups() -> list[tuple[str, list[Any]]]:
    """The run options, then every task's and every algorithm's, each name once (for the flags)."""
    from mamlab.algorithms import ALGORITHMS
    from mamlab.config import RUN_OPTIONS
    from mamlab.experiments import TASKS

    seen: set[str] = set()
    groups: list[tuple[str, list[Any]]] = []
    sources = [("run options", RUN_OPTIONS)]
    sources += [(f"task options ({name})", spec.options) for name, spec in TASKS.items()]
    sources += [(f"algorithm options ({name})", spec.options) for name, spec in ALGORITHMS.items()]
    for title, options in sources:
        fresh = [o for o in options if o.name not in seen]
        seen.update(o.name for o in fresh)
        if fresh:
            groups.append((title, fresh))
    return groups


def _option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The option flags given on the command line, parsed and checked (one-line errors)."""
    values: dict[str, Any] = {}
    for _, options in _option_groups():
        for o in options:
            raw = getattr(args, o.name, None)
            if raw is None:
                continue
            values[o.name] = raw if isinstance(raw, bool) else o.parse(raw)
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = _Parser(prog="mamlab", description="Model-Agnostic Meta-Learning and generalization analysis.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser("train", help="meta-train a model (or a baseline) on a task family",
                       description="Meta-train with ALGORITHM on TASK. Flags override --config and "
                       "--preset, which override the papers' defaults for the task. Each option belongs "
                       "to the run, the task or the algorithm; an option of another task or algorithm "
                       "is an error. A default shown below is the option's own; a task may set its "
                       "papers' value instead (see --print-config). Under torchrun (torchrun "
                       "--nproc_per_node N -m mamlab train ...) the tasks of each meta-batch are split "
                       "across the processes.")
    t.add_argument("task", nargs="?", help="task family: " + ", ".join(_task_names()))
    t.add_argument("--out", type=Path, help="run directory to create")
    t.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR from its latest checkpoint")
    t.add_argument("--force", action="store_true", help="replace what --out holds")
    t.add_argument("--config", type=Path, help="TOML file with configuration keys")
    t.add_argument("--preset", help="a packaged configuration: " + ", ".join(_preset_names()))
    t.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    t.add_argument("--algorithm", help="meta-learning algorithm: " + ", ".join(_algorithm_names()))
    t.add_argument("--baseline", choices=["pretrain"], help="same as --algorithm pretrain")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the MLP tasks, else the "
                   "idle cores)")
    for group, options in _option_groups():
        g = t.add_argument_group(group)
        for o in options:
            shown = ",".join(map(str, o.default)) if isinstance(o.default, list) else o.default
            text = f"{o.help} (default: {shown})" if o.default is not None else o.help
            if o.kind == "bool":
                g.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
            else:
                metavar = {"int": "N", "float": "X", "str": "NAME", "ints": "N,N,...", "strs": "NAME,...",
                           "range": "LOW,HIGH"}[o.kind]
                if o.choices:
                    metavar = "{" + ",".join(o.choices) + "}"
                g.add_argument(o.flag, dest=o.name, metavar=metavar, default=None, help=text)

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
    e.add_argument("--lr", type=float, help="inner step size instead of the run's own (algorithms with "
                   "one inner_lr)")
    e.add_argument("--seed", type=int, default=0, help="evaluation stream seed (default 0)")
    e.add_argument("--ways", type=int, help="classification: N-way test tasks (default: the run's; at most "
                   "the model's number of outputs, labels 0..N-1)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the MLP tasks, else the "
                   "idle cores)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
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
    from mamlab.analysis.studies import STUDIES

    a.add_argument("--studies", help="comma-separated subset of the studies (default: all): "
                   f"{', '.join(STUDIES)}")
    a.add_argument("--force", action="store_true", help="replace an existing report in --out")
    a.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the MLP tasks, else the "
                   "idle cores)")

    d = sub.add_parser("demo", help="train MAML and a baseline on sinusoids, compare, plot",
                       description="Train MAML and the pretrain baseline on sinusoids, evaluate both on "
                       "the same held-out tasks, print the comparison and write Finn et al.'s Figure 2.")
    d.add_argument("--out", type=Path, default=None, help="output directory (default: ./mamlab-demo)")
    d.add_argument("--iterations", type=int, default=None, help="training iterations per model")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    _add_sweep_parser(sub)
    return parser


def _device(args: argparse.Namespace) -> Any:
    """The torch device of ``--device`` (one-line error if it is not here)."""
    from mamlab.runtime import resolve_device

    return resolve_device(args.device)


def default_threads(task: str | None) -> int:
    """The torch CPU threads mamlab uses when ``--threads`` is not given.

    One for the tiny MLP tasks: measured with ``benchmarks/speed.py`` on 2 cores, the sinusoid MLP
    runs about as fast on one thread as on two when the machine is idle, and one to two orders of
    magnitude faster when another process holds the other core (intra-op threads wait on each
    other). For the conv nets, as many as there are idle cores (CPU count minus the 1-minute load
    average, at least one): ``benchmarks/processes.py`` measured Conv4 at 1.22x with 2 threads on 2
    idle cores, and at 0.01-0.02x with 2 threads while another job held a core.
    """
    from mamlab.experiments import TASKS

    if task in TASKS and TASKS[task].small_model:
        return 1
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def _threads_for(task: str | None, requested: int | None) -> None:
    """Set torch's CPU threads: ``--threads`` if given, else ``default_threads(task)``."""
    if requested is None:
        import torch

        torch.set_num_threads(default_threads(task))


def _cmd_train(args: argparse.Namespace) -> int:
    from mamlab.config import RESUMABLE_OPTIONS, load_preset, load_toml, resolve_config
    from mamlab.train import train

    progress = not args.no_progress and sys.stderr.isatty()
    values = _option_values(args)
    if args.resume is not None:
        from mamlab.train import read_config

        given = [k for k in ("task", "config", "preset", "algorithm", "baseline") if getattr(args, k)]
        given += [k for k in values if k not in RESUMABLE_OPTIONS]
        if given:
            name = given[0] if given[0] in ("task",) else "--" + given[0].replace("_", "-")
            raise MamlabError(f"{name} cannot be given with --resume: the run keeps its configuration; "
                              f"options that can change: {', '.join(RESUMABLE_OPTIONS)}")
        _threads_for(read_config(args.resume).task if (args.resume / "config.json").exists() else None,
                     args.threads)
        if args.out is not None and args.out != args.resume:
            raise MamlabError(
                f"--out {str(args.out)!r} conflicts with --resume {str(args.resume)!r}; give one"
            )
        train(None, args.resume, resume=True, progress=progress, changes=values)
        return 0
    _threads_for(args.task, args.threads)
    if args.task is None:
        raise MamlabError(f"train needs a TASK ({', '.join(_task_names())}) or --resume DIR")
    check_choice("task family", args.task, _task_names())
    if args.algorithm and args.baseline and args.algorithm != args.baseline:
        raise MamlabError(f"--baseline {args.baseline} conflicts with --algorithm {args.algorithm}; give one")
    file_values: dict[str, Any] = {}
    source = "config"
    if args.preset:
        file_values = load_preset(args.preset)
        source = f"preset {args.preset}"
    if args.config:
        if args.preset:
            raise MamlabError("--config and --preset both give a configuration; give one")
        file_values = load_toml(args.config)
        source = str(args.config)
    config = resolve_config(args.task, file_values, values, source=source,
                            algorithm=args.algorithm or args.baseline)
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

    run = load_run(args.run, device=_device(args))
    _threads_for(run.config.task, args.threads)
    if args.omniglot_runs is not None:
        from mamlab.evaluate import evaluate_on_oneshot_runs

        steps = None if args.steps is None else max(parse_steps(args.steps))
        result = evaluate_on_oneshot_runs(run.algorithm, run.config, args.omniglot_runs, steps=steps,
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
        run.config = run.config.with_options(ways=args.ways)
    result = evaluate_model(run.algorithm, run.config, shots=args.shots, queries=args.queries, steps=steps,
                            num_tasks=args.tasks, lr=args.lr, seed=args.seed)
    gap = None
    if run.config.train_tasks is not None:  # trained on a finite pool: its generalization gap too
        from mamlab.evaluate import gap_summary, pool_gap

        gap = gap_summary(pool_gap(run.algorithm, run.config, shots=args.shots, queries=args.queries,
                                   steps=steps, num_tasks=args.tasks, lr=args.lr, seed=args.seed, new=result))
    if args.json:
        extra = {"gap": gap} if gap else {}
        print(json.dumps({"run": str(args.run), **result.to_dict(), **extra}, indent=2))
        return 0
    ways = f"{run.config.ways}-way " if run.config.task == "omniglot" else ""
    print(f"{run.config.algorithm} on {run.config.task} (iteration {run.iteration}): {result.num_tasks} "
          f"held-out {ways}tasks, {result.shots}-shot, {result.queries} queries, "
          f"{'learned step sizes' if result.lr is None else f'lr {result.lr}'}, "
          f"eval seed {result.seed}")
    rows = result.summary()
    print(_table(rows))
    if any(r["loss_diverged"] for r in rows):
        print("diverged: tasks whose loss is not finite; the mean is over the others, the median counts "
              "them as +inf")
    if gap:
        print(f"\ngeneralization gap: trained on a pool of {run.config.train_tasks} tasks with "
              f"{run.config.train_examples or run.config.shots + run.config.queries} examples each; "
              "mean query loss (95% CI) on")
        print(_gap_table(gap))
    return 0


def _gap_table(rows: list[dict[str, Any]]) -> str:
    kinds = [k for k in ("pool", "recurring", "new") if k in rows[0]]
    names = {"pool": "pool tasks", "recurring": "pool tasks, new examples", "new": "new tasks"}
    head = f"{'steps':>5}" + "".join(f"  {names[k]:>24}" for k in kinds) + f"  {'gap: new − pool':>22}"
    lines = [head]
    for r in rows:
        line = f"{r['steps']:>5}" + "".join(f"  {r[k]['loss']:>14.4f} ± {r[k]['loss_ci95']:<7.4f}"
                                            for k in kinds)
        g = r.get("gap_pool")
        line += f"  {g['loss']:>12.4f} ± {g['loss_ci95']:<7.4f}" if g else f"  {'n/a':>22}"
        lines.append(line)
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]]) -> str:
    has_acc = any("accuracy" in r for r in rows)
    diverged = any(r.get("loss_diverged") for r in rows)
    head = f"{'steps':>5}  {'query loss (95% CI)':>22}  {'median':>8}"
    if diverged:
        head += f"  {'median 95% CI':>21}  {'diverged':>8}"
    lines = [head + (f"  {'accuracy (95% CI)':>20}" if has_acc else "")]
    for r in rows:
        line = f"{r['steps']:>5}  {r['loss']:>12.4f} ± {r['loss_ci95']:<7.4f}  {r['loss_median']:>8.4g}"
        if diverged:
            low, high = r["loss_median_low"], r["loss_median_high"]
            line += f"  [{low:>8.4g}, {high:>8.4g}]  {r['loss_diverged']:>8}"
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
                        studies=args.studies, force=args.force, device=_device(args),
                        progress=not args.no_progress and sys.stderr.isatty())
    print(f"report: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mamlab.demo import run_demo

    _threads_for("sinusoid", None)

    _device(args)  # a device that is not here: one line before anything runs
    run_demo(args.out, iterations=args.iterations, seed=args.seed, device=args.device,
             progress=not args.no_progress and sys.stderr.isatty())
    return 0


# ---------------------------------------------------------------------- mamlab sweep
#: The grid of ``mamlab sweep TASK`` when no grid flag is given: sized to run in minutes on 2 CPU cores.
SWEEP_DEFAULT_GRID = {"train_tasks": "10,100,1000", "shots": "5,20"}
#: The sweep's list-valued shorthands for grid keys: ``--train-tasks 10,100`` is
#: ``--grid train_tasks=10,100``.
SWEEP_SHORTHANDS = ("train_tasks", "shots")


def _add_sweep_parser(sub: Any) -> None:
    """The ``sweep`` sub-command: a grid of training runs, evaluated on the same episodes, one page."""
    s = sub.add_parser("sweep", help="train a grid of runs and measure how meta-generalization scales",
                       description="Train one run per grid cell and seed under OUT/runs/, evaluate every run "
                       "on the same new tasks (and, with --train-tasks, on its pool), and write "
                       "OUT/results.json and OUT/index.html: the generalization gap against the number of "
                       "training tasks M and examples N on log-log axes with fitted slopes against theory. "
                       "Running it again on the same OUT (or --resume OUT) skips finished runs and resumes "
                       "interrupted ones. Under torchrun --nproc_per_node P -m mamlab sweep ... process r "
                       "trains the runs i with i %% P == r. Without --train-tasks, --shots or --grid the "
                       f"grid is --train-tasks {SWEEP_DEFAULT_GRID['train_tasks']} --shots "
                       f"{SWEEP_DEFAULT_GRID['shots']}.")
    s.add_argument("task", nargs="?", help="task family: " + ", ".join(_task_names()))
    s.add_argument("--out", type=Path, help="sweep directory (created, or continued if it holds this sweep)")
    s.add_argument("--resume", type=Path, metavar="DIR", help="continue the sweep in DIR with its own grid")
    s.add_argument("--force", action="store_true", help="replace the sweep in --out")
    s.add_argument("--algorithm", help="meta-learning algorithm: " + ", ".join(_algorithm_names()))
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep an option (run, task or algorithm) or algorithm over values; repeatable; list "
                   "options separate values with ';' (hidden=40,40;80,80)")
    s.add_argument("--seeds", type=int, default=2, help="seeds per grid cell: seed s trains with --seed + s "
                   "(default 2)")
    s.add_argument("--eval-tasks", type=int, default=200, dest="eval_tasks",
                   help="new tasks every run is evaluated on (default 200)")
    s.add_argument("--eval-seed", type=int, default=0, dest="eval_seed",
                   help="the evaluation episodes' seed, the same for every run (default 0)")
    s.add_argument("--steps", type=int, help="inner steps before scoring (default: each run's inner_steps)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the MLP tasks, else the "
                   "idle cores)")
    for group, options in _option_groups():
        g = s.add_argument_group(group + ", fixed for every run" if group == "run options" else group)
        for o in options:
            if o.name in SWEEP_SHORTHANDS:
                g.add_argument(o.flag, dest=o.name, metavar="V1,V2,...", default=None,
                               help=f"{o.help}: the values to sweep (a grid key)")
            elif o.kind == "bool":
                g.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None,
                               help=o.help)
            else:
                g.add_argument(o.flag, dest=o.name, default=None, help=o.help)


def _sweep_spec(args: argparse.Namespace) -> Any:
    """The SweepSpec of ``mamlab sweep``'s flags (one-line errors on a bad key or value)."""
    from mamlab.sweep import SweepSpec, parse_grid_values

    if args.task is None:
        raise MamlabError(f"sweep needs a TASK ({', '.join(_task_names())}) or --resume DIR")
    check_choice("task family", args.task, _task_names())
    algorithm = args.algorithm or "maml"
    check_choice("algorithm", algorithm, _algorithm_names())
    raw: list[tuple[str, str]] = [(k, getattr(args, k)) for k in SWEEP_SHORTHANDS if getattr(args, k)]
    for item in args.grid:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise MamlabError(f"--grid {item!r} must be KEY=V1,V2,... (e.g. inner_lr=0.001,0.01)")
        raw.append((key.strip().replace("-", "_"), text))
    if not raw:
        raw = list(SWEEP_DEFAULT_GRID.items())
    keys = [k for k, _ in raw]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise MamlabError(f"grid key {dup!r} is given twice; give its values once")
    algorithms = [algorithm]
    for key, text in raw:
        if key == "algorithm":
            algorithms = parse_grid_values("algorithm", text, args.task, algorithms)
    if "algorithm" in keys and args.algorithm:
        raise MamlabError("--algorithm conflicts with --grid algorithm=...; give one")
    grid = {key: parse_grid_values(key, text, args.task, algorithms) for key, text in raw}
    fixed = {k: v for k, v in _option_values_except(args, SWEEP_SHORTHANDS).items()}
    return SweepSpec(args.task, grid, fixed, algorithm=algorithms[0] if "algorithm" not in grid else "maml",
                     seeds=args.seeds, eval_tasks=args.eval_tasks, eval_seed=args.eval_seed, steps=args.steps)


def _option_values_except(args: argparse.Namespace, skip: Sequence[str]) -> dict[str, Any]:
    """The option flags given, parsed and checked, except the grid shorthands."""
    values: dict[str, Any] = {}
    for _, options in _option_groups():
        for o in options:
            raw = getattr(args, o.name, None)
            if raw is None or o.name in skip:
                continue
            values[o.name] = raw if isinstance(raw, bool) else o.parse(raw)
    return values


def _cmd_sweep(args: argparse.Namespace) -> int:
    from mamlab.sweep import read_spec, run_sweep

    progress = not args.no_progress and sys.stderr.isatty()
    if args.resume is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("task", "out", "algorithm") if getattr(args, k)]
        given += ["--grid" for _ in args.grid[:1]]
        given += [f"--{k.replace('_', '-')}" for k in _option_values_except(args, ())]
        if given:
            name = given[0] if given[0] != "--task" else "TASK"
            raise MamlabError(f"{name} cannot be given with --resume: "
                              "the sweep keeps the grid and options of its sweep.json")
        spec = read_spec(args.resume)
        _threads_for(spec.task, args.threads)
        path = run_sweep(spec, args.resume, force=False, progress=progress)
    else:
        if args.out is None:
            raise MamlabError("sweep needs --out DIR, the sweep directory (or --resume DIR)")
        spec = _sweep_spec(args)
        _threads_for(spec.task, args.threads)
        path = run_sweep(spec, args.out, force=args.force, progress=progress)
    if path is not None:
        print(f"report: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; exit status 0 ok, 2 bad input, 1 failure, 3 disk full, 130 stopped."""
    try:  # SIGTERM as Ctrl-C: what a command writes is cleaned up (training has its own handler)
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        previous = None
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM anywhere: one line, no traceback
        print("mamlab: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def run() -> NoReturn:
    """The ``mamlab`` program: ``main()`` on ``sys.argv``, then exit with its status.

    Once ``main`` has returned, its output is complete: a late Ctrl-C or SIGTERM (a second one,
    sent while the process exits) is ignored rather than turned into a traceback or a signal status.
    """
    status = main()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(status)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mamlab import __version__

        print(f"mamlab {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"train": _cmd_train, "eval": _cmd_eval, "analyze": _cmd_analyze, "demo": _cmd_demo,
                "sweep": _cmd_sweep}
    threads = getattr(args, "threads", None)
    if threads is not None:
        if not 1 <= threads <= 4096:
            print(f"mamlab: error: threads must be an integer from 1 to 4096, got {threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
    from mamlab.core.memory import is_out_of_memory
    from mamlab.runtime import DistributedError
    from mamlab.train import TrainingDiverged, TrainingInterrupted, TrainingOutOfMemory

    try:
        return commands[args.command](args)
    except TrainingInterrupted as e:
        print(f"mamlab: {e}", file=sys.stderr)
        return 130
    except (TrainingDiverged, TrainingOutOfMemory) as e:
        print(f"mamlab: error: {e}", file=sys.stderr)
        return 1
    except StorageError as e:  # a full or read-only disk is not bad input
        print(f"mamlab: error: {e}", file=sys.stderr)
        return 3
    except DistributedError as e:  # a process of a torchrun job failed: every rank says so
        print(f"mamlab: error: {e}", file=sys.stderr)
        return 1
    except MamlabError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank hits the same check: say it once
            print(f"mamlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mamlab: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:  # eval, analyze: an allocation that failed
        if not is_out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"mamlab: error: out of memory ({first}); use fewer --tasks", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"mamlab: error: {where}{e.strerror or e}", file=sys.stderr)
        return 3 if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else 1


if __name__ == "__main__":  # pragma: no cover
    run()
