"""Omniglot (Lake et al. 2015): the official archives, named meta-train/test splits, a vectorized sampler.

Data layout (the official release, https://github.com/brendenlake/omniglot, ``python/``): each
archive ``images_background``, ``images_evaluation``, ``images_background_small1`` and
``images_background_small2`` holds ``<archive>/<Alphabet>/characterNN/*.png``: 105x105 binary
images, black strokes on white, 20 drawings per character. ``all_runs.zip`` holds the 20 runs of
the one-shot challenge (see ``mamlab.tasks.omniglot_runs``). Archives are read in place, from the
``.zip`` or from an extracted folder of the same name under ``root``.

Preprocessing (as Finn et al.'s MAML code): each image is resized to ``image_size`` (28) with
PIL's Lanczos filter (antialiased), inverted so strokes are 1 on a 0 background, and quantized
to uint8. The result is cached as a safetensors file keyed by the source (path, size, mtime) and
the image size, so a second run starts at once. In memory a :class:`CharacterPool` keeps one
float32 tensor ``images [characters, drawings, H, W]``.

Splits (``Omniglot(root, split=...)``):

* ``"minimal"``: meta-train on ``images_background_small1`` + ``images_background_small2``
  (Greek and Latin appear in both and are counted once: 242 distinct characters); meta-test on
  the 20 one-shot runs of ``all_runs.zip``, 20 classes per run and 2 drawings per class (the
  run's training and test image); test episodes draw their classes within one run.
* ``"background"``: meta-train on the 30 background alphabets (964 characters), meta-test on
  the 20 evaluation alphabets (659 characters).
* ``"vinyals"`` (Vinyals et al. 2016, Finn et al. 2017): the 1623 characters of the full
  release, ordered by (archive, alphabet, character), shuffled with ``torch.randperm`` seeded by
  ``seed``; the first ``num_train`` (1200) meta-train, the remaining 423 meta-test. Rotations by
  90, 180 and 270 degrees are extra classes (``rotation_classes``, on by default for this split,
  in every part, as in Finn et al.'s code): 4800 training classes.

``validation_fraction`` holds out that share of the meta-training characters (seeded) for
periodic validation; Finn et al. kept 100 of the 1200 (``validation_fraction=1/12``).

Reference: B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum. Human-level concept learning through
probabilistic program induction. Science 350(6266), 2015.

Example:
    >>> omniglot = Omniglot("~/data/omniglot", split="vinyals", ways=5, validation_fraction=1 / 12)
    >>> batch = omniglot.sample(32, shots=1, queries=15, generator=torch.Generator().manual_seed(0))
    >>> batch.support_x.shape, batch.query_y.shape
    (torch.Size([32, 5, 1, 28, 28]), torch.Size([32, 75]))
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from mamlab.errors import MamlabError, check_choice, check_positive
from mamlab.tasks.base import TaskBatch

__all__ = [
    "ARCHIVES",
    "Archive",
    "CharacterPool",
    "Omniglot",
    "OmniglotTasks",
    "SPLITS",
    "SPLIT_ARCHIVES",
    "decode_png",
    "default_cache_dir",
    "download",
    "load_characters",
    "resize_strokes",
    "safe_extract",
]

SPLITS = ("minimal", "background", "vinyals")
PARTS = ("train", "validation", "test")
VINYALS_TRAIN = 1200
_CACHE_FORMAT = "1"
_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"


@dataclass(frozen=True)
class Archive:
    """One official Omniglot archive: where to fetch it and the hashes that verify it (None: unknown)."""

    name: str
    url: str
    sha256: str | None
    md5: str | None = None


# SHA-256 of the small sets and all_runs measured on the files we hold; for the two full sets only
# the MD5s that torchvision publishes are known, and download() checks those instead.
ARCHIVES: dict[str, Archive] = {
    a.name: a
    for a in (
        Archive("images_background", _URL + "images_background.zip", None,
                "68d2efa1b9178cc56df9314c21c6e718"),
        Archive("images_evaluation", _URL + "images_evaluation.zip", None,
                "6b91aef0f799c5bb55b94e3f2daec811"),
        Archive("images_background_small1", _URL + "images_background_small1.zip",
                "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
                "e704a628b5459e08445c13499850abc4"),
        Archive("images_background_small2", _URL + "images_background_small2.zip",
                "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
                "b75a71a51d3b13f821f212756fe481fd"),
        Archive("all_runs", _URL + "one-shot-classification/all_runs.zip",
                "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325",
                "e8996daecdf12afeeb4a53a179f06b19"),
    )
}

SPLIT_ARCHIVES: dict[str, tuple[str, ...]] = {
    "minimal": ("images_background_small1", "images_background_small2", "all_runs"),
    "background": ("images_background", "images_evaluation"),
    "vinyals": ("images_background", "images_evaluation"),
}

_ENTRY = re.compile(r"(?:^|/)([^/]+)/(character\d+)/([^/]+\.png)$", re.IGNORECASE)


def default_cache_dir() -> Path:
    """``$MAMLAB_CACHE_DIR/omniglot``, else ``$XDG_CACHE_HOME/mamlab/omniglot`` (``~/.cache/...``)."""
    if os.environ.get("MAMLAB_CACHE_DIR"):
        return Path(os.environ["MAMLAB_CACHE_DIR"]).expanduser() / "omniglot"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mamlab" / "omniglot"


# ----------------------------------------------------------------------------------------------
# Images


def decode_png(data: bytes, where: str = "image") -> np.ndarray:
    """Decode one Omniglot PNG to a boolean stroke mask ``[H, W]`` (True where the ink is black)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            gray = np.asarray(im.convert("L"))
    except Exception as err:  # PIL raises many types for a corrupt file
        raise MamlabError(f"cannot decode {where} as a PNG image: {err}") from None
    return gray < 128


def resize_strokes(strokes: np.ndarray, image_size: int = 28) -> np.ndarray:
    """Antialiased (Lanczos) resize of a stroke mask to ``uint8 [image_size, image_size]``, stroke 255."""
    im = Image.fromarray(np.where(strokes, 255, 0).astype(np.uint8), mode="L")
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


class _Reader:
    """Uniform read access to the files of a zip archive or a folder, by relative POSIX name."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.zip = path, None
        if not path.exists():
            raise MamlabError(f"{what} {str(path)!r} does not exist; expected a .zip archive or an "
                              "extracted folder")
        if path.is_dir():
            self.names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            return
        try:
            self.zip = zipfile.ZipFile(path)
            self.names = sorted(n for n in self.zip.namelist() if not n.endswith("/"))
        except (zipfile.BadZipFile, OSError) as err:
            raise MamlabError(f"{what} {str(path)!r} is not a readable zip archive ({err}); expected "
                              "an official Omniglot .zip or an extracted folder") from None

    def read(self, name: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(name)
            return (self.path / name).read_bytes()
        except (OSError, zipfile.BadZipFile, KeyError) as err:
            raise MamlabError(f"cannot read {name!r} from {str(self.path)!r}: {err}") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _fingerprint(path: Path) -> dict:
    """What identifies a source's content cheaply: path, size and mtime (of every file of a folder)."""
    st = path.stat()
    if not path.is_dir():
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    for p in sorted(path.rglob("*.png")):
        s = p.stat()
        h.update(f"{p.relative_to(path).as_posix()}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
    return {"path": str(path.resolve()), "files": h.hexdigest()}


# ----------------------------------------------------------------------------------------------
# Character pools


@dataclass(frozen=True)
class CharacterPool:
    """Classes of images held in memory: ``images [classes, drawings, H, W]`` float32, strokes 1.

    ``names[c]`` names class c (``"Alphabet/characterNN"``); ``groups[c]`` indexes ``group_names``
    (its alphabet, or its run for the one-shot runs), for within-group episodes.
    """

    images: torch.Tensor
    names: tuple[str, ...]
    groups: torch.Tensor
    group_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise MamlabError(f"CharacterPool.images must be [classes, drawings, H, W], got "
                              f"{tuple(self.images.shape)}")
        c = self.images.shape[0]
        if len(self.names) != c or tuple(self.groups.shape) != (c,):
            raise MamlabError(f"CharacterPool has {c} classes of images but {len(self.names)} names and "
                              f"groups of shape {tuple(self.groups.shape)}; they must match")

    @property
    def num_classes(self) -> int:
        """The number of classes (characters)."""
        return self.images.shape[0]

    @property
    def num_drawings(self) -> int:
        """Drawings per class."""
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.num_classes

    def subset(self, indices: torch.Tensor | Sequence[int]) -> CharacterPool:
        """The classes at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return CharacterPool(self.images[idx], tuple(self.names[i] for i in idx.tolist()),
                             self.groups[idx], self.group_names)

    def unique(self) -> CharacterPool:
        """Each class name once (the first occurrence): the small sets share Greek and Latin."""
        seen: dict[str, int] = {}
        for i, n in enumerate(self.names):
            seen.setdefault(n, i)
        if len(seen) == len(self.names):
            return self
        return self.subset(sorted(seen.values()))

    @staticmethod
    def concat(pools: Sequence[CharacterPool]) -> CharacterPool:
        """The classes of all ``pools`` in order; group names are merged by name."""
        shapes = {tuple(p.images.shape[1:]) for p in pools}
        if len(shapes) != 1:
            raise MamlabError(f"cannot join character pools of different [drawings, H, W] shapes: "
                              f"{sorted(shapes)}")
        group_names: dict[str, int] = {}
        groups = []
        for p in pools:
            remap = torch.tensor([group_names.setdefault(g, len(group_names)) for g in p.group_names],
                                 dtype=torch.long)
            groups.append(remap[p.groups] if len(remap) else p.groups)
        return CharacterPool(torch.cat([p.images for p in pools]),
                             tuple(n for p in pools for n in p.names),
                             torch.cat(groups), tuple(group_names))


def _cache_file(path: Path, image_size: int, cache_dir: Path) -> Path:
    key = json.dumps({"source": _fingerprint(path), "image_size": image_size, "format": _CACHE_FORMAT},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir / f"{path.name.removesuffix('.zip')}-{image_size}px-{digest}.safetensors"


def _pool_from_uint8(images: torch.Tensor, names: list[str], drawings: int) -> CharacterPool:
    alphabets = [n.split("/")[0] for n in names]
    group_names = tuple(dict.fromkeys(alphabets))
    index = {g: i for i, g in enumerate(group_names)}
    size = images.shape[-1]
    float_images = images.view(len(names), drawings, size, size).float().div_(255.0)
    return CharacterPool(float_images, tuple(names), torch.tensor([index[a] for a in alphabets],
                                                                   dtype=torch.long), group_names)


def load_characters(path: str | Path, image_size: int = 28, cache_dir: str | Path | None = None,
                    cache: bool = True) -> CharacterPool:
    """Read one Omniglot image archive (zip or extracted folder) into a :class:`CharacterPool`.

    Args:
        path: ``images_background.zip`` (or any of the four image archives), or its extracted folder;
            every ``<Alphabet>/characterNN/*.png`` below it is read.
        image_size: side of the resized square images (28 in the literature).
        cache_dir: where the preprocessed safetensors file goes (default: ``default_cache_dir()``).
        cache: False reads and preprocesses the PNGs every time.

    Returns:
        The characters sorted by ``"Alphabet/characterNN"``, drawings sorted by file name. Every
        character keeps the same number of drawings: the smallest count found (20 in the official
        release); extra drawings of other characters are dropped, with a warning.
    """
    check_positive("image_size", image_size, integer=True)
    path = Path(path).expanduser()
    reader = _Reader(path, "Omniglot archive")
    target = None
    if cache:
        target = _cache_file(path, image_size, Path(cache_dir) if cache_dir else default_cache_dir())
        if target.is_file():
            try:
                return _load_cache(target)
            except Exception:  # a torn or stale file: rebuild it below
                pass
    try:
        chars: dict[str, list[str]] = {}
        for name in reader.names:
            m = _ENTRY.search(name)
            if m:
                chars.setdefault(f"{m.group(1)}/{m.group(2)}", []).append(name)
        if not chars:
            raise MamlabError(f"{str(path)!r} is not an Omniglot archive: no <Alphabet>/characterNN/*.png "
                              "entries found")
        names = sorted(chars)
        counts = [len(chars[n]) for n in names]
        drawings = min(counts)
        if max(counts) != drawings:
            warnings.warn(f"{path}: characters have {drawings} to {max(counts)} drawings; keeping the "
                          f"first {drawings} (by file name) of each", stacklevel=2)
        images = np.empty((len(names) * drawings, image_size, image_size), dtype=np.uint8)
        k = 0
        for n in names:
            for entry in sorted(chars[n])[:drawings]:
                images[k] = resize_strokes(decode_png(reader.read(entry), f"{path}:{entry}"), image_size)
                k += 1
    finally:
        reader.close()
    tensor = torch.from_numpy(images)
    if target is not None:
        _save_cache(target, tensor, names, drawings, str(path))
    return _pool_from_uint8(tensor, names, drawings)


def _save_cache(target: Path, images: torch.Tensor, names: list[str], drawings: int, source: str) -> None:
    from safetensors.torch import save_file

    labels = torch.arange(len(names), dtype=torch.int64).repeat_interleave(drawings)
    meta = {"names": json.dumps(names), "drawings": str(drawings), "source": source,
            "format": _CACHE_FORMAT}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(fd)
        save_file({"images": images.contiguous(), "labels": labels}, tmp, metadata=meta)
        os.replace(tmp, target)  # atomic: concurrent readers see the old file or the whole new one
    except OSError as err:
        warnings.warn(f"could not write the Omniglot cache {target}: {err}", stacklevel=3)


def _load_cache(target: Path) -> CharacterPool:
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as f:
        meta = f.metadata()
        images = f.get_tensor("images")
    return _pool_from_uint8(images, json.loads(meta["names"]), int(meta["drawings"]))


# ----------------------------------------------------------------------------------------------
# The episode sampler


class OmniglotTasks:
    """N-way K-shot classification tasks drawn from a :class:`CharacterPool`, vectorized over tasks.

    Each task picks ``ways`` distinct classes and ``shots + queries`` distinct drawings of each,
    all T tasks at once (random keys + ``topk``/``argsort``, one gather); labels are 0..N-1 in a
    random class order per task.

    Args:
        pool: the classes to draw from.
        ways: classes per task N.
        rotate: augmentation: rotate each class of a task by a random multiple of 90 degrees.
        rotation_classes: rotations by 90, 180 and 270 degrees are extra classes (4x the classes).
        within_groups: all classes of a task come from one group (alphabet, or one-shot run),
            picked uniformly among the groups with at least ``ways`` classes.
        affine: augmentation: distort every image by its own random affine map (see :func:`random_affine`).
    """

    kind = "classification"
    name = "omniglot"

    def __init__(self, pool: CharacterPool, ways: int = 5, *, rotate: bool = False,
                 rotation_classes: bool = False, within_groups: bool = False, affine: bool = False) -> None:
        check_positive("ways", ways, integer=True)
        self.pool, self.ways, self.affine = pool, int(ways), bool(affine)
        self.rotate, self.rotation_classes, self.within_groups = bool(rotate), bool(rotation_classes), \
            bool(within_groups)
        self.in_channels, self.image_size = 1, pool.images.shape[-1]
        reps = 4 if self.rotation_classes else 1
        self._class_groups = pool.groups.repeat(reps)  # virtual class r*C + c is character c rotated r*90
        pixels = torch.arange(pool.images.shape[-2] * pool.images.shape[-1]).view(pool.images.shape[-2:])
        # _turns[r, p]: the source pixel of output pixel p under r quarter turns (torch.rot90)
        self._turns = torch.stack([torch.rot90(pixels, r, dims=(-2, -1)).flatten() for r in range(4)])
        if self.within_groups:
            sizes = torch.bincount(self._class_groups)
            self._eligible = torch.nonzero(sizes >= self.ways).flatten()
            if len(self._eligible) == 0:
                raise MamlabError(f"ways={self.ways} exceeds the largest group of the pool "
                                  f"({int(sizes.max()) if len(sizes) else 0} classes); within-group tasks "
                                  "need ways <= that")
        elif self.ways > self.num_classes:
            raise MamlabError(f"ways={self.ways} exceeds the {self.num_classes} classes available; "
                              f"use ways <= {self.num_classes}")

    @property
    def num_classes(self) -> int:
        """Classes available, counting rotations when they are classes."""
        return self.pool.num_classes * (4 if self.rotation_classes else 1)

    def sample(self, num_tasks: int, shots: int, queries: int,
               generator: torch.Generator | None = None) -> TaskBatch:
        """Draw ``num_tasks`` tasks: ``support_x [T, N*K, 1, H, W]``, ``support_y [T, N*K]`` and query.

        Examples are ordered class by class (``y = [0]*K + [1]*K + ...``).
        """
        check_positive("num_tasks", num_tasks, integer=True)
        check_positive("shots", shots, integer=True)
        check_positive("queries", queries, integer=True)
        draws, limit = shots + queries, self.pool.num_drawings
        if draws > limit:
            raise MamlabError(f"shots + queries = {draws} exceeds the {limit} drawings per class; "
                              f"use shots + queries <= {limit}")
        t, n, c = num_tasks, self.ways, self.pool.num_classes
        keys = torch.rand(t, self.num_classes, generator=generator)
        if self.within_groups:
            pick = torch.randint(len(self._eligible), (t,), generator=generator)
            chosen = self._eligible[pick]
            keys.masked_fill_(self._class_groups.unsqueeze(0) != chosen.unsqueeze(1), -1.0)
        classes = keys.topk(n, dim=1).indices  # a uniform random N-subset, in random order
        drawing = torch.rand(t, n, limit, generator=generator).argsort(dim=-1)[..., :draws]
        rows = ((classes % c) * limit).unsqueeze(-1) + drawing  # [T, N, K+Q] rows of the flat pool
        flat = self.pool.images.flatten(0, 1).flatten(1)  # [C*D, H*W], a view
        h, w = self.pool.images.shape[-2:]
        rotation = None
        if self.rotate or self.rotation_classes:
            rotation = classes // c  # [T, N], in quarter turns
            if self.rotate:
                rotation = (rotation + torch.randint(4, (t, n), generator=generator)) % 4

        def gather(r: torch.Tensor) -> torch.Tensor:
            # index_select is far faster than 2-D fancy indexing; a rotation is a pixel permutation,
            # applied by one gather (fewer, larger ops hold up best when the cores are busy)
            x = flat.index_select(0, r.reshape(-1))
            if rotation is not None:
                x = x.gather(1, self._turns.index_select(0, rotation.repeat_interleave(r.shape[-1])))
            return x.view(t * n, r.shape[-1], h, w)

        support, query = gather(rows[..., :shots]), gather(rows[..., shots:])
        if self.affine:
            support, query = (random_affine(x.flatten(0, 1).unsqueeze(1), generator).view_as(x)
                              for x in (support, query))
        y = torch.arange(n).view(1, n, 1)
        return TaskBatch(support.view(t, n * shots, 1, h, w), y.expand(t, n, shots).reshape(t, n * shots),
                         query.view(t, n * queries, 1, h, w), y.expand(t, n, queries).reshape(t, n * queries))

    def __repr__(self) -> str:
        return (f"OmniglotTasks(classes={self.num_classes}, drawings={self.pool.num_drawings}, "
                f"ways={self.ways}, rotate={self.rotate}, within_groups={self.within_groups}, "
                f"affine={self.affine})")


#: Ranges of :func:`random_affine`, as in Koch et al.'s Siamese networks for Omniglot (2015).
AFFINE_RANGES = {"rotation_degrees": 10.0, "shear": 0.3, "scale": (0.8, 1.2), "shift_pixels": 2.0}


def affine_warp(images: torch.Tensor, angle: torch.Tensor, shear: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor) -> torch.Tensor:
    """Warp each image ``[B, 1, H, W]`` by x -> R(angle) S(shear) diag(scale) x + shift (bilinear, zero fill).

    Per image: ``angle [B]`` in radians (counter-clockwise as displayed), ``shear [B, 2]`` (x, y),
    ``scale [B, 2]`` (x, y) and ``shift [B, 2]`` in pixels (x right, y down). One
    ``affine_grid``/``grid_sample`` call for the batch.
    """
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    # grid coordinates have y pointing down, so a counter-clockwise turn as displayed is R(-angle)
    rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    shearing = torch.eye(2, dtype=images.dtype).repeat(b, 1, 1)
    shearing[:, 0, 1], shearing[:, 1, 0] = shear[:, 0], shear[:, 1]
    linear = rotation @ shearing @ torch.diag_embed(scale)
    offset = shift * torch.tensor([2.0 / w, 2.0 / h], dtype=images.dtype)  # the image spans [-1, 1]
    # affine_grid maps output to input coordinates: invert the forward map x -> A x + t
    inverse = torch.linalg.inv(linear)
    theta = torch.cat([inverse, -(inverse @ offset.unsqueeze(-1))], -1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)


def random_affine(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Distort each image ``[B, 1, H, W]`` by its own random affine map (:func:`affine_warp`).

    Rotation uniform in ±10 degrees, shear ±0.3 in x and y, scale 0.8-1.2 in x and y
    independently, shift ±2 pixels in x and y: the ranges of :data:`AFFINE_RANGES`.
    """
    b, r = images.shape[0], AFFINE_RANGES

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator, dtype=images.dtype)

    angle = uniform(1.0, -1.0) * math.radians(r["rotation_degrees"])
    shear, scale = uniform(-r["shear"], r["shear"], 2), uniform(*r["scale"], 2)
    return affine_warp(images, angle, shear, scale, uniform(-1.0, 1.0, 2) * r["shift_pixels"])


# ----------------------------------------------------------------------------------------------
# Splits


def _locate(root: Path, name: str) -> Path | None:
    for candidate in (root / f"{name}.zip", root / name):
        if candidate.exists():
            return candidate
    return None


def _validation_split(pool: CharacterPool, fraction: float, seed: int) -> tuple[CharacterPool, CharacterPool]:
    count = max(1, round(fraction * len(pool)))
    if count >= len(pool):
        raise MamlabError(f"validation_fraction={fraction} leaves no meta-training characters out of "
                          f"{len(pool)}; use a smaller fraction")
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))
    val, train = perm[:count].sort().values, perm[count:].sort().values
    return pool.subset(train), pool.subset(val)


class Omniglot:
    """Omniglot meta-train/validation/test task families for one named split; samples meta-training tasks.

    Args:
        root: folder holding the archives (``images_background.zip`` or ``images_background/``, ...);
            None: ``default_cache_dir()``.
        split: ``"minimal"``, ``"background"`` or ``"vinyals"`` (see the module docstring).
        ways: classes per task N of ``sample`` and of ``tasks(part)``.
        validation_fraction: share of the meta-training characters held out for validation (seeded).
        seed: seeds the ``vinyals`` shuffle and the validation hold-out.
        image_size: side of the square images (28).
        rotate: random multiple-of-90-degree rotation per class, for meta-training tasks only.
        affine: random affine distortion per image (:func:`random_affine`), for meta-training tasks only.
        rotation_classes: rotations as extra classes in every part (default: only for ``vinyals``).
        within_alphabet: train/validation/test tasks take all classes from one alphabet
            (``minimal``'s test tasks always come from one run).
        num_train: ``vinyals`` only: meta-training characters (1200).
        cache_dir: preprocessed-image cache (default ``default_cache_dir()``); ``cache=False`` skips it.
        download: fetch missing archives into ``root`` with :func:`download`.
    """

    kind = "classification"
    name = "omniglot"

    def __init__(self, root: str | Path | None = None, split: str = "background", ways: int = 5, *,
                 validation_fraction: float = 0.0, seed: int = 0, image_size: int = 28,
                 rotate: bool = False, rotation_classes: bool | None = None, within_alphabet: bool = False,
                 affine: bool = False, num_train: int | None = None, cache_dir: str | Path | None = None,
                 cache: bool = True, download: bool = False) -> None:
        check_choice("split", split, SPLITS)
        check_positive("ways", ways, integer=True)
        check_positive("image_size", image_size, integer=True)
        if not 0.0 <= float(validation_fraction) < 1.0:
            raise MamlabError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
        if num_train is not None:
            check_positive("num_train", num_train, integer=True)
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.split, self.ways, self.seed = split, int(ways), int(seed)
        self.rotate, self.within_alphabet, self.affine = bool(rotate), bool(within_alphabet), bool(affine)
        self.rotation_classes = split == "vinyals" if rotation_classes is None else bool(rotation_classes)
        if not self.root.is_dir():
            if not download:
                raise MamlabError(f"Omniglot root {str(self.root)!r} is not a folder; expected one holding "
                                  f"{', '.join(n + '.zip' for n in SPLIT_ARCHIVES[split])}")
        sources = {}
        for name in SPLIT_ARCHIVES[split]:
            found = _locate(self.root, name)
            if found is None and download:
                found = _download_archive(name, self.root)
            sources[name] = found
        missing = [n for n, p in sources.items() if p is None]
        if missing:
            raise MamlabError(f"split {split!r} needs {', '.join(missing)} (.zip or extracted folder) in "
                              f"{str(self.root)!r}; pass download=True or place the official archives there")

        def load(name: str) -> CharacterPool:
            return load_characters(sources[name], image_size, cache_dir, cache)

        if split == "minimal":
            from mamlab.tasks.omniglot_runs import load_runs, runs_pool

            train = CharacterPool.concat([load("images_background_small1"),
                                          load("images_background_small2")]).unique()
            test = runs_pool(load_runs(sources["all_runs"], image_size))
        elif split == "background":
            train, test = load("images_background"), load("images_evaluation")
        else:
            full = CharacterPool.concat([load("images_background"), load("images_evaluation")])
            count = VINYALS_TRAIN if num_train is None else int(num_train)
            if count >= len(full):
                raise MamlabError(f"num_train={count} leaves no meta-test characters out of {len(full)}; "
                                  f"use num_train < {len(full)}")
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed))
            train, test = full.subset(perm[:count]), full.subset(perm[count:])
        validation = None
        if validation_fraction > 0:
            train, validation = _validation_split(train, float(validation_fraction), self.seed)
        self.pools: dict[str, CharacterPool | None] = {"train": train, "validation": validation, "test": test}
        self._train = self.tasks("train")

    def tasks(self, part: str = "train", ways: int | None = None) -> OmniglotTasks:
        """The task family of ``part`` (``"train"``, ``"validation"`` or ``"test"``) with ``ways`` classes."""
        check_choice("part", part, PARTS)
        pool = self.pools[part]
        if pool is None:
            raise MamlabError("this Omniglot has no validation characters; pass validation_fraction > 0")
        runs = self.split == "minimal" and part == "test"
        return OmniglotTasks(pool, self.ways if ways is None else ways,
                             rotate=self.rotate and part == "train",
                             rotation_classes=self.rotation_classes and not runs,
                             within_groups=runs or self.within_alphabet,
                             affine=self.affine and part == "train")

    def sample(self, num_tasks: int, shots: int, queries: int,
               generator: torch.Generator | None = None) -> TaskBatch:
        """Draw ``num_tasks`` meta-training tasks (``self.tasks("train").sample``)."""
        return self._train.sample(num_tasks, shots, queries, generator)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v) if v is not None else 0}" for k, v in self.pools.items())
        return f"Omniglot(split={self.split!r}, ways={self.ways}, characters: {sizes})"


# ----------------------------------------------------------------------------------------------
# Download and safe extraction


def safe_extract(zip_path: str | Path, target: str | Path) -> Path:
    """Extract ``zip_path`` into ``target``, refusing (before writing anything) entries that would land
    outside it: absolute paths, ``..`` components, drive letters, symbolic links."""
    zip_path, target = Path(zip_path), Path(target)
    base = target.resolve()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                name = info.filename
                parts = name.replace("\\", "/").split("/")
                dest = (base / name).resolve()
                bad = (name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name)
                       or stat.S_ISLNK(info.external_attr >> 16)
                       or (dest != base and base not in dest.parents))
                if bad:
                    raise MamlabError(f"refusing to extract {str(zip_path)!r}: entry {name!r} would land "
                                      f"outside {str(target)!r}")
            target.mkdir(parents=True, exist_ok=True)
            zf.extractall(target)
    except (zipfile.BadZipFile, OSError) as err:
        raise MamlabError(f"cannot extract {str(zip_path)!r}: {err}") from None
    return target


def _hashes(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _verify(path: Path, archive: Archive, sha256: str | None, record: Path) -> str | None:
    """None if ``path`` matches the expected hash of ``archive``, else why not; records the SHA-256.

    Expected: ``sha256``, else the known SHA-256, else the one recorded in ``<record>.sha256`` at the
    first download (trust on first use), else the known MD5.
    """
    got_sha, got_md5 = _hashes(path)
    recorded = record.with_name(record.name + ".sha256")
    want = sha256 or archive.sha256 or (recorded.read_text().split()[0] if recorded.is_file() else None)
    if want is not None and got_sha != want.lower():
        return f"SHA-256 {got_sha} differs from the expected {want} (recorded in {recorded.name}?)"
    if want is None and archive.md5 is not None and got_md5 != archive.md5:
        return f"MD5 {got_md5} differs from the expected {archive.md5}"
    if not recorded.is_file() or sha256 is not None:
        recorded.write_text(f"{got_sha}  {record.name}\n")
    return None


def download(name: str, cache_dir: str | Path | None = None, *, sha256: str | None = None,
             extract: bool = False, opener: Callable[[str], BinaryIO] | None = None) -> Path:
    """Fetch an official archive into ``cache_dir`` (once) and verify it.

    Args:
        name: ``images_background``, ``images_evaluation``, ``images_background_small1``,
            ``images_background_small2`` or ``all_runs``.
        cache_dir: destination folder (default ``default_cache_dir()``).
        sha256: expected SHA-256; default the known one (``ARCHIVES``), else the MD5 torchvision
            publishes, else the hash recorded in ``<name>.zip.sha256`` at the first download.
        extract: also extract it (safely, see :func:`safe_extract`) and return the folder.
        opener: ``url -> binary file object`` (default ``urllib.request.urlopen``); tests inject one.

    Returns:
        The verified ``<cache_dir>/<name>.zip``, or its extracted folder.
    """
    check_choice("archive", name, tuple(ARCHIVES))
    archive = ARCHIVES[name]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{name}.zip"
    if not dest.is_file() or _verify(dest, archive, sha256, dest) is not None:
        fd, tmp_name = tempfile.mkstemp(dir=folder, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, (opener or urllib.request.urlopen)(archive.url) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
            problem = _verify(tmp, archive, sha256, dest)
            if problem:
                raise MamlabError(f"download of {archive.url} failed verification: {problem}")
            os.replace(tmp, dest)
        except (urllib.error.URLError, OSError) as err:
            raise MamlabError(f"could not download {archive.url} ({err}); fetch it by hand into "
                              f"{str(folder)!r}") from None
        finally:
            tmp.unlink(missing_ok=True)
    if not extract:
        return dest
    with zipfile.ZipFile(dest) as zf:
        tops = {n.split("/")[0] for n in zf.namelist()}
    if tops == {name}:
        return safe_extract(dest, folder) / name
    return safe_extract(dest, folder / name)


_download_archive = download  # Omniglot.__init__'s ``download`` flag shadows the function's name
