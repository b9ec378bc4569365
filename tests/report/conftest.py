"""Shared fixtures for the report tests: a realistic sample report and the Chromium binary."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mamlab.report import (
    Figure,
    Section,
    Table,
    bar_chart_ci,
    layer_bar_chart,
    line_plot_ci,
    method_colors,
    write_report,
)
from mamlab.stats import Estimate, estimate, paired_difference_ci

METHODS = ("MAML", "FOMAML", "ANIL")
# Text that must be escaped, not interpreted.
HOSTILE = '<script>alert("x")</script> & <b>bold</b> "quoted"'


def make_sample_report(out_dir: Path) -> Path:
    """A report like the real one: curves, bars, per-layer CKA, and tables with CIs."""
    rng = np.random.default_rng(0)
    fig_dir = out_dir.parent / f"{out_dir.name}-figures"
    colors = method_colors(METHODS)
    steps = np.arange(0, 11)
    curves, final = {}, {}
    episodes = {}
    for i, m in enumerate(METHODS):
        loss = 2.5 * np.exp(-(0.45 - 0.08 * i) * steps)[None, :] + rng.normal(0, 0.15, size=(50, steps.size))
        ests = [estimate(loss[:, k]) for k in range(steps.size)]
        curves[m] = ([e.mean for e in ests], [e.ci for e in ests])
        episodes[m] = loss[:, -1]
        final[m] = ests[-1]
    curve_png = line_plot_ci(fig_dir / "loss_vs_steps.png", steps, curves, xlabel="inner steps",
                             ylabel="query loss", yunit="MSE", title="Sinusoid: query loss during adaptation",
                             colors=colors)
    bar_png = bar_chart_ci(fig_dir / "final_loss.png", {m: (e.mean, e.ci) for m, e in final.items()},
                           ylabel="query loss after 10 steps", yunit="MSE", title="Final query loss",
                           colors=colors)
    layers = ["conv1", "conv2", "conv3", "conv4", "head"]
    cka = {m: list(np.clip(1.0 - np.array([0.01, 0.02, 0.04, 0.1, 0.6]) * (1 + 0.3 * i), 0, 1))
           for i, m in enumerate(METHODS)}
    layer_png = layer_bar_chart(fig_dir / "cka_layers.png", layers, cka, ylabel="CKA(before, after)",
                                title="Representation change from adaptation", colors=colors)
    diff, hw = paired_difference_ci(episodes["MAML"], episodes["FOMAML"])
    sections = [
        Section("Adaptation curves",
                ["Query loss on 50 held-out sinusoid tasks after each inner SGD step.", HOSTILE],
                [Figure(curve_png, "Mean query loss with 95% CI bands."),
                 Figure(bar_png, "Query loss after 10 inner steps.")],
                [Table("Final query loss (MSE)", ["method", "loss", "episodes"],
                       [[m, e, e.n] for m, e in final.items()],
                       note="Mean ± half-width of the 95% Student-t interval.")]),
        Section("Representation similarity",
                "Linear CKA between each layer's features before and after adaptation.",
                [Figure(layer_png, "CKA per layer: the head changes, the body barely does.")],
                [Table("CKA per layer", ["layer", *METHODS], [[ly, *(cka[m][j] for m in METHODS)]
                                                              for j, ly in enumerate(layers)]),
                 Table(f"Paired difference {HOSTILE}", ["comparison", "Δ loss"],
                       [["MAML − FOMAML", (diff, hw)], ["missing", None]])]),
    ]
    return write_report(out_dir, f"Generalization report {HOSTILE}",
                        [f"MAML final loss: {final['MAML'].format()}", "Paired episodes: 50", HOSTILE],
                        sections, {"seed": 0, "final": final, "paired": Estimate(diff, hw, 50)})


@pytest.fixture(scope="session")
def sample_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample report's index.html, built once per session."""
    return make_sample_report(tmp_path_factory.mktemp("report") / "out")


@pytest.fixture(scope="session")
def sample_spec() -> dict:
    """What the sample report contains that tests check for (import-free: conftest is not a module)."""
    return {"methods": METHODS, "hostile": HOSTILE}


@pytest.fixture(scope="session")
def chromium() -> str | None:
    """The headless browser: $MAMLAB_CHROMIUM, else chromium/chromium-browser/google-chrome on PATH."""
    env = os.environ.get("MAMLAB_CHROMIUM")
    if env:
        return shutil.which(env)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None
