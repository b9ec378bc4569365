"""A fully connected network, the sinusoid model of Finn et al. (1-40-40-1, ReLU)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """Linear → ReLU → … → Linear; ``hidden=()`` gives a linear model."""

    def __init__(self, in_features: int = 1, out_features: int = 1,
                 hidden: Sequence[int] = (40, 40), bias: bool = True) -> None:
        layers: list[nn.Module] = []
        sizes = [in_features, *hidden]
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features, bias=bias))
        super().__init__(*layers)
        self.in_features, self.out_features, self.hidden = in_features, out_features, tuple(hidden)
