"""``analyze_runs``: run the generalization studies on trained runs and write one HTML report.

Every run given (MAML, first-order MAML, the pretrain baseline) is compared with two derived
learners: a randomly initialized network of the first run's architecture (seeded), and
head-only adaptation (ANIL) of every MAML network. All of them are scored on the very same
seeded held-out episodes, so differences between them are paired over tasks. The output folder::

    OUT/index.html      one self-contained page: generated summary, figures, tables
    OUT/results.json    every number in the page (mean, 95% CI half-width, n), and the timings
    OUT/*.png           the figures

The report is built in a temporary folder next to ``OUT`` and renamed into place, so a failed
analysis leaves an earlier report untouched.

The pipeline: load and check the runs, build the learners, draw the seeded episodes, run each
chosen study (``mamlab.analysis.studies``: the numbers), turn its result into a section of the page
(``mamlab.analysis.sections``: sentences, tables, figures), time it, and write the page with
``mamlab.report.html.write_report``.

Diverging tasks: every loss comes with its median (distribution-free 95% CI) and the number of
tasks whose inner loop diverged (``studies.DIVERGENCE_FACTOR``); the sections say where they did.

Example:
    >>> analyze_runs(["runs/maml", "runs/pretrain"], "runs/report", tasks=200, progress=True)
    PosixPath('runs/report/index.html')
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mamlab.algorithms import ALGORITHMS, MetaAlgorithm
from mamlab.analysis import studies as st
from mamlab.analysis.exact import exact_section, exact_study
from mamlab.analysis.sections import (
    SectionContext,
    adaptation_section,
    cost_section,
    generalization_section,
    landscape_section,
    protocol_section,
    representation_section,
    shift_section,
    shots_section,
    skipped_section,
    stability_section,
)
from mamlab.checkpoint import list_checkpoints
from mamlab.config import TrainConfig
from mamlab.errors import MamlabError, check_positive
from mamlab.evaluate import eval_generator
from mamlab.experiments import build_family, is_classification
from mamlab.report.html import Section, write_report
from mamlab.runlog import check_replaceable, is_mamlab_run
from mamlab.runtime import resolve_device
from mamlab.tasks.base import TaskBatch
from mamlab.train import Run, load_run

__all__ = ["analyze_runs", "STUDIES", "TRAIN_CHECK_SEED_OFFSET", "MAX_CHECKPOINTS", "FIXED_STEPS"]

STUDIES = st.STUDIES
#: Training-distribution check tasks are drawn with seed ``TRAIN_CHECK_SEED_OFFSET + seed``: a stream
#: distinct from training (``seed``), validation and evaluation.
TRAIN_CHECK_SEED_OFFSET = 4_000_037
#: The meta-overfitting curve uses at most this many of a run's checkpoints, evenly spaced.
MAX_CHECKPOINTS = 11
#: Studies at a fixed number of inner steps use ``min(steps, FIXED_STEPS)``.
FIXED_STEPS = 10
#: Tasks in the landscape study (power iteration per task is the costliest probe).
LANDSCAPE_TASKS = 20
#: Query points per task for representation similarity on regression tasks (CKA/CCA need many).
REPRESENTATION_QUERIES = 100
_FAMILY_KEYS = {
    "sinusoid": ("amplitude", "phase", "x_range", "noise"),
    "linear-regression": ("dim", "weight_mean", "weight_std", "noise", "hard_fraction", "hard_scale",
                          "hard_offset"),
    "linear-classification": ("dim", "weight_mean", "weight_std"),
    "omniglot": ("data", "split", "ways"),
}


def _label(kind: str) -> str:
    """How the report names a run's kind: the registered algorithm's label (``"MAML++"``)."""
    return ALGORITHMS[kind].title if kind in ALGORITHMS else kind


# ---------------------------------------------------------------------- inputs
def _family_signature(config: TrainConfig) -> str:
    keys = _FAMILY_KEYS.get(config.task, ())
    return f"{config.task}(" + ", ".join(f"{k}={getattr(config, k)!r}" for k in keys) + ")"


def _check_studies(studies: Sequence[str] | str | None) -> list[str]:
    if studies is None:
        return list(STUDIES)
    if isinstance(studies, str):
        studies = [s for s in studies.split(",") if s.strip()]
    chosen = [s.strip() for s in studies]
    bad = [s for s in chosen if s not in STUDIES]
    if bad or not chosen:
        raise MamlabError(f"unknown study {bad[0] if bad else ''!r}; allowed: {', '.join(STUDIES)}")
    return [s for s in STUDIES if s in chosen]


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MamlabError(f"output {str(out)!r} exists and is not a directory; choose another out")
    if out.is_dir() and any(out.iterdir()):
        report = (out / "index.html").is_file() and (out / "results.json").is_file()
        if force:
            check_replaceable(out, "report", report and not is_mamlab_run(out),
                              frozenset({"index.html", "results.json"}), (".png",))
        else:
            what = "a report" if report else "files"
            raise MamlabError(
                f"output directory {str(out)!r} already holds {what}; pass force=True (--force) "
                "to replace a report, or choose another out"
            )
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise MamlabError(f"output directory {str(out)!r} is not writable")


def _load_runs(paths: Sequence[str | Path], device: torch.device) -> list[Run]:
    runs = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise MamlabError(f"run directory {str(path)!r} does not exist")
        if not path.is_dir():
            raise MamlabError(
                f"run {str(path)!r} is not a directory; pass a run directory (mamlab train --out)"
            )
        runs.append(load_run(path, device=device))
    first = _family_signature(runs[0].config)
    for r in runs[1:]:
        sig = _family_signature(r.config)
        if sig != first:
            raise MamlabError(
                f"runs mix task families: {str(runs[0].path)!r} is {first} but {str(r.path)!r} is "
                f"{sig}; analyze runs of one task family together"
            )
    return runs


def _learners(runs: Sequence[Run], seed: int) -> list[st.Learner]:
    base = [_label(st.run_kind(r.config)) for r in runs]
    names = [b if base.count(b) == 1 else f"{b} ({r.path.name})" for b, r in zip(base, runs, strict=True)]
    if len(set(names)) != len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    learners = [
        st.Learner(n, r.algorithm, r.config, st.run_kind(r.config)) for n, r in zip(names, runs, strict=True)
    ]
    anil = [st.anil_learner(lr) for lr in learners if lr.kind in ("maml", "fomaml")]
    cfg = runs[0].config
    device = next(runs[0].model.parameters()).device
    return learners + anil + [st.Learner("random init", st.random_init_model(cfg, seed).to(device), cfg,
                                         "random")]


def _subset(batch: TaskBatch, n: int) -> TaskBatch:
    s = slice(0, min(n, batch.num_tasks))
    return TaskBatch(batch.support_x[s], batch.support_y[s], batch.query_x[s], batch.query_y[s])


def _shot_candidates(config: TrainConfig) -> tuple[int, ...]:
    return (1, 2, 5, 10, 20) if not is_classification(config) else (1, 2, 3, 5, 10, 15, 19)


def _shot_batches(family: Any, config: TrainConfig, tasks: int, seed: int) -> dict[int, TaskBatch]:
    candidates = _shot_candidates(config)
    out = {}
    for k in candidates:
        try:
            out[k] = st.episodes(family, tasks, k, config.queries, eval_generator(seed))
        except MamlabError:  # more shots than the data holds per class
            continue
    if not out:
        raise MamlabError(f"no shot count in {candidates} fits the task family with {config.queries} queries")
    return out


# ---------------------------------------------------------------------- main
def analyze_runs(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    tasks: int = 200,
    seed: int = 0,
    steps: int = 20,
    studies: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = False,
    echo: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
) -> Path:
    """Run the generalization studies on trained runs and write ``out/index.html`` and ``results.json``.

    Args:
        runs: run directories (``mamlab train --out``) of one task family: MAML, first-order MAML
            and/or pretrain runs; the first is the reference of every paired difference.
        out: the report folder; must be absent or empty unless ``force``.
        tasks: held-out tasks (>= 2), the same for every learner.
        seed: seeds the evaluation episodes and the random-init baseline.
        steps: the most inner steps S of the adaptation curves (>= 1); the other studies use
            ``min(steps, 10)``.
        studies: which of ``STUDIES`` to run (default all), a list or a comma-separated string.
        force: replace an existing report (or other content) in ``out``.
        progress: progress bars on stderr.
        echo: where one-line messages go (the per-study timings).
        device: where the studies run (auto, cpu, cuda or cuda:N); episodes are drawn on the CPU.

    Returns:
        The path of ``out/index.html``.
    """
    if isinstance(runs, (str, Path)):
        runs = [runs]
    runs = list(runs)
    if not runs:
        raise MamlabError("no runs given; pass at least one run directory")
    check_positive("tasks", tasks, integer=True)
    if tasks < 2:
        raise MamlabError(f"tasks must be an integer >= 2 (confidence intervals need two), got {tasks!r}")
    check_positive("steps", steps, integer=True)
    check_positive("seed", seed, integer=True, allow_zero=True)
    chosen = _check_studies(studies)
    out = Path(out)
    _check_out(out, force)
    loaded = _load_runs(runs, resolve_device(device))
    t_start = time.perf_counter()
    cfg = loaded[0].config
    learners = _learners(loaded, seed)
    fixed = min(steps, FIXED_STEPS)
    heldout_family = build_family(cfg, "test")
    train_family = build_family(cfg, "train")
    heldout = st.episodes(heldout_family, tasks, cfg.shots, cfg.queries, eval_generator(seed))
    from tqdm.auto import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        ctx = SectionContext(tmp, learners, cfg, tasks, fixed)
        results: dict[str, Any] = {}
        timings: dict[str, float] = {}
        sections: list[Section] = []
        summary: list[str] = []
        kinds = {lr.name: lr.kind for lr in learners}
        with tqdm(
            total=len(chosen),
            desc="analysis",
            unit="study",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        ) as bar:

            def tick(name: str, study: str) -> None:
                bar.set_postfix_str(f"{study}: {name}", refresh=True)

            for study in chosen:
                t0 = time.perf_counter()
                bar.set_description(study)
                sec: Section | None = None
                if study == "adaptation":
                    r = st.adaptation_curves(
                        learners, heldout, steps, progress=lambda n: tick(n, "adaptation")
                    )
                    timings[study] = time.perf_counter() - t0
                    sec = adaptation_section(ctx, r, learners, summary)
                elif study == "shots":
                    batches = _shot_batches(heldout_family, cfg, tasks, seed)
                    r = st.shot_sweep(learners, batches, fixed, progress=lambda n: tick(n, "shots"))
                    r["kinds"] = kinds
                    r["unavailable_shots"] = [k for k in _shot_candidates(cfg) if k not in batches]
                    timings[study] = time.perf_counter() - t0
                    sec = shots_section(ctx, r, summary)
                elif study == "generalization":
                    train_tasks = st.episodes(
                        train_family,
                        tasks,
                        cfg.shots,
                        cfg.queries,
                        torch.Generator().manual_seed(TRAIN_CHECK_SEED_OFFSET + seed),
                    )
                    r = st.generalization_gap(
                        learners, heldout, train_tasks, fixed, same_distribution=cfg.task == "sinusoid"
                    )
                    curves = {}
                    for lr, run in zip(learners, loaded, strict=False):
                        tick(lr.name, "checkpoints")
                        snaps = _snapshots(run)
                        if snaps:
                            curves[lr.name] = st.meta_overfitting_curve(
                                snaps, run.config, heldout, train_tasks, fixed, lr.kind
                            )
                    r["meta_overfitting"] = curves
                    timings[study] = time.perf_counter() - t0
                    sec = generalization_section(ctx, r, curves, summary)
                elif study == "shift":
                    conditions = _shift_conditions(cfg, heldout, tasks, seed)
                    if conditions is None:
                        r = {"skipped": f"no distribution shift is defined for task {cfg.task!r}"}
                        timings[study] = time.perf_counter() - t0
                        sec = skipped_section("shift", r["skipped"])
                    else:
                        r = st.distribution_shift(learners, conditions, fixed)
                        timings[study] = time.perf_counter() - t0
                        sec = shift_section(ctx, r, summary)
                elif study == "representations":
                    rep = heldout
                    if not ctx.classify and cfg.queries < REPRESENTATION_QUERIES:
                        rep = st.episodes(
                            heldout_family, tasks, cfg.shots, REPRESENTATION_QUERIES, eval_generator(seed)
                        )
                    r = st.representation_change(learners, rep, fixed)
                    r["queries"] = rep.query_x.shape[1]
                    timings[study] = time.perf_counter() - t0
                    sec = representation_section(ctx, r, summary)
                elif study == "stability":
                    r = _stability(loaded, learners, heldout, heldout_family, tasks, seed, fixed)
                    timings[study] = time.perf_counter() - t0
                    sec = stability_section(ctx, r, summary)
                elif study == "exact":
                    r = exact_study(loaded, learners[: len(loaded)], heldout)
                    timings[study] = time.perf_counter() - t0
                    sec = exact_section(ctx, r, summary)
                else:  # landscape
                    r = st.landscape(learners, _subset(heldout, LANDSCAPE_TASKS), fixed, seed=seed)
                    timings[study] = time.perf_counter() - t0
                    sec = landscape_section(ctx, r, summary)
                results[study] = r
                timings[study + "_with_figures"] = time.perf_counter() - t0
                echo(
                    f"  {study}: {timings[study]:.1f} s "
                    f"({timings[study + '_with_figures']:.1f} s with figures)"
                )
                sections.append(sec)
                bar.update(1)
        timings["total"] = time.perf_counter() - t_start
        sections.append(cost_section(timings, chosen, len(learners), tasks))
        payload = {
            "protocol": {
                "tasks": tasks,
                "seed": seed,
                "steps": steps,
                "fixed_steps": fixed,
                "shots": cfg.shots,
                "queries": cfg.queries,
                "task": cfg.task,
                "family": _family_signature(cfg),
                "studies": chosen,
                "reference": learners[0].name,
                "confidence": 0.95,
            },
            "runs": [
                {
                    "path": str(r.path),
                    "algorithm": r.config.algorithm,
                    "algorithm_options": r.config.algorithm_options,
                    "method": r.config.method,
                    "first_order": bool(r.config.algorithm_options.get("first_order",
                                                                       r.config.algorithm == "fomaml")),
                    "iterations": r.iteration,
                    "inner_steps": r.algorithm.inner_steps,
                    "inner_lr": getattr(r.algorithm, "inner_lr", None),
                }
                for r in loaded
            ],
            "learners": [
                {"name": lr.name, "kind": lr.kind, "inner_lr": lr.inner_lr, "inner_params": lr.inner_params}
                for lr in learners
            ],
            "studies": results,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        title = (
            f"Generalization analysis: {', '.join(lr.name for lr in learners[: len(loaded)])} on {cfg.task}"
        )
        sections.insert(0, protocol_section(payload["protocol"], payload["runs"], payload["learners"],
                                            ctx.classify))
        write_report(tmp, title, summary, sections, payload)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(f"  total: {timings['total']:.1f} s; report written to {out / 'index.html'}")
    return out / "index.html"


def _snapshots(run: Run) -> list[tuple[int, MetaAlgorithm]]:
    """Up to ``MAX_CHECKPOINTS`` evenly spaced checkpoints of a run (first and last included)."""
    snaps = []
    for p in list_checkpoints(run.path, most=MAX_CHECKPOINTS):
        loaded = load_run(run.path, checkpoint=p, device=next(run.model.parameters()).device)
        snaps.append((int(loaded.iteration or 0), loaded.algorithm))
    return snaps


#: Inner step counts of the stability study's divergence count (capped at the fixed steps).
STABILITY_STEPS = (1, 5, 10)


def _stability(loaded: Sequence[Run], learners: Sequence[st.Learner], heldout: TaskBatch, family: Any,
               tasks: int, seed: int, fixed: int) -> dict[str, Any]:
    """The stability study on every run: its checkpoints on ``LANDSCAPE_TASKS`` tasks at its training K,
    and divergence at the final θ on the shot sweep's episodes (the same tasks for every K and run)."""
    cfg = loaded[0].config
    curve_batches = {cfg.shots: _subset(heldout, LANDSCAPE_TASKS)}
    for run in loaded:
        k = run.config.shots
        if k not in curve_batches:
            curve_batches[k] = _subset(st.episodes(family, tasks, k, cfg.queries, eval_generator(seed)),
                                       LANDSCAPE_TASKS)
    entries = [(lr, (_snapshots(run) or [(int(run.iteration or 0), run.algorithm)])
                if st.single_inner_lr(lr) is not None else [])  # runs without one α are skipped
               for lr, run in zip(learners, loaded, strict=False)]
    steps = sorted({min(s, fixed) for s in STABILITY_STEPS})
    return st.stability(entries, curve_batches, _shot_batches(family, cfg, tasks, seed), steps, seed=seed)


def _shift_conditions(
    cfg: TrainConfig, heldout: TaskBatch, tasks: int, seed: int
) -> dict[str, list[tuple[str, TaskBatch]]] | None:
    if cfg.task == "sinusoid":
        return st.sinusoid_shift_conditions(cfg, tasks, cfg.shots, cfg.queries, seed)
    if heldout.support_x.dim() >= 4:  # images: Omniglot
        return st.rotation_conditions(heldout)
    return None


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished report folder to ``out``; an existing ``out`` is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
