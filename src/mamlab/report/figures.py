"""Figures drawn from computed numbers: Finn et al.'s sinusoid Figure 2."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["sinusoid_adaptation_figure"]

_STEP_STYLE = {0: ("tab:gray", ":"), 1: ("tab:green", "--"), 10: ("tab:red", "-")}


def sinusoid_adaptation_figure(path: str | Path, x: np.ndarray, truth: np.ndarray,
                               panels: Sequence[Mapping], title: str | None = None) -> Path:
    """Ground truth, support points and predictions after k steps, one panel per (method, K).

    Args:
        path: the PNG to write.
        x: the dense input grid ``[n]``.
        truth: the true function on the grid ``[n]``.
        panels: dicts with ``title``, ``support_x``, ``support_y`` and ``predictions``
            (a mapping from number of steps to the prediction on the grid).
        title: an overall title.
    """
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.plot(x, truth, color="black", lw=2, label="ground truth")
        for steps, pred in sorted(panel["predictions"].items()):
            color, style = _STEP_STYLE.get(steps, (None, "-."))
            label = "pre-update" if steps == 0 else f"after {steps} step{'s' if steps > 1 else ''}"
            ax.plot(x, pred, color=color, ls=style, lw=1.8, label=label)
        ax.scatter(panel["support_x"], panel["support_y"], marker="^", s=60, color="tab:purple",
                   zorder=5, label=f"{len(panel['support_x'])} support points")
        ax.set_title(panel["title"])
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("y")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
