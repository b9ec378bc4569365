"""Conv4, the Omniglot network of Finn et al. 2017: four conv3x3-64 + BatchNorm + ReLU blocks.

BatchNorm is built with ``track_running_stats=False``: every forward pass normalizes with the
statistics of the batch it is given (one task's support or query set), at meta-train and
meta-test time alike, exactly as MAML's reference implementation does. ``model.eval()``
therefore changes nothing, and no running statistics leak between tasks.
"""

from __future__ import annotations

import torch
from torch import nn

from mamlab.errors import check_choice, check_positive

__all__ = ["Conv4"]


class Conv4(nn.Module):
    """Four blocks of conv3x3(64) → BatchNorm → ReLU → (2x2 max-pool | stride 2), then a linear head.

    Args:
        ways: number of output classes N.
        in_channels: input channels (1 for Omniglot).
        hidden: filters per conv layer (64 in the paper).
        image_size: input height and width (28 for Omniglot).
        downsample: ``"pool"`` (2x2 max-pooling) or ``"stride"`` (stride-2 convolutions).
    """

    #: ``forward(x)`` is ``head(features(x).flatten(1))``; the CPU conv path (``mamlab.core.conv``)
    #: reads this declaration to recognise the network.
    features_head = ("features", "head")

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 downsample: str = "pool") -> None:
        super().__init__()
        check_positive("ways", ways, integer=True)
        check_positive("hidden", hidden, integer=True)
        check_choice("downsample", downsample, ("pool", "stride"))
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            stride = 2 if downsample == "stride" else 1
            blocks += [nn.Conv2d(channels, hidden, 3, stride=stride, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=False),
                       nn.ReLU()]
            if downsample == "pool":
                blocks.append(nn.MaxPool2d(2))
            size = (size + 1) // 2 if downsample == "stride" else size // 2
            channels = hidden
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden * size * size, ways)
        self.ways, self.in_channels, self.image_size = ways, in_channels, image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, ways]`` for images ``[B, C, H, W]`` (or ``[B, H, W]`` when C is 1)."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))
