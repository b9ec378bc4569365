"""N-way K-shot Omniglot (Lake et al. 2015; Finn et al. 2017, section 5.2): Conv4, cross-entropy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mamlab.errors import MamlabError
from mamlab.experiments.base import TaskSpec
from mamlab.models import Conv4
from mamlab.options import Option
from mamlab.tasks.base import TaskFamily

__all__ = ["OMNIGLOT", "omniglot_dataset"]


def _defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    """Finn et al.'s settings: 20-way uses 5 steps of 0.1 and meta-batch 16; 5-way 1 step of 0.4."""
    common = {"shots": 1, "queries": 1, "meta_lr": 0.001, "iterations": 60000, "val_every": 500,
              "val_tasks": 32, "checkpoint_every": 500}
    if options["ways"] >= 20:
        return {**common, "meta_batch": 16, "inner_lr": 0.1, "inner_steps": 5}
    return {**common, "meta_batch": 32, "inner_lr": 0.4, "inner_steps": 1}


_DATASETS: dict[tuple, Any] = {}


def omniglot_dataset(options: Mapping[str, Any], seed: int):  # -> mamlab.tasks.omniglot.Omniglot
    """The Omniglot dataset of a run's options (loaded once per process; images are cached on disk too)."""
    from mamlab.tasks.omniglot import Omniglot

    key = (str(Path(options["data"]).resolve()), options["split"], seed, options["rotate"],
           options["validation_fraction"], options["affine"])
    if key not in _DATASETS:
        root = Path(options["data"])
        if root.is_file():  # a path to one of the archives: use the folder holding it
            root = root.parent
        _DATASETS[key] = Omniglot(root, options["split"], options["ways"], seed=seed,
                                  rotate=options["rotate"], affine=options["affine"],
                                  validation_fraction=options["validation_fraction"])
    return _DATASETS[key]


def _family(options: Mapping[str, Any], split: str, seed: int) -> TaskFamily:
    data = omniglot_dataset(options, seed)
    try:
        return data.tasks(split, options["ways"])
    except MamlabError as e:
        raise MamlabError(f"Omniglot {options['split']} split, {split} characters: {e}") from None


def _check(options: Mapping[str, Any]) -> None:
    if not 0.0 < options["validation_fraction"] < 1.0:
        raise MamlabError(f"validation_fraction must be in (0, 1), got {options['validation_fraction']!r}")
    if not options["data"]:
        raise MamlabError("omniglot needs --data PATH: a folder or zip of the Omniglot release")


def _argmax_accuracy(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.argmax(-1) == target).float().flatten(1).mean(1)


OMNIGLOT = TaskSpec(
    name="omniglot",
    kind="classification",
    options=(
        Option("data", "str", None, "Omniglot folder or zip(s)", nullable=True),
        Option("split", "str", "minimal", "Omniglot split", choices=("minimal", "vinyals", "background")),
        Option("ways", "int", 5, "N in N-way classification", positive=True),
        Option("filters", "int", 64, "Conv4 filters per layer (64 in the paper)", positive=True),
        Option("downsample", "str", "pool", "Conv4 downsampling", choices=("pool", "stride")),
        Option("rotate", "bool", True, "turn each training class by a random multiple of 90 degrees"),
        Option("affine", "bool", False, "distort each training image by a random affine map"),
        Option("validation_fraction", "float", 0.1, "share of training characters held out for validation",
               positive=True),
    ),
    defaults=_defaults,
    family=_family,
    model=lambda o: Conv4(o["ways"], hidden=o["filters"], downsample=o["downsample"]),
    loss=F.cross_entropy,
    accuracy=_argmax_accuracy,
    check=_check,
)
