"""``run_sweep``: train every run of a grid (resumably, on many processes), evaluate each, write the page.

A sweep folder holds::

    DIR/sweep.json             the SweepSpec: grid, fixed options, seeds, evaluation protocol
    DIR/runs/NAME/             one ordinary run per grid cell and seed (``mamlab train``'s layout),
                               NAME like ``train_tasks=100,shots=5,seed=1``
    DIR/runs/NAME/sweep_eval.json  the run's evaluation, with the SHA-256 of its final model
    DIR/results.json           every run's grid values, seed, iterations and numbers; the fits
    DIR/index.html (+ PNGs)    the report page

Every run is trained with ``mamlab.train.train``, so it is locked while written, checkpointed and
resumable. Running the sweep again (or ``resume_sweep(DIR)``) skips runs whose final model exists
and loads, resumes interrupted ones from their latest checkpoint, reuses evaluations whose model
hash and protocol still match, and refuses when the grid or the options differ from
``sweep.json``. Under torchrun rank r handles runs ``i % P == r`` (``SweepGroup``); rank 0 writes
the results after every process has finished (a shared filesystem is assumed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from mamlab.checkpoint import CheckpointError
from mamlab.config import TrainConfig
from mamlab.errors import MamlabError
from mamlab.evaluate import EvalResult, evaluate_model, finite_gap
from mamlab.experiments import build_family
from mamlab.files import MIB, read_json, read_regular, read_regular_text
from mamlab.runlog import write_json_atomic
from mamlab.runtime import Distributed, resolve_device
from mamlab.stats import unpaired_difference_ci
from mamlab.sweep.grid import NOT_COMPARED, SweepRun, SweepSpec, expand, spec_differences
from mamlab.sweep.processes import SweepGroup
from mamlab.train import Run, TrainingInterrupted, load_run, read_config, train

__all__ = ["run_sweep", "resume_sweep", "read_spec", "evaluate_run", "load_results", "model_hash",
           "SPEC_FILE", "RUNS_DIR", "EVAL_FILE", "EVAL_FORMAT"]

SPEC_FILE = "sweep.json"
RUNS_DIR = "runs"
EVAL_FILE = "sweep_eval.json"
EVAL_FORMAT = 2
_REPORT_ENTRIES = ("index.html", "results.json")


# ---------------------------------------------------------------------- files
def read_spec(out: str | Path) -> SweepSpec:
    """The ``SweepSpec`` saved in ``out/sweep.json`` (one-line error if missing or not a sweep)."""
    path = Path(out) / SPEC_FILE
    values = read_json(path, "a sweep description (sweep.json)",
                       missing=f"{out} is not a mamlab sweep: {SPEC_FILE} is missing")
    return SweepSpec.from_dict(values, str(path))


def model_hash(run_dir: Path) -> str:
    """SHA-256 of the run's final model file (and of its algorithm state file, if any)."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "algorithm.safetensors"):
        path = run_dir / name
        if path.exists() or name == "model.safetensors":
            h.update(name.encode() + b"\0" + read_regular(path, 1 << 40, "a model file") + b"\0")
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _comparable(config: TrainConfig) -> dict[str, Any]:
    d = config.to_dict()
    d["run"] = {k: v for k, v in d["run"].items() if k not in NOT_COMPARED}
    return d


# ---------------------------------------------------------------------- evaluation
def _row(result: EvalResult, steps: int) -> dict[str, Any]:
    row = dict(result.summary()[0])
    row["losses"] = [float(v) for v in result.losses[steps].tolist()]
    if steps in result.accuracies:
        row["accuracies"] = [float(v) for v in result.accuracies[steps].tolist()]
    return row


def _gap(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a − b`` of two sets of tasks' losses (different tasks: Welch's interval), over finite ones."""
    gap = finite_gap(a["losses"], b["losses"])
    if gap is None:
        return {"mean": float("nan"), "ci": float("nan")}
    out = {"mean": gap[0], "ci": gap[1]}
    if "accuracies" in a and "accuracies" in b:
        am, aci = unpaired_difference_ci(a["accuracies"], b["accuracies"])
        out.update(accuracy_mean=am, accuracy_ci=aci)
    return out


def _evaluate(run: Run, spec: SweepSpec) -> dict[str, Any]:
    algorithm, config = run.algorithm, run.config
    steps = spec.steps if spec.steps is not None else int(algorithm.inner_steps)
    out: dict[str, Any] = {"steps": steps, "iterations": run.iteration}
    if getattr(config, "train_tasks", None) is not None:
        from mamlab.evaluate import pool_gap  # the finite-pool protocol: pool, recurring and new tasks

        parts = pool_gap(algorithm, config, num_tasks=spec.eval_tasks, steps=[steps], seed=spec.eval_seed)
    else:
        parts = {"new": evaluate_model(algorithm, config, steps=[steps], num_tasks=spec.eval_tasks,
                                       seed=spec.eval_seed)}
    for name, result in parts.items():
        out[name] = _row(result, steps)
    if "pool" in out:
        out["gap"] = _gap(out["new"], out["pool"])
        if "recurring" in out:
            out["recurring_gap"] = _gap(out["recurring"], out["pool"])
    from mamlab.analysis.linear_theory import check_exact_config, exact_excess_loss, maml_advantage

    if config.task == "linear-regression" and check_exact_config(config) is None and steps == 1:
        # the linear model's meta-test loss is known exactly: its excess over the optimum, no sampling
        # error; and how much the MAML optimum beats pretraining's (ERM's) on this task family
        out["exact_excess"] = {"mean": exact_excess_loss(algorithm.model, config), "ci": 0.0}
        out["exact_optimum_advantage"] = maml_advantage(build_family(config, "test"), config.inner_lr,
                                                        config.shots)
    return out


def _protocol(spec: SweepSpec) -> dict[str, Any]:
    return {"eval_tasks": spec.eval_tasks, "eval_seed": spec.eval_seed, "steps": spec.steps}


def _read_cache(run_dir: Path, spec: SweepSpec, digest: str) -> dict[str, Any] | None:
    """The cached evaluation if it is intact, of this model and of this protocol; else ``None``."""
    try:
        cached = json.loads(read_regular_text(run_dir / EVAL_FILE, 256 * MIB, "a sweep evaluation"))
    except (OSError, ValueError, MamlabError):
        return None
    if not isinstance(cached, dict) or cached.get("format") != EVAL_FORMAT:
        return None
    if cached.get("model_sha256") != digest or cached.get("protocol") != _protocol(spec):
        return None
    result = cached.get("result")
    if not isinstance(result, dict) or cached.get("result_sha256") != _digest(result):
        return None
    return result


def evaluate_run(run_dir: str | Path, spec: SweepSpec, device: str = "cpu") -> dict[str, Any]:
    """A run's evaluation under the sweep's protocol, from its cache when that is still valid.

    The cache (``RUN/sweep_eval.json``, written atomically) holds the SHA-256 of the final model
    and of the result itself: a retrained model, another protocol or a damaged file means the run
    is evaluated again.
    """
    run_dir = Path(run_dir)
    digest = model_hash(run_dir)
    cached = _read_cache(run_dir, spec, digest)
    if cached is not None:
        return cached
    result = _evaluate(load_run(run_dir, device=device), spec)
    write_json_atomic(run_dir / EVAL_FILE, {"format": EVAL_FORMAT, "model_sha256": digest,
                                            "protocol": _protocol(spec), "result": result,
                                            "result_sha256": _digest(result)})
    return result


# ---------------------------------------------------------------------- setup
def _is_sweep(out: Path) -> bool:
    try:
        read_spec(out)
    except MamlabError:
        return False
    return True


def _prepare(out: Path, spec: SweepSpec, runs: list[SweepRun], force: bool) -> None:
    """Rank 0: check the folder, refuse a changed grid, replace with ``force``, write ``sweep.json``."""
    if out.exists() and not out.is_dir():
        raise MamlabError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not _is_sweep(out):
            raise MamlabError(f"output directory {str(out)!r} holds files that are not a mamlab sweep; "
                              "choose another --out")
        if force:
            _remove_sweep(out)
        else:
            saved = read_spec(out)
            diffs = spec_differences(saved, spec)
            try:
                old_runs = expand(saved)
            except MamlabError:
                old_runs = []
            same = [r.name for r in old_runs] == [r.name for r in runs] and all(
                _comparable(a.config) == _comparable(b.config) for a, b in zip(old_runs, runs, strict=True))
            if not same:
                what = "; ".join(diffs) if diffs else "the runs' configurations differ"
                raise MamlabError(f"{str(out)!r} holds a sweep with another grid or options ({what}); "
                                  f"resume it with mamlab sweep --resume {out}, or use --force to replace it "
                                  "or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / RUNS_DIR).mkdir(exist_ok=True)
    write_json_atomic(out / SPEC_FILE, spec.to_dict())


def _remove_sweep(out: Path) -> None:
    """``--force``: delete a sweep mamlab wrote (its spec, runs, page and figures) and nothing else."""
    from mamlab.runlog import check_replaceable, clear_directory

    allowed = frozenset({SPEC_FILE, RUNS_DIR, *_REPORT_ENTRIES})
    check_replaceable(out, "sweep", True, allowed, (".png",))
    clear_directory(out)


def _finished(run_dir: Path, run: SweepRun) -> bool:
    """Whether the run's final model exists and loads (and belongs to this run's configuration)."""
    if not (run_dir / "model.safetensors").exists():
        return False
    try:
        loaded = load_run(run_dir)
    except (CheckpointError, MamlabError):
        return False
    return loaded.iteration == run.config.iterations


def _check_run_config(run_dir: Path, run: SweepRun) -> None:
    saved = read_config(run_dir)
    if _comparable(saved) != _comparable(run.config):
        raise MamlabError(f"{run_dir} holds a run with another configuration than the sweep's run "
                          f"{run.name}; remove it or use --force")


# ---------------------------------------------------------------------- main
def run_sweep(spec: SweepSpec, out: str | Path, *, force: bool = False, progress: bool = False,
              echo: Callable[[str], None] = print) -> Path | None:
    """Train, evaluate and report every run of ``spec`` into ``out`` (resuming what is there).

    Args:
        spec: the grid, fixed options, seeds and evaluation protocol.
        out: the sweep folder; an existing sweep there is continued (it must have the same grid
            and options), ``force`` replaces it.
        force: delete the sweep in ``out`` first (only a sweep mamlab wrote).
        progress: progress bars while training.
        echo: where one-line messages go (every process prints about its own runs).

    Returns:
        The path of ``out/index.html`` on rank 0; ``None`` on the other processes.
    """
    out = Path(out)
    runs = expand(spec)  # every configuration checked before anything is written
    requested = resolve_device(spec.fixed.get("device", "auto"))
    group = SweepGroup.from_env()
    device = group.device_for(requested)
    problem = None
    if group.is_main:
        try:
            _prepare(out, spec, runs, force)
        except MamlabError as e:
            problem = str(e)
    problem = group.broadcast_object(problem)
    if problem is not None:
        raise MamlabError(problem)
    with _stop_signals(out):
        _train_and_evaluate(group, spec, runs, out, device, requested, progress, echo)
    group.barrier()  # every run trained and evaluated, by whichever process
    path = None
    if group.is_main:
        records = load_results(out, spec, runs)
        path = _write_report(out, spec, records)
        echo(f"sweep of {len(runs)} runs: report written to {path}")
    group.barrier()
    return path


@contextlib.contextmanager
def _stop_signals(out: Path) -> Iterator[None]:
    """SIGTERM between runs (training handles its own) stops the sweep with a one-line message."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise TrainingInterrupted(f"{signal.Signals(signum).name} received between runs; continue the sweep "
                                  f"with: mamlab sweep --resume {out}")

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _train_and_evaluate(group: SweepGroup, spec: SweepSpec, runs: list[SweepRun], out: Path, device: Any,
                        requested: Any, progress: bool, echo: Callable[[str], None]) -> None:
    """Train (or resume, or skip) and evaluate this process's runs."""
    mine = group.mine(len(runs))
    tag = f"[rank {group.rank}] " if group.world_size > 1 else ""
    for count, i in enumerate(mine, 1):
        run = runs[i]
        run_dir = out / RUNS_DIR / run.name
        where = f"{tag}run {i + 1}/{len(runs)} {run.name}"
        t0 = time.perf_counter()
        override = str(device) if device != requested else None  # a CUDA sweep on many processes
        config = run.config if override is None else run.config.with_options(device=override)
        if _finished(run_dir, run):
            _check_run_config(run_dir, run)
            status = "already trained"
        else:
            quiet = (lambda line: None)  # noqa: E731 - train's own lines would interleave across processes
            try:
                alone = Distributed(0, 1, device)  # this process trains the run by itself
                if (run_dir / "config.json").exists():
                    _check_run_config(run_dir, run)
                    moved = override is not None and read_config(run_dir).device != override
                    changes = {"device": override} if moved else None
                    train(None, run_dir, resume=True, progress=progress, changes=changes, echo=quiet,
                          dist=alone)
                    status = "resumed and trained"
                else:
                    train(config, run_dir, progress=progress, echo=quiet, dist=alone)
                    status = "trained"
            except TrainingInterrupted as e:
                first = str(e).split("; continue with")[0]
                raise TrainingInterrupted(f"{where}: {first}; continue the sweep with: mamlab sweep --resume "
                                          f"{out}") from None
        t_train = time.perf_counter() - t0
        evaluate_run(run_dir, spec, device=str(device))
        echo(f"{where}: {status} ({t_train:.1f} s), evaluated ({time.perf_counter() - t0 - t_train:.1f} s) "
             f"[{count}/{len(mine)} of this process]")


def resume_sweep(out: str | Path, *, progress: bool = False,
                 echo: Callable[[str], None] = print) -> Path | None:
    """Continue the sweep in ``out`` with the grid and options of its ``sweep.json``."""
    return run_sweep(read_spec(out), out, progress=progress, echo=echo)


def load_results(out: str | Path, spec: SweepSpec,
                 runs: list[SweepRun] | None = None) -> list[dict[str, Any]]:
    """Every run's record: name, grid values, seed, configuration facts and evaluation numbers.

    Raises:
        MamlabError: a run has no valid evaluation (not trained or evaluated yet).
    """
    out = Path(out)
    runs = expand(spec) if runs is None else runs
    records = []
    for run in runs:
        run_dir = out / RUNS_DIR / run.name
        try:
            digest = model_hash(run_dir)
        except (OSError, MamlabError):
            raise MamlabError(f"run {run.name} of {out} has no final model yet; continue the sweep with "
                              f"mamlab sweep --resume {out}") from None
        result = _read_cache(run_dir, spec, digest)
        if result is None:
            raise MamlabError(f"run {run.name} of {out} has no evaluation of its final model; continue the "
                              f"sweep with mamlab sweep --resume {out}")
        cfg = run.config
        pool = getattr(cfg, "train_tasks", None)
        examples = getattr(cfg, "train_examples", None)
        records.append({
            "name": run.name, "index": run.index, "values": dict(run.values), "seed": run.seed,
            "algorithm": cfg.algorithm, "iterations": result["iterations"], "shots": cfg.shots,
            "queries": cfg.queries, "train_tasks": pool,
            "train_examples": (examples if examples is not None else cfg.shots + cfg.queries)
            if pool is not None else None,
            "steps": result["steps"], "model_sha256": digest,
            **{k: v for k, v in result.items() if k not in ("steps", "iterations")},
        })
    return records


def _write_report(out: Path, spec: SweepSpec, records: list[dict[str, Any]]) -> Path:
    """Write the page into a temporary folder in ``out``, then move its files into place."""
    from mamlab.sweep.page import write_sweep_report

    tmp = Path(tempfile.mkdtemp(prefix=".report-tmp-", dir=out))
    try:
        write_sweep_report(tmp, spec, records)
        for old in out.glob("*.png"):
            old.unlink()
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n not in _REPORT_ENTRIES] + list(_REPORT_ENTRIES):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"
