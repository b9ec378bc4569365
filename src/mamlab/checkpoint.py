"""Training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

On-disk layout of a run directory (``RUN``)::

    RUN/checkpoints/iter_000500/weights.safetensors   model, optimizer and RNG tensors
    RUN/checkpoints/iter_000500/state.json            iteration, config, metrics, optimizer
                                                      param_groups, versions, weights' SHA-256
    RUN/checkpoints/iter_001000/...
    RUN/checkpoints/latest                            one line: the newest checkpoint's name
    RUN/model.safetensors                             the final model (``save_model``)

Tensor keys in ``weights.safetensors`` are namespaced: ``model/<name>``, ``rng/<name>``,
``optimizer/...`` and ``extra/...`` (tensors found inside the optimizer state or ``extra``,
referenced from ``state.json`` by key).

Crash safety: a checkpoint is written into a hidden temporary directory next to its final place
(``RUN/checkpoints/.tmp-...``), every file and the directory are fsynced, then it is renamed into
place with ``os.replace`` and only then is ``latest`` updated (itself via temp file +
``os.replace``). A crash at any moment, SIGKILL included, leaves ``latest`` naming a complete
checkpoint; leftover temporary directories are ignored and removed by the next save. One
process writes to a run directory at a time.

Loading reads only safetensors and JSON (nothing is unpickled) and checks the format version
and the weights' SHA-256; any problem is a one-line ``CheckpointError`` naming the file.

Example:
    >>> save_checkpoint(run_dir, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
    ...                 rng_states=capture_rng_states({"tasks": gen}), iteration=500,
    ...                 config=config, metrics={"meta_loss": 0.12})
    >>> ckpt = load_checkpoint(run_dir)                # the latest checkpoint
    >>> ckpt.restore(model, opt)                       # checks shapes, loads both state dicts
    >>> restore_rng_states(ckpt.rng_states, {"tasks": gen})
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from mamlab.errors import MamlabError, StorageError
from mamlab.files import GIB, KIB, MIB, read_regular, read_regular_text
from mamlab.runlog import _fsync_dir, write_bytes_atomic

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "check_model_state",
    "checkpoint_name",
    "save_model",
    "load_model",
    "capture_rng_states",
    "restore_rng_states",
]

FORMAT_VERSION = 1
"""Version of the checkpoint layout; loading a checkpoint of another version is an error."""

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"
#: SHA-256 of every other file of a checkpoint, written last: an edited or damaged file is caught.
SUMS_FILE = "SHA256SUMS"
_NAME = re.compile(r"^iter_(\d+)$")


class CheckpointError(MamlabError):
    """A checkpoint that cannot be written, read or used; the message names the file and the problem."""


class CheckpointWriteError(CheckpointError, StorageError):
    """Writing a checkpoint or model failed on the disk (full, read-only): the CLI's exit status 3."""


@dataclass
class Checkpoint:
    """One loaded checkpoint; tensors are on the CPU.

    Attributes:
        path: the checkpoint directory (``RUN/checkpoints/iter_NNNNNN``).
        iteration: the training iteration it was taken at.
        model_state: the model's ``state_dict``.
        optimizer_state: the optimizer's ``state_dict`` (for ``optimizer.load_state_dict``), or None.
        rng_states: named RNG state tensors (see ``capture_rng_states``).
        config: the run configuration, as saved.
        metrics: the metrics saved with it (a dict or a list of dicts).
        extra: anything else saved with it (tensors allowed), or None.
        format_version, mamlab_version, torch_version, created: provenance from ``state.json``.
    """

    path: Path
    iteration: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    rng_states: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] | dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    mamlab_version: str = ""
    torch_version: str = ""
    created: str = ""

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Load the saved state into ``model`` (after ``check_model_state``) and ``optimizer``.

        Raises:
            CheckpointError: the tensors do not match the model, or an optimizer is given but the
                checkpoint has no optimizer state, or the optimizer rejects it.
        """
        check_model_state(model.state_dict(), self)
        model.load_state_dict(self.model_state)
        if optimizer is None:
            return
        if self.optimizer_state is None:
            raise CheckpointError(f"{self.path}: has no optimizer state to restore")
        try:
            optimizer.load_state_dict(self.optimizer_state)
        except (ValueError, KeyError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{self.path}: optimizer state does not fit the optimizer: {msg}") from None


# --------------------------------------------------------------------------- tensors <-> JSON


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj``: tensors move to ``tensors[key...]`` and are left as references.

    Tuples and dicts with non-string keys (an optimizer's integer parameter ids) are tagged so
    that ``_decode`` restores them exactly.
    """
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise TypeError(f"{key}: dict keys must be str or int")
        return {"__items__": [[k, _encode(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: cannot save a {type(obj).__name__}")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``_encode``."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached copies that share no memory (safetensors refuses shared tensors)."""
    return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}


def _check_tensor_dict(name: str, d: Mapping[str, Any]) -> None:
    """Raise CheckpointError unless ``d`` maps strings to tensors."""
    for k, v in d.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{name} must map str to Tensor; entry {k!r} is a {type(v).__name__}")


# --------------------------------------------------------------------------- save


def _versions() -> dict[str, str]:
    """mamlab and torch versions for provenance."""
    from mamlab import __version__  # late: mamlab/__init__ may import this module

    return {"mamlab_version": __version__, "torch_version": torch.__version__}


def _write_fsynced(path: Path, data: bytes) -> None:
    """Write a new file and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_dir(path: Path) -> None:
    """Remove a directory so that a partly removed one never looks like a checkpoint."""
    trash = path.with_name(f".tmp-del-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def checkpoint_name(iteration: int) -> str:
    """The directory name of the checkpoint at ``iteration``: ``iter_000500``."""
    return f"iter_{iteration:06d}"


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    model_state: Mapping[str, torch.Tensor],
    iteration: int,
    optimizer_state: Mapping[str, Any] | None = None,
    rng_states: Mapping[str, torch.Tensor] | None = None,
    config: Mapping[str, Any] | None = None,
    metrics: list[dict[str, Any]] | dict[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``RUN/checkpoints/iter_NNNNNN/`` atomically and point ``RUN/checkpoints/latest`` at it.

    Args:
        run_dir: the run directory; created if missing.
        model_state: ``model.state_dict()``.
        iteration: the training iteration (>= 0); names the checkpoint. Saving an iteration that
            already has a checkpoint replaces it (the one step that is not atomic: a crash right
            then loses that iteration, and ``latest_checkpoint`` falls back to the newest other one).
        optimizer_state: ``optimizer.state_dict()``; tensors go to safetensors, the rest to JSON.
        rng_states: named RNG state tensors, e.g. from ``capture_rng_states``.
        config: the run configuration; must be plain JSON (tuples come back as lists).
        metrics: metrics to keep with the checkpoint; plain JSON.
        extra: anything else: JSON values, tuples and tensors (tensors go to safetensors).
        keep_last: keep only the newest ``keep_last`` checkpoints, deleting older ones after the
            new one is in place. ``None`` (the default) keeps them all, for analysis over training.

    Returns:
        The new checkpoint directory.

    Raises:
        CheckpointError: a value cannot be saved, or writing failed (the previous ``latest`` is intact).
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"iteration must be an int >= 0, got {iteration!r}")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    ):
        raise CheckpointError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    _check_tensor_dict("model_state", model_state)
    _check_tensor_dict("rng_states", rng_states or {})

    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model/{k}": v for k, v in model_state.items()})
    tensors.update({f"rng/{k}": v for k, v in (rng_states or {}).items()})
    try:
        optim_json = None if optimizer_state is None else _encode(dict(optimizer_state), "optimizer", tensors)
        extra_json = None if extra is None else _encode(dict(extra), "extra", tensors)
    except TypeError as e:
        raise CheckpointError(f"cannot save checkpoint: {e}") from None
    try:
        weights = _st_save(_prepare(tensors))
    except (SafetensorError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot save checkpoint tensors: {e}") from None
    state = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        **_versions(),
        "created": _now(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "model_keys": list(model_state),
        "rng_keys": list(rng_states or {}),
        "optimizer": optim_json,
        "config": dict(config or {}),
        "metrics": metrics if metrics is not None else {},
        "extra": extra_json,
    }
    try:
        state_bytes = (json.dumps(state, indent=2) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save checkpoint: config or metrics are not JSON: {e}") from None

    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(ckpt_root)
    name = checkpoint_name(iteration)
    final = ckpt_root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckpt_root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _write_fsynced(tmp / WEIGHTS_FILE, weights)
        _write_fsynced(tmp / STATE_FILE, state_bytes)
        _write_fsynced(tmp / SUMS_FILE, _sums({WEIGHTS_FILE: weights, STATE_FILE: state_bytes}))
        _fsync_dir(tmp)
        if final.exists():
            _remove_dir(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        write_bytes_atomic(ckpt_root / LATEST_FILE, (name + "\n").encode())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"{final}: writing the checkpoint failed ({e.strerror or e}); the "
                                   "previous checkpoint is intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != final:
                _remove_dir(old)
    return final


def _sums(files: Mapping[str, bytes]) -> bytes:
    """``sha256sum``'s format: one ``<hex>  <name>`` line per file."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items()).encode()


def _check_sums(ckpt: Path, state_bytes: bytes, state: Mapping[str, Any]) -> None:
    """Every file of the checkpoint against ``SHA256SUMS`` (mamlab 0.1.0 wrote none: its state.json
    is then covered only by its own weights hash, as 0.1.0 checked it)."""
    sums_path = ckpt / SUMS_FILE
    if not sums_path.is_file():
        if str(state.get("mamlab_version", "")).startswith("0.1."):
            return
        raise CheckpointError(f"{sums_path}: missing, so {STATE_FILE} cannot be checked (damaged checkpoint)")
    try:
        lines = read_regular_text(sums_path, 64 * KIB, "a checksum list", CheckpointError).splitlines()
        recorded = {name: digest for digest, name in (line.split("  ", 1) for line in lines if line)}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{sums_path}: unreadable: {e}") from None
    if recorded.get(STATE_FILE) != hashlib.sha256(state_bytes).hexdigest():
        raise CheckpointError(f"{ckpt / STATE_FILE}: contents do not match {SUMS_FILE} (edited or corrupted)")
    if recorded.get(WEIGHTS_FILE) != state["weights_sha256"]:
        raise CheckpointError(f"{sums_path}: does not match the weights recorded in {STATE_FILE}")


def _now() -> str:
    """The current UTC time, ISO 8601."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _remove_stale_temps(ckpt_root: Path) -> None:
    """Delete temporary directories and files left by a writer that crashed."""
    for p in ckpt_root.glob(".tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------- find


def list_checkpoints(run_dir: str | os.PathLike[str], most: int | None = None) -> list[Path]:
    """The complete checkpoint directories of a run, oldest (lowest iteration) first.

    A directory counts if it is named ``iter_N`` and holds both files; contents are not checked
    (``load_checkpoint`` does that). A run with no checkpoints gives ``[]``. With ``most`` (>= 2),
    at most that many, evenly spaced over the run, the first and the last included.
    """
    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 2):
        raise MamlabError(f"most must be an integer >= 2 (the first and the last checkpoint), got {most!r}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / WEIGHTS_FILE).is_file() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    paths = [p for _, p in sorted(found)]
    if most is not None and len(paths) > most:
        paths = [paths[i] for i in sorted({round(i * (len(paths) - 1) / (most - 1)) for i in range(most)})]
    return paths


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``RUN/checkpoints/latest`` names, or None if the run has no checkpoint.

    If the pointer is missing or names no complete checkpoint (a crash between two steps of a
    save), the highest-iteration complete checkpoint is returned instead.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        name = read_regular_text(root / LATEST_FILE, KIB, "a checkpoint pointer", CheckpointError).strip()
    except (OSError, CheckpointError):  # missing or not a pointer: fall back to the newest checkpoint
        name = ""
    target = root / name
    if _NAME.match(name) and (target / WEIGHTS_FILE).is_file() and (target / STATE_FILE).is_file():
        return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _resolve(path: Path) -> Path:
    """The checkpoint directory meant by a run dir, a checkpoint dir, or a file inside one."""
    if path.is_file():
        return path.parent
    if (path / STATE_FILE).exists() or (path / WEIGHTS_FILE).exists() or _NAME.match(path.name):
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if path.name == CHECKPOINTS_DIR and not (path / CHECKPOINTS_DIR).is_dir():
        path = path.parent
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no checkpoint found (expected {path / CHECKPOINTS_DIR}/iter_*)")
    return latest


# --------------------------------------------------------------------------- load


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint: the latest of a run directory, or a given checkpoint directory or file.

    Reads only JSON and safetensors. Checks the format version, the weights' SHA-256 and that
    every tensor ``state.json`` refers to is present.

    Args:
        path: a run directory (its latest checkpoint is loaded), a checkpoint directory
            ``RUN/checkpoints/iter_NNNNNN``, or either file inside one.

    Returns:
        The ``Checkpoint``, tensors on the CPU.

    Raises:
        CheckpointError: nothing to load, a missing, truncated or corrupted file, or another
            format version; the message names the file.
    """
    path = Path(path)
    ckpt = _resolve(path)
    try:
        return _load(ckpt)
    except CheckpointError as e:
        if ckpt == path or ckpt.parent == path:  # a checkpoint was named: it is the one asked for
            raise
        intact = _newest_intact(ckpt)
        if intact is None:
            raise CheckpointError(f"{e}; no intact checkpoint is left in {ckpt.parent}") from None
        raise CheckpointError(
            f"{e}; the newest intact checkpoint is {intact.name}: move {ckpt.name} out of {ckpt.parent} "
            f"and the run continues from {intact.name} (mamlab deletes no checkpoint)") from None


def _newest_intact(damaged: Path) -> Path | None:
    """The highest-iteration checkpoint of ``damaged``'s run, other than it, that loads."""
    for candidate in reversed(list_checkpoints(damaged.parent.parent)):
        if candidate != damaged:
            try:
                _load(candidate)
            except CheckpointError:
                continue
            return candidate
    return None


def _load(ckpt: Path) -> Checkpoint:
    state_path, weights_path = ckpt / STATE_FILE, ckpt / WEIGHTS_FILE
    state, state_bytes = _read_state(state_path)
    _check_sums(ckpt, state_bytes, state)
    try:
        weights = read_regular(weights_path, 256 * GIB, "checkpoint weights", CheckpointError)
    except OSError as e:
        raise CheckpointError(f"{weights_path}: cannot read: {e.strerror or e}") from None
    if hashlib.sha256(weights).hexdigest() != state["weights_sha256"]:
        raise CheckpointError(
            f"{weights_path}: contents do not match the SHA-256 in {STATE_FILE} (truncated or corrupted)"
        )
    try:
        tensors = _st_load(weights)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file: {e}") from None
    try:
        model_state = {k: tensors[f"model/{k}"] for k in state["model_keys"]}
        rng_states = {k: tensors[f"rng/{k}"] for k in state["rng_keys"]}
        optimizer_state = _decode(state["optimizer"], tensors)
        extra = _decode(state["extra"], tensors)
    except KeyError as e:
        raise CheckpointError(
            f"{weights_path}: missing tensor {e.args[0]!r} that {STATE_FILE} refers to"
        ) from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{state_path}: malformed optimizer or extra entry: {e}") from None
    return Checkpoint(
        path=ckpt,
        iteration=state["iteration"],
        model_state=model_state,
        optimizer_state=optimizer_state,
        rng_states=rng_states,
        config=state["config"],
        metrics=state["metrics"],
        extra=extra,
        format_version=state["format_version"],
        mamlab_version=state["mamlab_version"],
        torch_version=state["torch_version"],
        created=state["created"],
    )


_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "iteration": int,
    "mamlab_version": str,
    "torch_version": str,
    "created": str,
    "weights_sha256": str,
    "model_keys": list,
    "rng_keys": list,
    "optimizer": (dict, type(None)),
    "config": dict,
    "metrics": (dict, list),
    "extra": (dict, type(None)),
}


def _read_state(state_path: Path) -> tuple[dict[str, Any], bytes]:
    """Read and validate ``state.json``; also its bytes, for the checksum."""
    try:
        data = read_regular(state_path, 256 * MIB, "a checkpoint state file", CheckpointError)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_path}: cannot read: {e}") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_path}: not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path}: not a JSON object")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path}: checkpoint format version {version!r}, this mamlab reads version {FORMAT_VERSION}"
        )
    for key, kind in _STATE_FIELDS.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{state_path}: missing or malformed field {key!r}")
    return state, data


# --------------------------------------------------------------------------- checks


def check_model_state(
    expected: Mapping[str, torch.Tensor] | nn.Module,
    loaded: Mapping[str, torch.Tensor] | Checkpoint,
    *,
    source: str | os.PathLike[str] | None = None,
) -> None:
    """Raise CheckpointError unless ``loaded`` has exactly ``expected``'s keys, shapes and dtypes.

    Args:
        expected: the model (or its ``state_dict()``) the tensors are meant for.
        loaded: a loaded ``Checkpoint`` or a state dict (e.g. from ``load_model``).
        source: the file to name in the message; a ``Checkpoint``'s own path by default.

    Raises:
        CheckpointError: naming the first missing, unexpected or mismatching key and both shapes
            (or dtypes), e.g. ``.../iter_000500: tensor 'net.0.weight' has shape (40, 1), the
            model expects (40, 2)``.
    """
    if isinstance(expected, nn.Module):
        expected = expected.state_dict()
    if isinstance(loaded, Checkpoint):
        source = source if source is not None else loaded.path
        loaded = loaded.model_state
    where = f"{source}: " if source is not None else ""
    for k, want in expected.items():
        got = loaded.get(k)
        if got is None:
            raise CheckpointError(
                f"{where}missing tensor {k!r} (the model expects shape {tuple(want.shape)})"
            )
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{where}tensor {k!r} has shape {tuple(got.shape)}, the model expects {tuple(want.shape)}"
            )
        if got.dtype != want.dtype:
            raise CheckpointError(
                f"{where}tensor {k!r} has dtype {got.dtype}, the model expects {want.dtype}"
            )
    for k in loaded:
        if k not in expected:
            raise CheckpointError(
                f"{where}unexpected tensor {k!r} (shape {tuple(loaded[k].shape)}) not in the model"
            )


# --------------------------------------------------------------------------- final model


def save_model(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write a model's ``state_dict`` to one safetensors file, atomically.

    Args:
        path: the file, conventionally ``RUN/model.safetensors``; its directory is created.
        state_dict: ``model.state_dict()``.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    _check_tensor_dict("state_dict", state_dict)
    metadata = {"format": "pt", "mamlab_format_version": str(FORMAT_VERSION), **_versions()}
    try:
        data = _st_save(_prepare(state_dict), metadata=metadata)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot save model tensors: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return write_bytes_atomic(path, data)
    except OSError as e:
        raise CheckpointWriteError(f"{path}: writing the model failed ({e.strerror or e})") from None


def load_model(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors model file (as ``save_model`` writes) into a CPU ``state_dict``.

    Check it against a model with ``check_model_state(model, state, source=path)``.

    Raises:
        CheckpointError: the file is missing, truncated, not safetensors, or from another
            mamlab format version.
    """
    path = Path(path)
    try:
        data = read_regular(path, 256 * GIB, "a safetensors model file", CheckpointError)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len]) if len(data) >= 8 + header_len else {}
        version = (header.get("__metadata__") or {}).get("mamlab_format_version")
        tensors = _st_load(data)
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {e}"
        ) from None
    if version is not None and version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: model format version {version}, this mamlab reads version {FORMAT_VERSION}"
        )
    return tensors


# --------------------------------------------------------------------------- RNG


def capture_rng_states(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """The global torch RNG state (and CUDA's, if initialized) plus each named generator's state.

    Args:
        generators: e.g. ``{"tasks": task_generator}``; names must not be ``"torch"`` or start
            with ``"cuda"``.

    Returns:
        ``{"torch": ..., "cuda:0": ..., name: ...}``, byte tensors for ``save_checkpoint(rng_states=)``.
    """
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda:{i}"] = s
    for name, g in (generators or {}).items():
        if name == "torch" or name.startswith("cuda"):
            raise CheckpointError(f"generator name {name!r} is reserved; use another name")
        states[name] = g.get_state()
    return states


def restore_rng_states(
    states: Mapping[str, torch.Tensor], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Set the global torch (and CUDA) RNG and each named generator from ``capture_rng_states``'s dict.

    Raises:
        CheckpointError: a named generator has no saved state.
    """
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    for name, s in states.items():
        if name.startswith("cuda:") and torch.cuda.is_available():
            i = int(name.split(":", 1)[1])
            if i < torch.cuda.device_count():
                torch.cuda.set_rng_state(s, i)
    for name, g in (generators or {}).items():
        if name not in states:
            raise CheckpointError(f"no saved RNG state for generator {name!r}; saved: {', '.join(states)}")
        g.set_state(states[name])
