"""Omniglot (Lake et al. 2015): the official archives, named meta-train/test splits, a vectorized sampler.

Data layout (the official release, https://github.com/brendenlake/omniglot, ``python/``): each
archive ``images_background``, ``images_evaluation``, ``images_background_small1`` and
``images_background_small2`` holds ``<archive>/<Alphabet>/characterNN/*.png``: 105x105 binary
images, black strokes on white, 20 drawings per character. ``all_runs.zip`` holds the 20 runs of
the one-shot challenge (see :mod:`mamlab.tasks.omniglot.oneshot`). Archives are read in place, from
the ``.zip`` or from an extracted folder of the same name under ``root``.

Modules, each importing only those above it:

* :mod:`~mamlab.tasks.omniglot.cache`: the safetensors cache of preprocessed images;
* :mod:`~mamlab.tasks.omniglot.archive`: archive records, reading zips and folders, PNG decoding
  and resizing, safe extraction, download with hash verification;
* :mod:`~mamlab.tasks.omniglot.pool`: :class:`CharacterPool` and :func:`load_characters`;
* :mod:`~mamlab.tasks.omniglot.sampler`: :class:`OmniglotTasks`, the N-way K-shot episode sampler,
  and its augmentations;
* :mod:`~mamlab.tasks.omniglot.oneshot`: Lake et al.'s 20 one-shot runs and their baselines;
* :mod:`~mamlab.tasks.omniglot.splits`: :class:`Omniglot`, the minimal / background / vinyals splits.

Preprocessing (as Finn et al.'s MAML code): each image is resized to ``image_size`` (28) with
PIL's Lanczos filter (antialiased), inverted so strokes are 1 on a 0 background, and quantized
to uint8. The result is cached as a safetensors file keyed by the source (path, size, mtime) and
the image size, so a second run starts at once. In memory a :class:`CharacterPool` keeps one
float32 tensor ``images [characters, drawings, H, W]``.

Reference: B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum. Human-level concept learning through
probabilistic program induction. Science 350(6266), 2015.

Example:
    >>> omniglot = Omniglot("~/data/omniglot", split="vinyals", ways=5, validation_fraction=1 / 12)
    >>> batch = omniglot.sample(32, shots=1, queries=15, generator=torch.Generator().manual_seed(0))
    >>> batch.support_x.shape, batch.query_y.shape
    (torch.Size([32, 5, 1, 28, 28]), torch.Size([32, 75]))
"""

from mamlab.tasks.omniglot.archive import (
    ARCHIVES,
    Archive,
    decode_png,
    download,
    resize_strokes,
    safe_extract,
)
from mamlab.tasks.omniglot.cache import default_cache_dir
from mamlab.tasks.omniglot.pool import CharacterPool, load_characters
from mamlab.tasks.omniglot.sampler import AFFINE_RANGES, OmniglotTasks, affine_warp, random_affine
from mamlab.tasks.omniglot.splits import PARTS, SPLIT_ARCHIVES, SPLITS, VINYALS_TRAIN, Omniglot

__all__ = [
    "AFFINE_RANGES",
    "ARCHIVES",
    "Archive",
    "CharacterPool",
    "Omniglot",
    "OmniglotTasks",
    "PARTS",
    "SPLITS",
    "SPLIT_ARCHIVES",
    "VINYALS_TRAIN",
    "affine_warp",
    "decode_png",
    "default_cache_dir",
    "download",
    "load_characters",
    "random_affine",
    "resize_strokes",
    "safe_extract",
]
