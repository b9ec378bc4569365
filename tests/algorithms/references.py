"""Networks written out by hand, the independent references the algorithm tests compare with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamlab import TaskBatch


def mlp_forward(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP written out by hand: Linear-ReLU-...-Linear with weights p = [W0, b0, W1, b1, ...]."""
    h = x
    for i in range(0, len(p), 2):
        h = h @ p[i].t() + p[i + 1]
        if i + 2 < len(p):
            h = torch.relu(h)
    return h


class ConvBN(nn.Module):
    """A small conv net with BatchNorm (batch statistics unless ``track``), like Conv4 but tiny."""

    def __init__(self, ways: int = 3, track: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4, track_running_stats=track)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4, track_running_stats=track)
        self.head = nn.Linear(4 * 2 * 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.head(x.flatten(1))


def convbn_by_hand(conv: list[torch.Tensor], bn: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ConvBN written out: conv = [c1w, c1b, c2w, c2b, hw, hb], bn = [w1, b1, w2, b2].

    BatchNorm normalizes with the batch's own mean and biased variance (batch statistics).
    """
    c1w, c1b, c2w, c2b, hw, hb = conv
    w1, b1, w2, b2 = bn

    def norm(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    h = F.max_pool2d(torch.relu(norm(F.conv2d(x, c1w, c1b, padding=1), w1, b1)), 2)
    h = F.max_pool2d(torch.relu(norm(F.conv2d(h, c2w, c2b, padding=1), w2, b2)), 2)
    return h.flatten(1) @ hw.t() + hb


def image_batch(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> TaskBatch:
    """Random 8x8 one-channel images for ``tasks`` N-way tasks, labels class by class (for ConvBN)."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, ways * shots, 1, 8, 8, generator=g)
    qx = torch.randn(tasks, ways * queries, 1, 8, 8, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(sx, sy, qx, qy)
