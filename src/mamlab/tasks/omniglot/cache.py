"""The safetensors cache of preprocessed Omniglot images, keyed by the source and the image size.

A cache file holds ``images`` (uint8 ``[characters * drawings, H, W]``, strokes 255) and ``labels``
(the character of each image), with the character names, the drawings per character, the source
path and the cache format in its metadata. Its name is
``<archive>-<size>px-<digest>.safetensors``, the digest covering :func:`fingerprint` of the
source (path, size, mtime), the image size and :data:`CACHE_FORMAT`: a changed source or size is
a new entry. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = [
    "CACHE_FORMAT",
    "cache_file",
    "default_cache_dir",
    "fingerprint",
    "load_cache",
    "save_cache",
]

#: Version of the cache layout; part of every cache key.
CACHE_FORMAT = "1"


def default_cache_dir() -> Path:
    """``$MAMLAB_CACHE_DIR/omniglot``, else ``$XDG_CACHE_HOME/mamlab/omniglot`` (``~/.cache/...``)."""
    if os.environ.get("MAMLAB_CACHE_DIR"):
        return Path(os.environ["MAMLAB_CACHE_DIR"]).expanduser() / "omniglot"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mamlab" / "omniglot"


def fingerprint(path: Path) -> dict:
    """What identifies a source's content cheaply: path, size and mtime (of every file of a folder)."""
    st = path.stat()
    if not path.is_dir():
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    for p in sorted(path.rglob("*.png")):
        s = p.stat()
        h.update(f"{p.relative_to(path).as_posix()}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
    return {"path": str(path.resolve()), "files": h.hexdigest()}


def cache_file(path: Path, image_size: int, cache_dir: Path) -> Path:
    """The cache file in ``cache_dir`` for the source ``path`` preprocessed to ``image_size``."""
    key = json.dumps({"source": fingerprint(path), "image_size": image_size, "format": CACHE_FORMAT},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir / f"{path.name.removesuffix('.zip')}-{image_size}px-{digest}.safetensors"


def save_cache(target: Path, images: torch.Tensor, names: list[str], drawings: int, source: str) -> None:
    """Write ``images`` (uint8 ``[len(names) * drawings, H, W]``) to ``target`` atomically.

    A failure to write is a warning, not an error: the images are still usable.
    """
    from safetensors.torch import save_file

    labels = torch.arange(len(names), dtype=torch.int64).repeat_interleave(drawings)
    meta = {"names": json.dumps(names), "drawings": str(drawings), "source": source,
            "format": CACHE_FORMAT}
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(fd)
        save_file({"images": images.contiguous(), "labels": labels}, tmp, metadata=meta)
        os.replace(tmp, target)  # atomic: concurrent readers see the old file or the whole new one
    except Exception as err:  # noqa: BLE001 - the cache is best effort: a full or read-only disk warns
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # leave no temporary file behind
        warnings.warn(f"could not write the Omniglot cache {target}: {err}", stacklevel=3)


def load_cache(target: Path) -> tuple[torch.Tensor, list[str], int]:
    """Read a cache file: ``(images uint8 [characters * drawings, H, W], names, drawings)``."""
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as f:
        meta = f.metadata()
        images = f.get_tensor("images")
    return images, json.loads(meta["names"]), int(meta["drawings"])
