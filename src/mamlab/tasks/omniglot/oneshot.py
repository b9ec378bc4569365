"""The Omniglot one-shot challenge (Lake et al. 2015): 20 runs of 20-way within-alphabet classification.

``all_runs.zip`` holds ``runNN/training/classMM.png`` (one image per class), ``runNN/test/itemMM.png``
and ``runNN/class_labels.txt``, whose lines ``runNN/test/itemMM.png runNN/training/classKK.png`` say
which training image each test image belongs to. The error of a classifier is the percentage of
test images assigned to the wrong class, averaged over the 20 runs.

``evaluate_runs(runs, classify)`` scores any ``classify(train_x, train_y, test_x) -> labels``
callback; two baselines validate the harness: nearest neighbour in pixel space, and the Modified
Hausdorff Distance between stroke point sets of the raw 105x105 images (Dubuisson & Jain 1994), as
in the dataset authors' ``demo_classification.py`` (which reports 38.8% error).

Example:
    >>> runs = load_runs("~/data/omniglot/all_runs.zip")
    >>> evaluate_runs(runs, modified_hausdorff_classifier, raw=True)["mean"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mamlab.errors import MamlabError, check_positive
from mamlab.tasks.omniglot.archive import ArchiveReader, decode_png, resize_strokes
from mamlab.tasks.omniglot.pool import CharacterPool

__all__ = [
    "OneShotRun",
    "evaluate_runs",
    "load_runs",
    "modified_hausdorff_classifier",
    "modified_hausdorff_distance",
    "pixel_nearest_neighbour",
    "runs_pool",
    "stroke_points",
]

Classifier = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OneShotRun:
    """One run: ``train_images``/``test_images [20, 1, S, S]`` (float32, strokes 1), ``test_labels [20]``.

    ``test_labels[i]`` indexes the training image of test image i. ``train_raw``/``test_raw``
    are the original binary images ``[20, 105, 105]`` (bool, True on strokes).
    """

    name: str
    train_images: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_raw: torch.Tensor
    test_raw: torch.Tensor
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]


def _images(reader: ArchiveReader, files: Sequence[str],
            image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    raw = [decode_png(reader.read(f), f"{reader.path}:{f}") for f in files]
    small = np.stack([resize_strokes(r, image_size) for r in raw])
    images = torch.from_numpy(small).float().div_(255.0).unsqueeze(1)
    return images, torch.from_numpy(np.stack(raw))


def load_runs(path: str | Path, image_size: int = 28) -> list[OneShotRun]:
    """Read the runs of ``all_runs.zip`` (or its extracted folder), sorted by name.

    Images are preprocessed as the Omniglot dataset (Lanczos resize to ``image_size``, strokes 1);
    training images are ordered by file name, test images in the order of ``class_labels.txt``.
    """
    check_positive("image_size", image_size, integer=True)
    path = Path(path).expanduser()
    reader = ArchiveReader(path, "Omniglot runs archive")
    try:
        labels = {}
        for name in reader.names:
            m = re.search(r"(?:^|/)(run\d+)/class_labels\.txt$", name)
            if m:
                labels[m.group(1)] = name
        if not labels:
            raise MamlabError(f"{str(path)!r} is not the Omniglot one-shot runs archive: no "
                              "runNN/class_labels.txt found (expected all_runs.zip)")
        runs = []
        for run in sorted(labels):
            prefix = labels[run][: -len("class_labels.txt")]
            pairs = []
            try:
                text = reader.read(labels[run]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise MamlabError(f"{path}:{labels[run]}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                  "expected '<test image> <training image>' per line") from None
            for line in text.splitlines():
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise MamlabError(f"{path}:{labels[run]}: expected '<test image> <training image>' "
                                      f"per line, got {line!r}")
                pairs.append((fields[0].split("/")[-1], fields[1].split("/")[-1]))
            if not pairs:
                raise MamlabError(f"{path}:{labels[run]}: empty; expected '<test image> <training image>' "
                                  "per line")
            train_files = sorted({p[1] for p in pairs} | {n.split("/")[-1] for n in reader.names
                                                           if n.startswith(prefix + "training/")})
            index = {f: i for i, f in enumerate(train_files)}
            train_x, train_raw = _images(reader, [prefix + "training/" + f for f in train_files], image_size)
            test_x, test_raw = _images(reader, [prefix + "test/" + t for t, _ in pairs], image_size)
            runs.append(OneShotRun(run, train_x, test_x, torch.tensor([index[c] for _, c in pairs]),
                                   train_raw, test_raw, tuple(train_files), tuple(t for t, _ in pairs)))
    finally:
        reader.close()
    return runs


def runs_pool(runs: Sequence[OneShotRun]) -> CharacterPool:
    """The runs as an episode pool: each training class with 2 drawings (its training and test image).

    Classes are grouped by run (``group_names`` are the run names), so within-group episodes
    (``OmniglotTasks(pool, within_groups=True)``) are within-alphabet, like the runs themselves.
    A class with several test images keeps the first; a class with none is left out.
    """
    images, names, groups = [], [], []
    for g, run in enumerate(runs):
        for c, train_file in enumerate(run.train_files):
            hits = torch.nonzero(run.test_labels == c).flatten()
            if len(hits) == 0:
                continue
            images.append(torch.stack([run.train_images[c, 0], run.test_images[int(hits[0]), 0]]))
            names.append(f"{run.name}/{train_file.removesuffix('.png')}")
            groups.append(g)
    if not images:
        raise MamlabError("runs_pool needs at least one run with labelled test images, got none")
    return CharacterPool(torch.stack(images), tuple(names), torch.tensor(groups, dtype=torch.long),
                         tuple(r.name for r in runs))


def evaluate_runs(runs: Sequence[OneShotRun], classify: Classifier, *, raw: bool = False) -> dict:
    """Score ``classify(train_x, train_y, test_x) -> predicted labels [20]`` on every run.

    Args:
        runs: from :func:`load_runs`.
        classify: gets ``train_x [20, 1, S, S]``, ``train_y = arange(20)`` and ``test_x [20, 1, S, S]``;
            returns one label of ``train_y`` per test image.
        raw: pass the original 105x105 binary images (as float, strokes 1) instead of the resized ones.

    Returns:
        ``{"errors": [per-run error %], "mean": mean error %, "ci95": half-width of the normal 95%
        interval of the mean (1.96 standard errors over runs), "runs": number of runs}``.
    """
    if not runs:
        raise MamlabError("evaluate_runs needs at least one run, got none")
    errors = []
    for run in runs:
        train_x = run.train_raw.float().unsqueeze(1) if raw else run.train_images
        test_x = run.test_raw.float().unsqueeze(1) if raw else run.test_images
        train_y = torch.arange(train_x.shape[0])
        pred = torch.as_tensor(classify(train_x, train_y, test_x)).flatten().long()
        if pred.shape != run.test_labels.shape:
            raise MamlabError(f"classify returned {tuple(pred.shape)} labels for run {run.name}; expected "
                              f"one per test image, shape {tuple(run.test_labels.shape)}")
        errors.append(100.0 * (pred != run.test_labels).float().mean().item())
    mean = sum(errors) / len(errors)
    sd = math.sqrt(sum((e - mean) ** 2 for e in errors) / (len(errors) - 1)) if len(errors) > 1 else 0.0
    return {"errors": errors, "mean": mean, "ci95": 1.96 * sd / math.sqrt(len(errors)), "runs": len(errors)}


def pixel_nearest_neighbour(train_x: torch.Tensor, train_y: torch.Tensor,
                            test_x: torch.Tensor) -> torch.Tensor:
    """The label of the training image nearest to each test image in Euclidean pixel distance."""
    d = torch.cdist(test_x.flatten(1).double(), train_x.flatten(1).double())
    return train_y[d.argmin(dim=1)]


def stroke_points(image: torch.Tensor) -> torch.Tensor:
    """Coordinates ``[P, 2]`` (row, column) of the stroke pixels of a binary image, centred on their mean."""
    points = torch.nonzero(image.reshape(image.shape[-2:]) > 0.5).double()
    return points - points.mean(dim=0) if len(points) else points


def modified_hausdorff_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Modified Hausdorff Distance (Dubuisson & Jain 1994) between point sets ``[P, 2]`` and ``[Q, 2]``.

    The larger of the two directed distances, each the mean over one set of the distance to the
    nearest point of the other. Infinite if either set is empty.
    """
    if len(a) == 0 or len(b) == 0:
        return math.inf
    d = torch.cdist(a, b)
    return max(d.min(dim=1).values.mean().item(), d.min(dim=0).values.mean().item())


def modified_hausdorff_classifier(train_x: torch.Tensor, train_y: torch.Tensor,
                                  test_x: torch.Tensor) -> torch.Tensor:
    """The label of the training image at the least Modified Hausdorff Distance of each test image.

    Meant for the raw binary images (``evaluate_runs(..., raw=True)``), as the authors' demo.
    """
    train = [stroke_points(x) for x in train_x]
    test = [stroke_points(x) for x in test_x]
    cost = torch.tensor([[modified_hausdorff_distance(t, r) for r in train] for t in test])
    return train_y[cost.argmin(dim=1)]
