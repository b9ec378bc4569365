"""The meta-training loop: Adam on θ with the MAML meta-gradient (or the pretrain baseline).

A run directory holds everything about a run::

    RUN/config.json          the resolved TrainConfig
    RUN/metadata.json        versions of mamlab, torch and Python, git revision, start time
    RUN/metrics.jsonl        one line per iteration (meta_loss; val_loss every val_every)
    RUN/tensorboard/         the same scalars for TensorBoard
    RUN/checkpoints/         iter_NNNNNN/ every checkpoint_every iterations, and ``latest``
    RUN/model.safetensors    the final parameters

Resuming (``train(..., resume=True)``) restores parameters, Adam's state, the task stream's and
the global RNG states and the iteration from the latest checkpoint; the run then continues
exactly as if never interrupted (bitwise on CPU).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from mamlab.algorithms.maml import MAML
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
from mamlab.config import TrainConfig, meta_lr_at
from mamlab.errors import MamlabError
from mamlab.evaluate import per_task_scores
from mamlab.experiment import build_family, build_model, loss_for
from mamlab.runlog import RunLogger, run_metadata, write_json_atomic
from mamlab.tasks.base import TaskBatch

__all__ = ["train", "load_run", "read_config", "Run", "TrainingDiverged", "TrainingInterrupted",
           "pretrain_loss", "TRAIN_SEED_OFFSET", "VAL_SEED_OFFSET"]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
#: The training task stream uses ``seed``; validation tasks ``VAL_SEED_OFFSET + seed``.
TRAIN_SEED_OFFSET = 0
VAL_SEED_OFFSET = 2_000_029


class TrainingDiverged(MamlabError):
    """A non-finite loss or meta-gradient stopped training."""


class TrainingInterrupted(MamlabError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written."""


@dataclass
class Run:
    """A trained model with its configuration, as loaded from a run directory."""

    path: Path
    config: TrainConfig
    model: nn.Module
    iteration: int | None = None


def pretrain_loss(model: nn.Module, loss_fn: Callable, batch: TaskBatch) -> torch.Tensor:
    """Finn et al.'s baseline: ordinary supervised loss on every example of every task, pooled."""
    x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)
    y = torch.cat([batch.support_y, batch.query_y], 1).flatten(0, 1)
    return loss_fn(model(x), y)


def read_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig saved in a run directory (one-line error if missing or invalid)."""
    path = run_dir / CONFIG_FILE
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise MamlabError(f"{run_dir} is not a mamlab run: {path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise MamlabError(f"{path}: cannot read the run configuration: {e}") from None
    return TrainConfig.from_dict(values, str(path)).validate()


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> Run:
    """Load a run's config and model: the final model, else (or if asked) a checkpoint's."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MamlabError(f"run directory {str(run_dir)!r} does not exist")
    config = read_config(run_dir)
    model = build_model(config)
    if checkpoint is None and (run_dir / MODEL_FILE).exists():
        state = load_model(run_dir / MODEL_FILE)
        check_model_state(model.state_dict(), state, source=run_dir / MODEL_FILE)
        model.load_state_dict(state)
        return Run(run_dir, config, model, config.iterations)
    ckpt = load_checkpoint(checkpoint if checkpoint is not None else run_dir)
    ckpt.restore(model)
    return Run(run_dir, config, model, ckpt.iteration)


def _prepare_dir(out_dir: Path, resume: bool, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MamlabError(f"output {str(out_dir)!r} exists and is not a directory")
    if resume:
        if not (out_dir / CONFIG_FILE).exists():
            raise MamlabError(f"cannot resume: {str(out_dir)!r} holds no run ({CONFIG_FILE} missing)")
        return
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        what = "a run" if (out_dir / CONFIG_FILE).exists() else "files"
        raise MamlabError(
            f"output directory {str(out_dir)!r} already holds {what}; use --resume to continue it, "
            "--force to replace it, or another --out"
        )
    parent = out_dir.parent if not out_dir.exists() else out_dir
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not _writable(probe):
        raise MamlabError(f"output directory {str(out_dir)!r} is not writable")


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK | os.X_OK)


class _StopSignals:
    """Turn SIGINT/SIGTERM into a flag checked between iterations."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _finite_grads(model: nn.Module) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def train(config: TrainConfig | None, out_dir: str | Path, *, resume: bool = False, force: bool = False,
          progress: bool = True, iterations: int | None = None,
          echo: Callable[[str], None] = print) -> Run:
    """Meta-train per ``config`` into ``out_dir``; ``resume=True`` continues the run there.

    Args:
        config: the run's configuration (ignored when resuming: the saved one is used).
        out_dir: the run directory; must be empty or absent unless ``resume`` or ``force``.
        resume: continue from the latest checkpoint in ``out_dir``.
        force: replace whatever ``out_dir`` holds (only once the new run is ready to start).
        progress: show a progress bar with the ETA and the current meta-loss.
        iterations: with ``resume``, a new total number of iterations (to extend a run).
        echo: where one-line messages go.

    Returns:
        The trained ``Run``.
    """
    out_dir = Path(out_dir)
    _prepare_dir(out_dir, resume, force)
    if resume:
        config = read_config(out_dir)
        if iterations is not None:
            config.iterations = iterations
            config.validate()
    elif config is None:
        raise MamlabError("train needs a config unless resuming")
    else:
        config.validate()
    if config.deterministic:
        torch.use_deterministic_algorithms(True)

    family = build_family(config, "train")
    val_family = build_family(config, "validation")
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
    loss_fn = loss_for(config)
    maml = MAML(model, loss_fn, config.inner_lr, config.inner_steps, config.first_order,
                execution=config.execution)
    tasks = torch.Generator().manual_seed(TRAIN_SEED_OFFSET + config.seed)
    val_batch = val_family.sample(config.val_tasks, config.shots, config.queries,
                                  torch.Generator().manual_seed(VAL_SEED_OFFSET + config.seed))
    start, skipped = 0, 0
    if resume:
        if latest_checkpoint(out_dir) is not None:
            ckpt = load_checkpoint(out_dir)
            ckpt.restore(model, optimizer)
            restore_rng_states(ckpt.rng_states, {"tasks": tasks})
            start = ckpt.iteration
            skipped = int((ckpt.extra or {}).get("skipped", 0))
        if iterations is not None:  # the run now has a new length: its config says so
            write_json_atomic(out_dir / CONFIG_FILE, config.to_dict())
        echo(f"resuming {out_dir} from iteration {start} of {config.iterations}")
    else:
        if force and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / CONFIG_FILE, config.to_dict())
        write_json_atomic(out_dir / "metadata.json", run_metadata())

    def checkpoint(iteration: int, metrics: dict[str, Any]) -> None:
        save_checkpoint(out_dir, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                        rng_states=capture_rng_states({"tasks": tasks}), iteration=iteration,
                        config=config.to_dict(), metrics=metrics, extra={"skipped": skipped})

    def validate() -> dict[str, float]:
        """Held-out query loss (and accuracy) after the inner steps, on fixed validation tasks."""
        losses, accs = per_task_scores(maml, config, val_batch, [config.inner_steps], config.inner_lr)
        out = {"val_loss": float(losses[config.inner_steps].mean())}
        if accs:
            out["val_accuracy"] = float(accs[config.inner_steps].mean())
        return out

    from tqdm.auto import tqdm

    last: dict[str, Any] = {}
    bar = tqdm(total=config.iterations, initial=start, disable=not progress, unit="it",
               dynamic_ncols=True, desc=f"{config.method} {config.task}")
    with RunLogger(out_dir, resume_from_iteration=start if resume else None) as log, _StopSignals() as stop:
        if start == 0 and not (out_dir / "checkpoints").exists():
            checkpoint(0, {})
        t0 = time.perf_counter()
        for it in range(start + 1, config.iterations + 1):
            batch = family.sample(config.meta_batch, config.shots, config.queries, tasks)
            optimizer.zero_grad(set_to_none=True)
            if config.method == "pretrain":
                loss = pretrain_loss(model, loss_fn, batch)
            else:
                loss = maml.meta_loss(batch)
            loss.backward()
            value = float(loss.detach())
            if not math.isfinite(value) or not _finite_grads(model):
                if not config.skip_nonfinite:
                    bar.close()
                    raise TrainingDiverged(
                        f"non-finite {'meta-gradient' if math.isfinite(value) else 'meta-loss'} "
                        f"at iteration {it} (loss {value}); likely causes: inner_lr {config.inner_lr} or "
                        f"meta_lr {config.meta_lr} too large; the last good checkpoint is kept in "
                        f"{out_dir / 'checkpoints'}; pass --skip-nonfinite to skip such meta-batches"
                    )
                skipped += 1
                log.log(it, meta_loss=value, skipped=skipped)
                bar.update(1)
                continue
            for group in optimizer.param_groups:
                group["lr"] = meta_lr_at(config, it)
            optimizer.step()
            last = {"meta_loss": value, "skipped": skipped}
            if config.lr_schedule != "constant":
                last["meta_lr"] = optimizer.param_groups[0]["lr"]
            if it % config.val_every == 0 or it == config.iterations:
                last.update(validate())
            log.log(it, **last)
            bar.update(1)
            if it % 50 == 0 or it == config.iterations:
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if it % config.checkpoint_every == 0 or it == config.iterations or stop.received:
                checkpoint(it, last)
            if stop.received:
                bar.close()
                raise TrainingInterrupted(
                    f"{stop.received} received: stopped after iteration {it} with a checkpoint; "
                    f"continue with: mamlab train --resume {out_dir}"
                )
        elapsed = time.perf_counter() - t0
    bar.close()
    save_model(out_dir / MODEL_FILE, model.state_dict())
    done = config.iterations - start
    if done > 0:
        echo(f"trained {done} iterations in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.1f} it/s); "
             f"final meta-loss {last.get('meta_loss', float('nan')):.4f}; saved to {out_dir}")
    return Run(out_dir, config, model, config.iterations)

