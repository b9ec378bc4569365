"""Report figures: curves with confidence bands, bars with CI error bars, per-layer bars, as PNGs.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through
pyplot, so importing this module changes no global backend and works headless. Every function
saves one PNG (``dpi=120``) and returns its path. Colours are consistent per method: pass the
same ``colors`` mapping (from ``method_colors``) to every figure of a report; by default each
figure assigns colours to its methods in sorted name order, so the same set of methods gets the
same colours everywhere.

A value with its confidence interval is a pair ``(mean, half_width)`` (``Estimate.mean`` and
``Estimate.ci`` from ``mamlab.stats``); a curve may also be a triple
``(centers, lows, highs)`` for asymmetric intervals such as a median's (``Median``), whose
bounds may be infinite: the band is then clipped to the plotted range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mamlab.errors import MamlabError

__all__ = ["PALETTE", "DPI", "method_colors", "new_figure", "line_plot_ci", "bar_chart_ci", "layer_bar_chart",
           "curves_with_thresholds"]

DPI = 120
# Okabe–Ito, distinguishable under the common colour-vision deficiencies, then tab10's extras.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#8c564b", "#7f7f7f")

MeanCI = tuple[float, float]
Curve = tuple[Sequence[float], Sequence[float]] | tuple[Sequence[float], Sequence[float], Sequence[float]]


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method, by sorted name: the same set of methods always gets the same colours."""
    names = sorted(set(methods))
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)}


def new_figure(width: float = 6.4, height: float = 4.0, *, log_grid: bool = False) -> tuple[Figure, Axes]:
    """A figure with one axes in mamlab's style: a light grid (y only, or every line of log-log
    axes with ``log_grid``), no top or right spine, rendered off-screen (Agg)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if log_grid:
        ax.grid(True, which="both", color="#e4e4e4", linewidth=0.6)
    else:
        ax.grid(True, axis="y", color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MamlabError(f"figure path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _label(text: str, unit: str | None) -> str:
    return f"{text} ({unit})" if unit else text


def _colors_for(names: Sequence[str], colors: Mapping[str, str] | None) -> dict[str, str]:
    chosen = method_colors(names)
    if colors is not None:
        missing = [n for n in names if n not in colors]
        if missing:
            raise MamlabError(f"colors has no entry for {missing!r}; it covers {sorted(colors)}")
        chosen = {n: colors[n] for n in names}
    return chosen


def _finite_array(name: str, values: Sequence[float], length: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise MamlabError(f"{name} must be a sequence of numbers, got {type(values).__name__}") from None
    if arr.ndim != 1 or (length is not None and arr.shape[0] != length):
        raise MamlabError(f"{name} must have {length} values, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise MamlabError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def line_plot_ci(path: str | Path, x: Sequence[float], series: Mapping[str, Curve],
                 *, xlabel: str, ylabel: str, title: str, xunit: str | None = None,
                 yunit: str | None = None, colors: Mapping[str, str] | None = None,
                 logx: bool = False, logy: bool = False, integer_x: bool = False) -> Path:
    """Mean curves with shaded confidence bands, one per method, e.g. loss against inner steps.

    Args:
        path: where to write the PNG.
        x: the shared x values (steps, shots, ...).
        series: method name → ``(means, half_widths)``, each as long as ``x``, or
            ``(centers, lows, highs)`` (bounds may be ±inf: the band runs off the plot).
        xlabel, ylabel, title: axis labels and title; ``xunit``/``yunit`` are appended in
            parentheses, e.g. ``ylabel="query loss", yunit="MSE"``.
        colors: method → colour (default: ``method_colors`` of the methods shown).
        logx, logy: logarithmic axes.
        integer_x: ticks on the x axis at integers only (steps, iterations).

    Returns:
        The PNG's path.
    """
    if not series:
        raise MamlabError("series is empty; give at least one method's (means, half_widths)")
    xs = _finite_array("x", x)
    cmap = _colors_for(list(series), colors)
    fig, ax = new_figure()
    bands, centers = [], []
    for name, pair in series.items():
        if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
            raise MamlabError(f"series[{name!r}] must be a (means, half_widths) pair "
                              "or a (centers, lows, highs) triple")
        mean = _finite_array(f"series[{name!r}] means", pair[0], len(xs))
        if len(pair) == 2:
            hw = _finite_array(f"series[{name!r}] half-widths", pair[1], len(xs))
            low, high = mean - hw, mean + hw
        else:
            low = _bound_array(f"series[{name!r}] lows", pair[1], len(xs))
            high = _bound_array(f"series[{name!r}] highs", pair[2], len(xs))
        ax.plot(xs, mean, color=cmap[name], marker="o", markersize=3.5, linewidth=1.8, label=name)
        if logy and np.any(mean > 0):  # a band reaching below 0 runs to the bottom of a log axis
            low = np.maximum(low, mean[mean > 0].min() / 10)
        bands.append((name, low, high))
        centers.append(mean)
    finite = np.concatenate([b[i][np.isfinite(b[i])] for b in bands for i in (1, 2)] + centers)
    lo_lim, hi_lim = float(finite.min()), float(finite.max())
    pad = (hi_lim - lo_lim) * 0.05 or abs(hi_lim) * 0.05 or 1.0
    for name, low, high in bands:  # infinite bounds: clip the band to the finite range shown
        low = np.where(np.isfinite(low), low, lo_lim - pad if not logy else lo_lim)
        high = np.where(np.isfinite(high), high, hi_lim + pad if not logy else hi_lim * 1.5)
        ax.fill_between(xs, low, high, color=cmap[name], alpha=0.2, linewidth=0)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(_label(xlabel, xunit))
    ax.set_ylabel(_label(ylabel, yunit))
    ax.set_title(title)
    ax.legend(frameon=False, title="shaded: 95% CI", title_fontsize="small")
    return _save(fig, path)


def _bound_array(name: str, values: Sequence[float], length: int) -> np.ndarray:
    """An interval bound: numbers, ±inf allowed (an unbounded side), NaN not."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise MamlabError(f"{name} must be a sequence of numbers, got {type(values).__name__}") from None
    if arr.ndim != 1 or arr.shape[0] != length:
        raise MamlabError(f"{name} must have {length} values, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise MamlabError(f"{name} must not be NaN, got {arr.tolist()}")
    return arr


def bar_chart_ci(path: str | Path, values: Mapping[str, MeanCI], *, ylabel: str, title: str,
                 yunit: str | None = None, colors: Mapping[str, str] | None = None) -> Path:
    """One bar per method with its confidence interval as an error bar, e.g. final accuracy.

    Args:
        path: where to write the PNG.
        values: method name → ``(mean, half_width)``, drawn in the given order.
        ylabel, title: axis label and title; ``yunit`` is appended in parentheses.
        colors: method → colour (default: ``method_colors`` of the methods shown).

    Returns:
        The PNG's path.
    """
    if not values:
        raise MamlabError("values is empty; give at least one method's (mean, half_width)")
    names = list(values)
    arr = _finite_array("values", [v for pair in values.values() for v in _pair(pair)])
    means, hws = arr[0::2], arr[1::2]
    cmap = _colors_for(names, colors)
    fig, ax = new_figure()
    pos = np.arange(len(names))
    ax.bar(pos, means, yerr=hws, color=[cmap[n] for n in names], capsize=5, width=0.6,
           error_kw={"elinewidth": 1.2, "ecolor": "#333333"})
    for p, m, h in zip(pos, means, hws, strict=True):
        ax.annotate(f"{m:.3g}", (p, m + h if m >= 0 else m - h), textcoords="offset points",
                    xytext=(0, 3 if m >= 0 else -12), ha="center", fontsize=8, color="#333333")
    ax.set_xticks(pos, names)
    ax.set_ylabel(_label(ylabel, yunit))
    ax.set_title(title)
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    ax.set_xlabel("error bars: 95% CI", fontsize="small", color="#555555")
    return _save(fig, path)


def _pair(value: object) -> MeanCI:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]  # type: ignore[return-value]
    raise MamlabError(f"expected a (mean, half_width) pair, got {value!r}")


def layer_bar_chart(path: str | Path, layers: Sequence[str], values: Mapping[str, Sequence[float]], *,
                    ylabel: str, title: str, errors: Mapping[str, Sequence[float]] | None = None,
                    colors: Mapping[str, str] | None = None, ylim: tuple[float, float] | None = (0.0, 1.05),
                    xlabel: str = "layer", tick_rotation: float = 0.0,
                    hlines: Mapping[str, float] | None = None) -> Path:
    """Grouped bars of a per-layer quantity (e.g. CKA before vs after adaptation) for each method.

    Args:
        path: where to write the PNG.
        layers: layer names along the x axis, input to output.
        values: method name → one value per layer.
        ylabel, title: axis label and title.
        errors: optional method name → per-layer CI half-widths (drawn as error bars).
        colors: method → colour (default: ``method_colors`` of the methods shown).
        ylim: y range (default ``(0, 1.05)``, for similarities); ``None`` lets matplotlib pick.
        xlabel: the x axis label (default ``"layer"``; e.g. ``"learner"`` when groups are methods).
        tick_rotation: degrees to rotate the group labels by (for long names).
        hlines: label → y: dashed horizontal reference lines, named in the legend (e.g. ``"2/α = 200"``).

    Returns:
        The PNG's path.
    """
    if not layers:
        raise MamlabError("layers is empty; give at least one layer name")
    if not values:
        raise MamlabError("values is empty; give at least one method's per-layer values")
    names = list(values)
    cmap = _colors_for(names, colors)
    fig, ax = new_figure()
    pos = np.arange(len(layers))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = _finite_array(f"values[{name!r}]", values[name], len(layers))
        err = None
        if errors is not None and name in errors:
            err = _finite_array(f"errors[{name!r}]", errors[name], len(layers))
        ax.bar(pos + (i - (len(names) - 1) / 2) * width, vals, width=width * 0.95, yerr=err,
               capsize=3, color=cmap[name], label=name, error_kw={"elinewidth": 1.0, "ecolor": "#333333"})
    for i, (label, y) in enumerate((hlines or {}).items()):
        if not math.isfinite(y):
            raise MamlabError(f"hlines[{label!r}] must be a finite number, got {y!r}")
        ax.axhline(y, color="#444444", linestyle=("--", ":", "-.")[i % 3], linewidth=1.2, label=label)
    ax.set_xticks(pos, list(layers))
    if tick_rotation:
        ax.tick_params(axis="x", labelrotation=tick_rotation)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        if not (len(ylim) == 2 and all(math.isfinite(v) for v in ylim) and ylim[0] < ylim[1]):
            raise MamlabError(f"ylim must be (low, high) with low < high, got {ylim!r}")
        ax.set_ylim(*ylim)
    if len(names) > 1 or errors or hlines:
        fig.legend(frameon=False, loc="outside right upper")
    return _save(fig, path)


def curves_with_thresholds(path: str | Path,
                           series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                           thresholds: Mapping[str, float], *, xlabel: str, ylabel: str, title: str,
                           maxima: Mapping[str, Sequence[float]] | None = None,
                           colors: Mapping[str, str] | None = None, logy: bool = False,
                           integer_x: bool = True, threshold_label: str = "2/α") -> Path:
    """Curves each on its own x values, with CI bands and a dashed horizontal threshold in its colour.

    E.g. the top Hessian eigenvalue against the training iteration for runs with different step
    sizes, each with its line at 2/α.

    Args:
        path: where to write the PNG.
        series: curve name → ``(x, means, half_widths)``, the three of one length.
        thresholds: curve name → y of its dashed line (curves without one get none).
        xlabel, ylabel, title: axis labels and title.
        maxima: curve name → a value per x drawn dotted in the curve's colour (e.g. the max over tasks).
        colors: curve → colour (default: ``method_colors`` of the curves).
        logy: logarithmic y axis.
        integer_x: ticks on the x axis at integers only.
        threshold_label: the dashed lines' name in the legend (``"2/α"`` → ``"2/α = 200 (name)"``).

    Returns:
        The PNG's path.
    """
    if not series:
        raise MamlabError("series is empty; give at least one curve's (x, means, half_widths)")
    cmap = _colors_for(list(series), colors)
    fig, ax = new_figure(7.2, 4.4)
    for name, triple in series.items():
        if not isinstance(triple, (tuple, list)) or len(triple) != 3:
            raise MamlabError(f"series[{name!r}] must be an (x, means, half_widths) triple")
        xs = _finite_array(f"series[{name!r}] x", triple[0])
        mean = _finite_array(f"series[{name!r}] means", triple[1], len(xs))
        hw = _finite_array(f"series[{name!r}] half-widths", triple[2], len(xs))
        ax.plot(xs, mean, color=cmap[name], marker="o", markersize=3.5, linewidth=1.8, label=name)
        low = np.maximum(mean - hw, mean.min() / 10) if logy and mean.min() > 0 else mean - hw
        ax.fill_between(xs, low, mean + hw, color=cmap[name], alpha=0.2, linewidth=0)
        if maxima is not None and name in maxima:
            top = _finite_array(f"maxima[{name!r}]", maxima[name], len(xs))
            ax.plot(xs, top, color=cmap[name], linestyle=":", marker="x", markersize=3.5, linewidth=1.2,
                    label=f"{name}: max over tasks")
    for name, y in thresholds.items():
        if name not in cmap:
            raise MamlabError(f"thresholds[{name!r}] names no curve; curves: {sorted(cmap)}")
        if not (isinstance(y, (int, float)) and math.isfinite(y)):
            raise MamlabError(f"thresholds[{name!r}] must be a finite number, got {y!r}")
        ax.axhline(y, color=cmap[name], linestyle="--", linewidth=1.2,
                   label=f"{threshold_label} = {y:.4g} ({name})")
    if logy:
        ax.set_yscale("log")
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.legend(frameon=False, loc="outside right upper", fontsize="small",
               title="shaded: 95% CI", title_fontsize="small")
    return _save(fig, path)
