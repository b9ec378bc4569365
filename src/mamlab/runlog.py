"""Run logs: metrics as JSON lines (plus TensorBoard), run metadata, and atomic file writes.

On-disk layout of a run directory (``RUN``)::

    RUN/metrics.jsonl     one JSON object per ``RunLogger.log`` call: {"iteration": k, name: value, ...}
    RUN/tensorboard/      TensorBoard event files with the same scalars, step = iteration, and the
                          run's hyperparameters (``hparams=``: HParams tab, and a table in the Text tab)

``metrics.jsonl`` is the source of truth: each line is written in one call and flushed, so a
killed process loses at most the line it was writing, and ``read_metrics`` skips a truncated
last line. TensorBoard files are a viewing convenience, flushed every few seconds and on
``close()``.

Resuming: ``RunLogger(run_dir, resume_from_iteration=k)`` drops the lines with iteration > k
(they came after the checkpoint being resumed from, and will be logged again) and tells
TensorBoard to discard its events with step > k.

Example:
    >>> with RunLogger("runs/sine") as log:
    ...     log.log(0, loss=1.25, accuracy=0.5)
    >>> read_metrics("runs/sine")
    [{'iteration': 0, 'loss': 1.25, 'accuracy': 0.5}]
"""

from __future__ import annotations

import datetime
import json
import numbers
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mamlab.errors import MamlabError

__all__ = [
    "RUN_ENTRIES",
    "LOCK_FILE",
    "RunLock",
    "check_replaceable",
    "clear_directory",
    "flatten_hparams",
    "is_mamlab_run",
    "RunLogger",
    "RunLogError",
    "read_metrics",
    "run_metadata",
    "write_json_atomic",
    "write_bytes_atomic",
    "METRICS_FILE",
    "TENSORBOARD_DIR",
]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunLogError(MamlabError):
    """A metrics log that cannot be read or written; the message names the file and the problem."""


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same directory, which is fsynced and then moved over
    ``path`` with ``os.replace``; the directory is fsynced too. On any error the temporary file is
    removed and the old ``path`` (if any) is untouched.

    Args:
        path: the destination file; its parent directory must exist.
        data: the complete new contents.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.chmod(tmp, mode)  # mkstemp makes it private; keep the old file's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temp file + fsync + ``os.replace``).

    Args:
        path: the destination file; its parent directory must exist.
        obj: anything ``json.dumps`` accepts.
        indent: passed to ``json.dumps``; ``None`` for one compact line.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        RunLogError: ``obj`` is not JSON-serializable (nothing is written).
    """
    path = Path(path)
    try:
        text = json.dumps(obj, indent=indent)
    except (TypeError, ValueError) as e:
        raise RunLogError(f"{path}: cannot write as JSON: {e}") from None
    return write_bytes_atomic(path, (text + "\n").encode())


# --------------------------------------------------------------------------- metadata


def _git_revision(cwd: Path | None) -> str | None:
    """``git rev-parse HEAD`` in ``cwd``, or None when git is missing, slow, or it is not a repo."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def _git_dirty(cwd: Path) -> bool | None:
    """Whether the files under ``cwd`` differ from git's ``HEAD``; None when that cannot be told."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def run_metadata(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Versions, platform, git revision and a UTC timestamp describing where a run ran.

    Never fails and never records the host name. Save it with ``write_json_atomic``.

    Args:
        cwd: where to ask git for the revision; by default mamlab's own source folder (the
            revision of the code that ran, not of the folder the command ran in).

    Returns:
        ``{"mamlab_version", "torch_version", "cuda_version", "python_version", "platform",
        "git_revision", "git_dirty", "timestamp"}``; ``git_revision`` (the ``HEAD`` commit),
        ``git_dirty`` (uncommitted changes to mamlab's files) and ``cuda_version`` are None when
        unavailable (e.g. mamlab installed from a wheel); ``timestamp`` is ISO 8601 in UTC.
    """
    from mamlab import __version__  # late: mamlab/__init__ may import this module

    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    return {
        "mamlab_version": __version__,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_revision": _git_revision(where),
        "git_dirty": _git_dirty(where),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- metrics


def _parse_lines(path: Path, data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Parse JSON lines; returns the records and the byte length of the complete, valid prefix.

    A last line that is unterminated or not valid JSON is treated as cut short by a crash and
    left out; a bad line anywhere else is an error.
    """
    records: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    # After the final "\n" split yields b""; anything else there is an unterminated last line.
    complete, tail = lines[:-1], lines[-1]
    good = 0
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if number == len(complete) and not tail:
                break  # truncated last line that happened to end in a newline byte
            raise RunLogError(f"{path}: line {number} is not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), int):
            raise RunLogError(f"{path}: line {number} is not an object with an integer 'iteration'")
        records.append(rec)
        good += len(line) + 1
    return records, good


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of ``RUN/metrics.jsonl`` in order, skipping a last line cut short by a crash.

    Args:
        run_dir: the run directory (or the ``metrics.jsonl`` file itself).

    Returns:
        One dict per logged line, each with an integer ``"iteration"``.

    Raises:
        RunLogError: the file is missing, or a line other than the last is not valid JSON.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunLogError(f"{path}: cannot read metrics: {e.strerror or e}") from None
    return _parse_lines(path, data)[0]


def flatten_hparams(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"meta_lr": 0.001}, "task": "sinusoid"}`` → ``{"run/meta_lr": 0.001, "task": "sinusoid"}``.

    Numbers and strings stay as they are; booleans, None, lists and anything else become text
    (TensorBoard's HParams tab takes numbers, strings and booleans only).
    """
    flat: dict[str, Any] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, name + "/"))
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            flat[name] = value
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def _scalar(value: Any) -> float | None:
    """``value`` as a float for TensorBoard, or None if it is not a real scalar."""
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _jsonable(value: Any) -> Any:
    """Turn tensors and numpy scalars into plain Python values for JSON."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return value.item()  # numpy scalar
    return value


class RunLogger:
    """Append metrics to ``RUN/metrics.jsonl`` and TensorBoard; use as a context manager.

    Args:
        run_dir: the run directory; created if missing.
        tensorboard: also write the scalars to TensorBoard event files under ``RUN/tensorboard``.
        resume_from_iteration: when resuming from a checkpoint taken at iteration ``k``, drop
            every logged line with iteration > k (rewritten atomically) and make TensorBoard
            discard steps > k. Without it, an existing file is appended to, after removing a
            last line cut short by a crash.
        flush_secs: how often TensorBoard flushes to disk (``metrics.jsonl`` flushes every line).
        hparams: the run's hyperparameters (e.g. ``TrainConfig.to_dict()``), written once to
            TensorBoard: nested dicts are flattened to ``"run/meta_lr"``-style names, lists and
            None become text; they show in the HParams tab and as a table (tag ``config``) in the
            Text tab, at step ``resume_from_iteration`` (0 for a new run).
        hparam_metrics: scalar tags the HParams tab shows next to the hyperparameters.

    Example:
        >>> with RunLogger(run_dir, resume_from_iteration=ckpt.iteration) as log:
        ...     log.log(it, meta_loss=loss.item(), inner_lr=0.01)
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        tensorboard: bool = True,
        *,
        resume_from_iteration: int | None = None,
        flush_secs: int = 10,
        hparams: Mapping[str, Any] | None = None,
        hparam_metrics: Sequence[str] = (),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        if resume_from_iteration is not None and (
            isinstance(resume_from_iteration, bool) or not isinstance(resume_from_iteration, int)
        ):
            raise RunLogError(f"resume_from_iteration must be an int, got {resume_from_iteration!r}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._repair(resume_from_iteration)
        self._file = open(self.path, "ab")  # closed in close()
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # late: slow import

            purge = None if resume_from_iteration is None else resume_from_iteration + 1
            self._writer = SummaryWriter(
                log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge, flush_secs=flush_secs
            )
            if hparams:
                self._write_hparams(flatten_hparams(hparams), hparam_metrics, resume_from_iteration or 0)

    def _write_hparams(self, flat: dict[str, Any], metrics: Sequence[str], step: int) -> None:
        """The hyperparameters into this run's own event file: HParams tab, and a table in the Text tab."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        assert self._writer is not None
        writer = self._writer._get_file_writer()
        # written into the run's own directory (add_hparams would start a separate run beside it)
        for summary in hparams_summaries(flat, {m: 0.0 for m in metrics}):
            writer.add_summary(summary, step)
        rows = "\n".join(f"| {k} | {v} |" for k, v in flat.items())
        self._writer.add_text("config", "| option | value |\n|---|---|\n" + rows, step)
        self._writer.flush()

    def _repair(self, resume_from_iteration: int | None) -> None:
        """Cut a crash-truncated last line and, when resuming, the lines past the resume point."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        records, good = _parse_lines(self.path, data)
        if resume_from_iteration is None:
            if good < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(good)
            return
        kept = [r for r in records if r["iteration"] <= resume_from_iteration]
        if len(kept) < len(records) or good < len(data):
            text = "".join(json.dumps(r) + "\n" for r in kept)
            write_bytes_atomic(self.path, text.encode())

    def log(self, iteration: int, *, tensorboard: bool = True, **metrics: Any) -> None:
        """Append ``{"iteration": iteration, **metrics}`` as one line; real scalars also go to TensorBoard.

        Values may be numbers, 0-d or one-element tensors, numpy scalars, strings, or anything
        else JSON accepts (non-scalars are skipped for TensorBoard). NaN and infinity are written
        as Python's ``json`` writes them (``NaN``, ``Infinity``). Names may contain ``/`` to group
        TensorBoard charts, e.g. ``log(k, **{"train/loss": x})``. ``tensorboard=False`` writes the
        line to ``metrics.jsonl`` only: TensorBoard's writer is slow (its records are checksummed
        in pure Python on a background thread that holds the interpreter), so a fast training loop
        sends it only some iterations (``mamlab.train``: ``TENSORBOARD_POINTS``).

        Raises:
            RunLogError: the logger is closed, ``iteration`` is not an int, a metric is called
                ``iteration`` or ``tensorboard`` (``tensorboard`` must be a bool), or a value is not
                JSON-serializable (nothing is written).
        """
        if self._file is None:
            raise RunLogError(f"{self.path}: log() on a closed RunLogger")
        if isinstance(iteration, bool) or not isinstance(iteration, int):
            raise RunLogError(f"{self.path}: iteration must be an int, got {iteration!r}")
        if not isinstance(tensorboard, bool):
            raise RunLogError(f"{self.path}: tensorboard must be True or False, got {tensorboard!r} "
                              "(it is not a metric name)")
        values = {name: _jsonable(v) for name, v in metrics.items()}
        try:
            line = json.dumps({"iteration": iteration, **values})
        except (TypeError, ValueError) as e:
            raise RunLogError(f"{self.path}: metrics at iteration {iteration} are not JSON: {e}") from None
        self._file.write((line + "\n").encode())
        self._file.flush()
        if self._writer is not None and tensorboard:
            for name, v in metrics.items():
                x = _scalar(v)
                if x is not None:
                    self._writer.add_scalar(name, x, iteration)

    def flush(self) -> None:
        """Flush TensorBoard's buffered events (``metrics.jsonl`` is always flushed)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close both files; further ``log`` calls raise. Safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- what --force may delete

#: What a run directory written by mamlab holds; anything else in it belongs to somebody else.
RUN_ENTRIES = frozenset({"config.json", "metadata.json", "metrics.jsonl", "tensorboard", "checkpoints",
                         "model.safetensors", "algorithm.safetensors", ".lock", "sweep_eval.json"})
#: The file a writer of a run directory holds an exclusive lock on.
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on a run directory, so that one process alone writes it.

    ``fcntl.flock`` on ``RUN/.lock``: the operating system releases it when the process ends,
    however it ends (SIGKILL included), so a crashed run never leaves a stale lock. A second writer
    gets a one-line error naming the process that holds the lock. Readers (``eval``, ``analyze``)
    do not lock. Where ``fcntl`` does not exist (Windows) the lock is not taken.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the directory and the lock file if needed) or raise MamlabError."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise MamlabError(f"{str(self.path.parent)!r} is being written by {holder}; one process at a "
                              "time may write a run: wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go of the lock (the file stays: it is part of the run directory)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_mamlab_run(path: Path) -> bool:
    """Whether ``path`` holds a run mamlab wrote: its ``config.json`` and ``metadata.json`` naming mamlab."""
    try:
        meta = json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return (path / "config.json").is_file() and isinstance(meta, dict) and "mamlab_version" in meta


def check_replaceable(path: Path, what: str, recognised: bool, allowed: frozenset[str] | None = None,
                      suffixes: tuple[str, ...] = ()) -> None:
    """One-line error unless ``--force`` may delete ``path``: mamlab's own ``what`` and nothing else.

    Never the current directory or a folder holding it, nor the home or root folder; never a
    folder that is not a ``what`` mamlab wrote (``recognised``); never one that also holds other
    entries than ``allowed`` names (or files ending in ``suffixes``).
    """
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    protected = (cwd, *cwd.parents, Path.home().resolve(), Path(resolved.anchor))
    if resolved in protected:
        raise MamlabError(f"--force will not delete {str(path)!r}: it is the current directory, the home "
                          "folder or a folder that holds them; choose another output directory")
    if not recognised:
        raise MamlabError(f"--force replaces only a {what} written by mamlab, and {str(path)!r} holds other "
                          "files; nothing was deleted: choose another output directory")
    if allowed is not None:
        foreign = sorted(e.name for e in path.iterdir() if e.name not in allowed
                         and not (suffixes and e.is_file() and e.name.endswith(suffixes)))
        if foreign:
            raise MamlabError(f"--force will not delete {str(path)!r}: besides a mamlab {what} it holds "
                              f"{foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}; "
                              "move them out or choose another output directory")


def clear_directory(path: Path, keep: frozenset[str] = frozenset()) -> None:
    """Delete every entry of ``path`` but those named in ``keep`` (once ``check_replaceable`` agreed).

    A symlink is removed, never followed.
    """
    for entry in path.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
