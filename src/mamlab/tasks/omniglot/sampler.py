"""The vectorized N-way K-shot episode sampler over a :class:`~mamlab.tasks.omniglot.pool.CharacterPool`,
and its augmentations: rotations by multiples of 90 degrees (as augmentation or as extra classes) and
random affine distortions (:func:`affine_warp`, :func:`random_affine`).
"""

from __future__ import annotations

import math

import torch

from mamlab.errors import MamlabError, check_positive
from mamlab.tasks.base import TaskBatch
from mamlab.tasks.omniglot.pool import CharacterPool

__all__ = ["AFFINE_RANGES", "OmniglotTasks", "affine_warp", "random_affine"]


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
