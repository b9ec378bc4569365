"""Omniglot characters in memory: :class:`CharacterPool`, and :func:`load_characters` to read an archive.

Preprocessing (as Finn et al.'s MAML code): each image is resized to ``image_size`` (28) with
PIL's Lanczos filter (antialiased), inverted so strokes are 1 on a 0 background, and quantized
to uint8. The result is cached (:mod:`mamlab.tasks.omniglot.cache`), so a second run starts at
once. In memory a :class:`CharacterPool` keeps one float32 tensor
``images [characters, drawings, H, W]``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mamlab.errors import MamlabError, check_positive
from mamlab.tasks.omniglot.archive import ArchiveReader, decode_png, resize_strokes
from mamlab.tasks.omniglot.cache import cache_file, default_cache_dir, load_cache, save_cache

__all__ = ["CharacterPool", "load_characters"]

_ENTRY = re.compile(r"(?:^|/)([^/]+)/(character\d+)/([^/]+\.png)$", re.IGNORECASE)


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
    reader = ArchiveReader(path, "Omniglot archive")
    target = None
    if cache:
        target = cache_file(path, image_size, Path(cache_dir) if cache_dir else default_cache_dir())
        if target.is_file():
            try:
                return _pool_from_uint8(*load_cache(target))
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
        save_cache(target, tensor, names, drawings, str(path))
    return _pool_from_uint8(tensor, names, drawings)
