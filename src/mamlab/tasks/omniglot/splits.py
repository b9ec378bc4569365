"""Omniglot's named meta-train/test splits: :class:`Omniglot` (the task family the experiments use).

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
"""

from __future__ import annotations

from pathlib import Path

import torch

from mamlab.errors import MamlabError, check_choice, check_positive
from mamlab.tasks.base import TaskBatch
from mamlab.tasks.omniglot.archive import download
from mamlab.tasks.omniglot.cache import default_cache_dir
from mamlab.tasks.omniglot.oneshot import load_runs, runs_pool
from mamlab.tasks.omniglot.pool import CharacterPool, load_characters
from mamlab.tasks.omniglot.sampler import OmniglotTasks

__all__ = ["Omniglot", "PARTS", "SPLITS", "SPLIT_ARCHIVES", "VINYALS_TRAIN"]

SPLITS = ("minimal", "background", "vinyals")
PARTS = ("train", "validation", "test")
VINYALS_TRAIN = 1200

SPLIT_ARCHIVES: dict[str, tuple[str, ...]] = {
    "minimal": ("images_background_small1", "images_background_small2", "all_runs"),
    "background": ("images_background", "images_evaluation"),
    "vinyals": ("images_background", "images_evaluation"),
}


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


_download_archive = download  # Omniglot.__init__'s ``download`` flag shadows the function's name
