"""The registry of experiments: a task name maps to its task family, its model and its loss."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mamlab.config import TrainConfig
from mamlab.errors import MamlabError
from mamlab.models import MLP, Conv4
from mamlab.tasks import LinearClassification, LinearRegression, Sinusoid, TaskFamily

__all__ = ["build_family", "build_model", "loss_for", "is_classification", "accuracy", "omniglot"]


def build_family(config: TrainConfig, split: str = "train") -> TaskFamily:
    """The task distribution p(T) a config trains on (``split="train"``) or is tested on (``"test"``)."""
    if config.task == "sinusoid":
        return Sinusoid(tuple(config.amplitude), tuple(config.phase), tuple(config.x_range), config.noise)
    if config.task == "linear-regression":
        return LinearRegression(config.dim, config.weight_mean, config.weight_std, config.noise)
    if config.task == "linear-classification":
        return LinearClassification(config.dim, config.weight_mean, config.weight_std)
    if config.task == "omniglot":
        data = omniglot(config)
        try:
            return data.tasks(split, config.ways)
        except MamlabError as e:
            raise MamlabError(f"Omniglot {config.split} split, {split} characters: {e}") from None
    raise MamlabError(f"unknown task {config.task!r}")


_OMNIGLOT_CACHE: dict[tuple, object] = {}


def omniglot(config: TrainConfig):  # -> mamlab.tasks.omniglot.Omniglot
    """The Omniglot dataset of a config (loaded once per process; images are cached on disk too)."""
    from mamlab.tasks.omniglot import Omniglot

    key = (str(Path(config.data).resolve()), config.split, config.seed, config.rotate,
           config.validation_fraction, config.affine)
    if key not in _OMNIGLOT_CACHE:
        root = Path(config.data)
        if root.is_file():  # a path to one of the archives: use the folder holding it
            root = root.parent
        _OMNIGLOT_CACHE[key] = Omniglot(root, config.split, config.ways, seed=config.seed,
                                        rotate=config.rotate, affine=config.affine,
                                        validation_fraction=config.validation_fraction)
    return _OMNIGLOT_CACHE[key]


def build_model(config: TrainConfig) -> nn.Module:
    """A freshly initialized network for the config's task (uses the global torch RNG)."""
    if config.task == "sinusoid":
        return MLP(1, 1, hidden=tuple(config.hidden))
    if config.task in ("linear-regression", "linear-classification"):
        return MLP(config.dim, 1, hidden=tuple(config.hidden), bias=bool(config.hidden))
    if config.task == "omniglot":
        return Conv4(config.ways, hidden=config.filters, downsample=config.downsample)
    raise MamlabError(f"unknown task {config.task!r}")


def is_classification(config: TrainConfig) -> bool:
    """Whether the task is scored by accuracy as well as loss."""
    return config.task in ("linear-classification", "omniglot")


def loss_for(config: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-task loss: MSE for regression, logistic or cross-entropy for classification."""
    if config.task == "linear-classification":
        return F.binary_cross_entropy_with_logits
    if config.task == "omniglot":
        return F.cross_entropy
    return F.mse_loss


def accuracy(config: TrainConfig, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy ``[T]`` of predictions ``[T, N, ...]`` (logits) against targets."""
    if config.task == "linear-classification":
        correct = (prediction > 0).to(target.dtype) == target
    else:
        correct = prediction.argmax(-1) == target
    return correct.float().flatten(1).mean(1)
