"""The meta-training loop, the same for every algorithm, on any device and on many processes.

Each iteration: draw the meta-batch from the task stream (on the CPU, so every device and every
number of processes sees the same tasks), take this process's share of its tasks, move it to the
device, ``algorithm.meta_loss(share).backward()``, all-reduce the meta-gradient across processes
(``mamlab.runtime.Distributed``), one step of Adam (or plain SGD, ``meta_optimizer``) on
``algorithm.parameters()``.

A run directory holds everything about a run::

    RUN/config.json          the resolved TrainConfig (run, task and algorithm options)
    RUN/metadata.json        versions of mamlab, torch and Python, git revision, start time
    RUN/metrics.jsonl        one line per iteration (meta_loss; val_loss every val_every)
    RUN/tensorboard/         the same scalars for TensorBoard
    RUN/checkpoints/         iter_NNNNNN/ every checkpoint_every iterations, and ``latest``
    RUN/model.safetensors    the final parameters of the model
    RUN/algorithm.safetensors  the algorithm's own learned state, if it has any (e.g. step sizes)

Resuming (``train(..., resume=True)``) restores parameters, the algorithm's state, Adam's state,
the task stream's and the global RNG states and the iteration from the latest checkpoint; the run
then continues exactly as if never interrupted (bitwise on CPU). Under ``torchrun`` rank 0 alone
writes; every rank reads the checkpoint to resume.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from mamlab.algorithms import MetaAlgorithm, build_algorithm
from mamlab.checkpoint import (
    capture_rng_states,
    check_model_state,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    restore_rng_states,
    save_checkpoint,
    save_model,
)
from mamlab.config import RESUMABLE_OPTIONS, TrainConfig, meta_lr_at
from mamlab.core.batch import TaskBatch
from mamlab.core.graphs import GraphedMetaGradient
from mamlab.core.memory import available_bytes, estimate_step, format_bytes, is_out_of_memory
from mamlab.errors import MamlabError
from mamlab.evaluate import per_task_scores
from mamlab.experiments import build_family, build_model, loss_for
from mamlab.files import read_json
from mamlab.runlog import (
    LOCK_FILE,
    RUN_ENTRIES,
    RunLock,
    RunLogger,
    check_replaceable,
    clear_directory,
    is_mamlab_run,
    run_metadata,
    write_json_atomic,
)
from mamlab.runtime import Distributed, precision_context, resolve_device

__all__ = ["train", "load_run", "read_config", "build_run_algorithm", "algorithm_state", "Run",
           "TrainingDiverged", "TrainingInterrupted",
           "TrainingOutOfMemory", "TRAIN_SEED_OFFSET", "VAL_SEED_OFFSET"]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
ALGORITHM_FILE = "algorithm.safetensors"
#: The training task stream uses ``seed``; validation tasks ``VAL_SEED_OFFSET + seed``.
TRAIN_SEED_OFFSET = 0
VAL_SEED_OFFSET = 2_000_029
#: TensorBoard gets the training scalars of every ⌊iterations / this⌋-th iteration (so of every
#: iteration of a run shorter than twice this), plus every validation and the last iteration;
#: ``metrics.jsonl`` gets all of them.
#: TensorBoard shows 1,000 points per chart by default, and its writer is slow: sending it every
#: iteration of a sinusoid run cost 0.4 ms per iteration, a fifth of the meta-step on this
#: machine's CPU (``benchmarks/train_loop.py``).
TENSORBOARD_POINTS = 2000


class TrainingDiverged(MamlabError):
    """A non-finite loss or meta-gradient stopped training."""


class TrainingInterrupted(MamlabError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written."""


class TrainingOutOfMemory(MamlabError):
    """An allocation failed during training; the checkpoints written so far are kept."""


@dataclass
class Run:
    """A trained algorithm (with its model) and its configuration, as loaded from a run directory."""

    path: Path
    config: TrainConfig
    algorithm: MetaAlgorithm
    iteration: int | None = None

    @property
    def model(self) -> nn.Module:
        """The trained network."""
        return self.algorithm.model


def build_run_algorithm(config: TrainConfig, model: nn.Module | None = None) -> MetaAlgorithm:
    """The run's algorithm (its registry name and options) around ``model`` (default: a fresh one)."""
    model = build_model(config) if model is None else model
    return build_algorithm(config.algorithm, model, loss_for(config), config.algorithm_options,
                           execution=config.execution, task_chunk=config.task_chunk)


def algorithm_state(algorithm: MetaAlgorithm) -> dict[str, torch.Tensor]:
    """The algorithm's own state (learned step sizes, ...): its ``state_dict`` less the model's."""
    return {k: v for k, v in algorithm.state_dict().items() if not k.startswith("model.")}


def _load_algorithm_state(algorithm: MetaAlgorithm, state: Mapping[str, torch.Tensor], source: Path) -> None:
    check_model_state(algorithm_state(algorithm), state, source=source)
    if state:
        algorithm.load_state_dict({**{f"model.{k}": v for k, v in algorithm.model.state_dict().items()},
                                   **state})


def read_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig saved in a run directory (one-line error if missing or invalid)."""
    path = run_dir / CONFIG_FILE
    values = read_json(path, "a run configuration (config.json)",
                       missing=f"{run_dir} is not a mamlab run: {path.name} is missing")
    if not isinstance(values, dict):
        raise MamlabError(f"{path}: not a run configuration (expected a JSON object)")
    return TrainConfig.from_dict(values, str(path))


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None,
             device: torch.device | str = "cpu") -> Run:
    """Load a run's config and algorithm: the final model, else (or if asked) a checkpoint's.

    Runs written by mamlab 0.1.0 load too. The algorithm is moved to ``device``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MamlabError(f"run directory {str(run_dir)!r} does not exist")
    config = read_config(run_dir)
    algorithm = build_run_algorithm(config)
    if checkpoint is None and (run_dir / MODEL_FILE).exists():
        state = load_model(run_dir / MODEL_FILE)
        check_model_state(algorithm.model.state_dict(), state, source=run_dir / MODEL_FILE)
        algorithm.model.load_state_dict(state)
        extra = load_model(run_dir / ALGORITHM_FILE) if (run_dir / ALGORITHM_FILE).exists() else {}
        _load_algorithm_state(algorithm, extra, run_dir / ALGORITHM_FILE)
        iteration = config.iterations
    else:
        ckpt = load_checkpoint(checkpoint if checkpoint is not None else run_dir)
        ckpt.restore(algorithm.model)
        _load_algorithm_state(algorithm, (ckpt.extra or {}).get("algorithm_state", {}), ckpt.path)
        iteration = ckpt.iteration
    return Run(run_dir, config, algorithm.to(resolve_device(device)), iteration)


def _prepare_dir(out_dir: Path, resume: bool, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MamlabError(f"output {str(out_dir)!r} exists and is not a directory")
    if resume:
        if not (out_dir / CONFIG_FILE).exists():
            raise MamlabError(f"cannot resume: {str(out_dir)!r} holds no run ({CONFIG_FILE} missing)")
        return
    if out_dir.exists() and any(e.name != LOCK_FILE for e in out_dir.iterdir()):
        if force:
            check_replaceable(out_dir, "run", is_mamlab_run(out_dir), RUN_ENTRIES)
        elif is_mamlab_run(out_dir):
            raise MamlabError(
                f"output directory {str(out_dir)!r} already holds a run; use --resume to continue it, "
                "--force to replace it, or another --out"
            )
        else:
            raise MamlabError(f"output directory {str(out_dir)!r} already holds files that are not a mamlab "
                              "run; choose another --out")
    parent = out_dir.parent if not out_dir.exists() else out_dir
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not _writable(probe):
        raise MamlabError(f"output directory {str(out_dir)!r} is not writable")


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


class _StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, without the checkpoint of the iteration in progress."""


class _StopSignals:
    """SIGINT/SIGTERM during training: the first stops the run after its iteration, with a checkpoint.

    A second signal stops it at once (``_StopNow``): the iteration in progress is dropped and the
    newest checkpoint on disk is what a resume continues from. A second signal that arrives while a
    checkpoint or a metrics line is being written (inside ``protect()``) waits for the write to end,
    so no signal ever leaves a half-written file; the run stops right after it. The handler speaks
    with ``os.write``: ``print`` could re-enter a stream the interrupted code was writing to.
    """

    def __init__(self, speak: bool = True) -> None:
        self.received: str | None = None
        self.again = False
        self._speak = speak
        self._writing = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _say(self, text: str) -> None:
        if self._speak:
            with contextlib.suppress(OSError):
                os.write(2, f"\nmamlab: {text}\n".encode())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            self._say(f"{name} received: stopping after this iteration, with a checkpoint; send it again "
                      "to stop at once without one")
        elif self._writing:
            self.again = True
            self._say(f"{name} received again: a file of the run is being written; stopping as soon as "
                      "it is complete")
        else:
            raise _StopNow(name)

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """A write no signal may cut short; a second signal received meanwhile stops the run after it."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
        if self.again and not self._writing:
            raise _StopNow(self.received or "a stop signal")

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _stopped_at_once(signal_name: str, out_dir: Path) -> TrainingInterrupted:
    """The one-line error of a run stopped by a second signal: which checkpoint a resume starts from."""
    kept = latest_checkpoint(out_dir) if out_dir.is_dir() else None
    where = (f"its newest checkpoint, iteration {int(kept.name.removeprefix('iter_'))}, is kept; continue "
             f"with: mamlab train --resume {out_dir}") if kept is not None else "no checkpoint was written"
    return TrainingInterrupted(f"{signal_name} received twice: stopped at once; {where}")


class _NoLog:
    """Stands in for the RunLogger on ranks other than 0, which write nothing."""

    def __enter__(self) -> _NoLog:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def log(self, iteration: int, **metrics: Any) -> None:
        return None


def train(config: TrainConfig | None, out_dir: str | Path, *, resume: bool = False, force: bool = False,
          progress: bool = True, iterations: int | None = None, changes: Mapping[str, Any] | None = None,
          echo: Callable[[str], None] = print, dist: Distributed | None = None) -> Run:
    """Meta-train per ``config`` into ``out_dir``; ``resume=True`` continues the run there.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this function: each takes its share
    of every meta-batch's tasks, the meta-gradient is all-reduced, and rank 0 alone writes.

    Args:
        config: the run's configuration (ignored when resuming: the saved one is used).
        out_dir: the run directory; must be empty or absent unless ``resume`` or ``force``.
        resume: continue from the latest checkpoint in ``out_dir``.
        force: replace whatever ``out_dir`` holds (only once the new run is ready to start).
        progress: show a progress bar with the ETA and the current meta-loss.
        iterations: with ``resume``, a new total number of iterations (to extend a run).
        changes: with ``resume``, new values of run options that may change
            (``RESUMABLE_OPTIONS``: device, precision, ...).
        echo: where one-line messages go (rank 0 only).
        dist: the processes this run is trained on, instead of those the environment names
            (``Distributed.from_env``); the caller keeps it open. ``Distributed(0, 1, device)``
            trains on this process alone even under torchrun, as each of a sweep's processes does.

    Returns:
        The trained ``Run``.

    Raises:
        TrainingInterrupted: SIGINT or SIGTERM arrived. The first stops the run after its iteration,
            with a checkpoint; a second stops it at once, keeping the newest checkpoint (a write in
            progress is finished first, so no file is left half-written).
    """
    out_dir = Path(out_dir)
    changes = dict(changes or {})
    if iterations is not None:
        changes["iterations"] = iterations
    if resume:
        config = read_config(out_dir) if (out_dir / CONFIG_FILE).exists() else None
        fixed = sorted(set(changes) - set(RESUMABLE_OPTIONS))
        if fixed:
            raise MamlabError(f"{fixed[0]} cannot change when resuming; options that can: "
                              f"{', '.join(RESUMABLE_OPTIONS)}")
        if config is not None and changes:
            config = config.with_options(**changes)
    elif config is None:
        raise MamlabError("train needs a config unless resuming")
    else:
        config = config.validate()
    device = resolve_device(config.device if config is not None else "auto")
    owned = dist is None
    if dist is None:
        dist = Distributed.from_env(device)
    try:
        with contextlib.ExitStack() as held:
            return _train(config, out_dir, dist, resume, force, progress, bool(changes), echo, held)
    except _StopNow as e:  # a second signal: nothing was half-written (see _StopSignals)
        raise _stopped_at_once(str(e), out_dir) from None
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise _out_of_memory(e, out_dir, config) from None
    finally:
        if owned:
            dist.close()


def _train(config: TrainConfig | None, out_dir: Path, dist: Distributed, resume: bool, force: bool,
           progress: bool, changed: bool, echo: Callable[[str], None], held: contextlib.ExitStack) -> Run:
    if config is None:  # resuming a directory without a run: say so (one line)
        _prepare_dir(out_dir, resume, force)
        raise MamlabError(f"cannot resume: {str(out_dir)!r} holds no run")
    # the data, the network and the validation tasks first: a bad dataset, a task the data cannot
    # hold or a meta-batch too small to split is an error before anything is written
    family = build_family(config, "train")
    val_family = build_family(config, "validation")
    device = dist.device
    _check_memory(config, family, dist)  # a meta-batch that cannot fit: one line, before any allocation
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)
    algorithm = build_run_algorithm(config).to(device)  # initialized on the CPU: the same θ on every device
    graphed = None  # the meta-gradient as a CUDA graph: refuses the CPU and recompute in one line
    if config.cuda_graph:
        def scope() -> contextlib.AbstractContextManager:
            return precision_context(config.precision, device, cache=False)
        graphed = GraphedMetaGradient(algorithm, context=scope)
    optimizer = (torch.optim.SGD if config.meta_optimizer == "sgd" else torch.optim.Adam)(
        algorithm.parameters(), lr=config.meta_lr)
    tasks = torch.Generator().manual_seed(TRAIN_SEED_OFFSET + config.seed)
    val_batch = val_family.sample(config.val_tasks, config.shots, config.queries,
                                  torch.Generator().manual_seed(VAL_SEED_OFFSET + config.seed)).to(device)
    dist.task_share(config.meta_batch)
    # rank 0 checks the directory (read-only), locks it, checks again under the lock, and tells the
    # others, so they all stop on the same error; the lock is held until training ends
    problem = None
    if dist.is_main:
        try:
            _prepare_dir(out_dir, resume, force)
            held.enter_context(RunLock(out_dir))
            _prepare_dir(out_dir, resume, force)  # another writer may have started in between
        except MamlabError as e:
            problem = str(e)
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise MamlabError(problem)
    start, skipped = 0, 0
    if resume:
        if latest_checkpoint(out_dir) is not None:
            ckpt = load_checkpoint(out_dir)
            ckpt.restore(algorithm.model, optimizer)
            _load_algorithm_state(algorithm, (ckpt.extra or {}).get("algorithm_state", {}), ckpt.path)
            restore_rng_states(ckpt.rng_states, {"tasks": tasks})
            start = ckpt.iteration
            skipped = int((ckpt.extra or {}).get("skipped", 0))
        if start > config.iterations:
            raise MamlabError(f"the run has already trained {start} iterations; --iterations must be at "
                              f"least that, got {config.iterations}")
        if changed and dist.is_main:  # the run now has a new length or device: its config says so
            write_json_atomic(out_dir / CONFIG_FILE, config.to_dict())
        if start < config.iterations and dist.is_main:
            # the final model of a shorter run is now out of date (its parameters are the latest
            # checkpoint's): remove it, so a killed extension never leaves it to be evaluated
            for name in (MODEL_FILE, ALGORITHM_FILE):
                (out_dir / name).unlink(missing_ok=True)
        if dist.is_main:
            echo(f"resuming {out_dir} from iteration {start} of {config.iterations}")
    elif dist.is_main:
        if force:  # a run of mamlab's own, checked under the lock: all of it but the lock goes
            clear_directory(out_dir, keep=frozenset({LOCK_FILE}))
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / CONFIG_FILE, config.to_dict())
        write_json_atomic(out_dir / "metadata.json", {**run_metadata(), "device": str(device),
                                                      "processes": dist.world_size})
    dist.barrier()

    def checkpoint(iteration: int, metrics: dict[str, Any]) -> None:
        if dist.is_main:
            save_checkpoint(out_dir, model_state=algorithm.model.state_dict(),
                            optimizer_state=optimizer.state_dict(),
                            rng_states=capture_rng_states({"tasks": tasks}), iteration=iteration,
                            config=config.to_dict(), metrics=metrics,
                            extra={"skipped": skipped, "algorithm_state": algorithm_state(algorithm)})

    def validate() -> dict[str, float]:
        """Held-out query loss (and accuracy) after the inner steps, on fixed validation tasks."""
        steps = algorithm.inner_steps
        losses, accs = per_task_scores(algorithm, config, val_batch, [steps])
        out = {"val_loss": float(losses[steps].mean())}
        if accs:
            out["val_accuracy"] = float(accs[steps].mean())
        return out

    from tqdm.auto import tqdm

    share = dist.task_share(config.meta_batch)
    weight = dist.weight(config.meta_batch)
    tensorboard_every = max(1, config.iterations // TENSORBOARD_POINTS)
    last: dict[str, Any] = {}
    bar = tqdm(total=config.iterations, initial=start, disable=not (progress and dist.is_main), unit="it",
               dynamic_ncols=True, desc=f"{config.algorithm} {config.task}")
    logger = RunLogger(out_dir, resume_from_iteration=start if resume else None, hparams=config.to_dict(),
                       hparam_metrics=("meta_loss", "val_loss")) if dist.is_main else _NoLog()
    with logger as log, _StopSignals(dist.is_main) as stop:
        if start == 0 and dist.is_main and not (out_dir / "checkpoints").exists():
            with stop.protect():
                checkpoint(0, {})
        t0 = time.perf_counter()
        for it in range(start + 1, config.iterations + 1):
            t_it = time.perf_counter()
            batch = family.sample(config.meta_batch, config.shots, config.queries, tasks)
            algorithm.start_iteration(it, config.iterations)
            optimizer.zero_grad(set_to_none=True)
            mine = batch.slice(share).to(device)
            if graphed is not None:  # the same meta-gradient, replayed from a CUDA graph into .grad
                loss = graphed(mine)
            else:
                with precision_context(config.precision, device):
                    loss = algorithm.meta_loss(mine)
                    loss.backward()
            # the stop flag travels with the gradient: every rank decides on the same, summed flag, so
            # all of them stop after the same iteration (a signal arriving later counts next iteration)
            value, stopping = dist.all_reduce_gradients(
                algorithm.parameters(), weight, [weight * float(loss.detach()), float(bool(stop.received))])
            stop_now = stopping > 0
            # logged: the global L2 norm of the all-reduced meta-gradient, before the optimizer's step
            norms = [p.grad.detach().norm() for p in algorithm.parameters() if p.grad is not None]
            grad_norm = float(torch.stack(norms).norm()) if norms else 0.0
            if not math.isfinite(value) or not _finite_grads(algorithm, grad_norm):
                if not config.skip_nonfinite:
                    bar.close()
                    what = 'meta-gradient' if math.isfinite(value) else 'meta-loss'
                    bad_data = _nonfinite_fields(batch)
                    cause = (f"the meta-batch itself holds non-finite {bad_data}: the data, "
                             "not the learning rates" if bad_data else
                             f"likely causes: the inner learning rate ({_inner_lr_text(config)}) or "
                             f"meta_lr {config.meta_lr} too large")
                    raise TrainingDiverged(
                        f"non-finite {what} at iteration {it} (loss {value}); {cause}; the last good "
                        f"checkpoint is kept in {out_dir / 'checkpoints'}; pass --skip-nonfinite to skip "
                        "such meta-batches"
                    )
                skipped += 1
                with stop.protect():
                    log.log(it, meta_loss=value, skipped=skipped, grad_norm=grad_norm,
                            seconds=time.perf_counter() - t_it)
                bar.update(1)
                continue
            for group in optimizer.param_groups:
                group["lr"] = meta_lr_at(config, it)
            optimizer.step()
            last = {"meta_loss": value, "skipped": skipped, "grad_norm": grad_norm}
            if config.lr_schedule != "constant":
                last["meta_lr"] = optimizer.param_groups[0]["lr"]
            if dist.is_main and (it % config.val_every == 0 or it == config.iterations):
                with precision_context(config.precision, device):
                    last.update(validate())
            last["seconds"] = time.perf_counter() - t_it  # the iteration's wall time, validation included
            with stop.protect():
                log.log(it, tensorboard=it % tensorboard_every == 0 or it == config.iterations
                        or "val_loss" in last, **last)
            bar.update(1)
            if it % 50 == 0 or it == config.iterations:
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if it % config.checkpoint_every == 0 or it == config.iterations or stop_now:
                with stop.protect():
                    checkpoint(it, last)
            if stop_now:
                bar.close()
                dist.barrier()  # every rank waits for rank 0's checkpoint before any of them exits
                reason = stop.received or "a stop signal to another process of the run"
                raise TrainingInterrupted(
                    f"{reason} received: stopped after iteration {it} with a checkpoint; "
                    f"continue with: mamlab train --resume {out_dir}"
                )
        elapsed = time.perf_counter() - t0
    bar.close()
    if dist.is_main:
        save_model(out_dir / MODEL_FILE, algorithm.model.state_dict())
        extra = algorithm_state(algorithm)
        if extra:
            save_model(out_dir / ALGORITHM_FILE, extra)
    dist.barrier()
    done = config.iterations - start
    if done > 0 and dist.is_main:
        procs = f" on {dist.world_size} processes" if dist.world_size > 1 else ""
        echo(f"trained {done} iterations in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.2f} it/s, "
             f"{elapsed / done:.4f} s/it{procs}, {device}); final meta-loss "
             f"{last.get('meta_loss', float('nan')):.4f}; saved to {out_dir}")
    return Run(out_dir, config, algorithm, config.iterations)


def _out_of_memory(err: BaseException, out_dir: Path, config: TrainConfig | None) -> TrainingOutOfMemory:
    """The one-line error of an allocation that failed during training."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    kept = latest_checkpoint(out_dir) if out_dir.is_dir() else None
    where = (f"the checkpoint of iteration {int(kept.name.removeprefix('iter_'))} is kept; continue with "
             f"less memory: mamlab train --resume {out_dir} --execution loop (or a smaller --task-chunk)"
             if kept is not None else "nothing was trained")
    return TrainingOutOfMemory(f"out of memory during training ({first}); {where}; or start again with a "
                               "smaller meta_batch, shots or queries, --recompute or first_order")


def _check_memory(config: TrainConfig, family: Any, dist: Distributed) -> None:
    """Refuse (one line) a run whose meta-batch step cannot fit in the memory that is free.

    The estimate (``mamlab.core.memory.estimate_step``) is a lower bound, measured on a throwaway
    copy of the network and tasks of one and two examples, with the global RNG untouched; the
    parameter count comes from a network built on the ``meta`` device, so an absurd network is
    refused before it is built.
    """
    with torch.device("meta"):
        numel = sum(p.numel() for p in build_model(config).parameters())
    per_param = 4 * (4 if config.meta_optimizer == "adam" else 2)  # θ, ∇θ (Adam: and its two moments)
    share = dist.task_share(config.meta_batch)
    tasks = share.stop - share.start
    device = dist.device
    lower = ("lower meta_batch, shots or queries", "use --execution loop, a smaller task_chunk, --recompute "
             "or first_order", "use a smaller network")

    def refuse(needed: int, parts: str, fix: str, where: torch.device) -> None:
        free = available_bytes(where)
        if free is not None and needed > free:
            raise MamlabError(f"one meta-batch step needs at least {format_bytes(needed)} ({parts}) but "
                              f"{format_bytes(free)} of memory is free on {where}; {fix}")

    refuse(numel * per_param, f"parameters: {numel:,} with their gradients and optimizer state", lower[2],
           device)
    with torch.random.fork_rng(devices=[]):
        algorithm = build_run_algorithm(config)
        algorithm.start_iteration(1, config.iterations)
        path = algorithm.resolved_execution(device)
        together = max(s.stop - s.start for s in algorithm.engine.chunks(tasks, path, device))
        gen = torch.Generator().manual_seed(0)
        with precision_context(config.precision, torch.device("cpu")):
            est = estimate_step(algorithm.meta_loss, lambda s, q: family.sample(1, s, q, gen),
                                tasks=tasks + config.val_tasks, shots=config.shots, queries=config.queries,
                                tasks_together=together, parameter_bytes=numel * per_param)
    parts = (f"data: {format_bytes(est.data)} for {config.meta_batch} tasks of {config.shots} shots + "
             f"{config.queries} queries and {config.val_tasks} validation tasks; graph: "
             f"{format_bytes(est.graph)} for {together} task{'s' if together > 1 else ''} at once on the "
             f"{path} path; parameters: {format_bytes(est.parameters)}")
    free = available_bytes(device)
    sizes = {"data": est.data, "graph": est.graph, "parameters": est.parameters}
    fixes = dict(zip(sizes, lower, strict=True))
    if path == "vmap" and algorithm.engine.conv_plan is not None:  # the conv path holds far less
        fixes["graph"] = "use --execution conv (far less memory for a Conv4-like net), " + lower[1][4:]
    over = [fixes[k] for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])
            if free is not None and v > free]
    refuse(est.total, parts, "; ".join(over) or fixes[est.largest()], device)
    if device.type != "cpu":  # every rank also draws the whole meta-batch on the CPU
        full = est.data * config.meta_batch // max(1, tasks + config.val_tasks)
        refuse(full, f"data: the meta-batch drawn on the CPU, {format_bytes(full)}", lower[0],
               torch.device("cpu"))


def _nonfinite_fields(batch: TaskBatch) -> str:
    """``"support_x, query_y"``: the fields of ``batch`` with a NaN or infinite value ('' if none)."""
    names = ("support_x", "support_y", "query_x", "query_y")
    return ", ".join(n for n in names if getattr(batch, n).is_floating_point()
                     and not bool(torch.isfinite(getattr(batch, n)).all()))


def _inner_lr_text(config: TrainConfig) -> str:
    return f"inner_lr {config.algorithm_options['inner_lr']}" if "inner_lr" in config.algorithm_options \
        else "the algorithm's inner step sizes"


def _finite_grads(algorithm: nn.Module, norm: float) -> bool:
    """Whether every gradient is finite, given their global L2 ``norm``.

    A NaN or infinity in any gradient makes the norm non-finite, so a finite norm settles it with
    no further pass; only a non-finite one (a NaN or infinity, or finite gradients whose squares
    overflow) is checked gradient by gradient, in one device sync.
    """
    if math.isfinite(norm):
        return True
    checks = [torch.isfinite(p.grad).all() for p in algorithm.parameters() if p.grad is not None]
    return not checks or bool(torch.stack(checks).all())
