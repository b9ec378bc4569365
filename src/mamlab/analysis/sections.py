"""Report sections: a study's numbers → summary sentences, tables and figure requests.

One function per study turns the dict the study returned (``mamlab.analysis.studies``) into a
``Section`` of the page (``mamlab.report.html``): explanatory text, the figures it asks
``mamlab.report.plots`` to draw, the tables of estimates, and the lines it appends to the page's
generated summary. Each ``*_section(c, r, summary)`` takes the report's context ``c`` (folder,
colours, unit), the study's result dict ``r`` as it goes into results.json, and the page's
summary lines, to which it appends its own, and returns the ``Section``. Nothing here computes a
new statistic: the sentences only choose and word the numbers the studies recorded.

Diverging tasks: where any task behind a number diverged (``studies.DIVERGENCE_FACTOR``), a
sentence quotes medians and says how many tasks diverged, and a figure plots medians with their
distribution-free CI band (the caption says so); otherwise means ± 95% CI.

Example:
    >>> ctx = SectionContext(tmp, learners, config, tasks=200, fixed=10)
    >>> summary: list[str] = []
    >>> sec = adaptation_section(ctx, st.adaptation_curves(learners, heldout, 20), learners, summary)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mamlab.analysis import studies as st
from mamlab.config import TrainConfig
from mamlab.experiments import is_classification
from mamlab.report.html import Figure, Section, Table, format_value
from mamlab.report.plots import curves_with_thresholds, layer_bar_chart, line_plot_ci, method_colors
from mamlab.stats import Estimate, Median

__all__ = [
    "TITLES",
    "SectionContext",
    "adaptation_section",
    "shots_section",
    "generalization_section",
    "shift_section",
    "representation_section",
    "landscape_section",
    "stability_section",
    "cost_section",
    "protocol_section",
    "skipped_section",
]

#: Each study's section title, by study name (``studies.STUDIES``).
TITLES = {
    "adaptation": "Adaptation curves",
    "shots": "Shot sweep",
    "generalization": "Generalization gap",
    "shift": "Distribution shift",
    "representations": "Rapid learning or feature reuse",
    "landscape": "Loss landscape",
    "stability": "Edge of stability",
    "exact": "The linear model, exactly",
}


# ---------------------------------------------------------------------- numbers -> text
def _mc(values: Sequence[Estimate]) -> tuple[list[float], list[float]] | None:
    """(means, half-widths) for a plot; None if a mean is not finite (e.g. every task diverged)."""
    means = [e.mean for e in values]
    if not all(math.isfinite(m) for m in means):
        return None
    return means, [e.ci if math.isfinite(e.ci) else 0.0 for e in values]


def _series(named: dict[str, Sequence[Estimate]]) -> dict[str, tuple[list[float], list[float]]]:
    return {k: v for k, v in ((k, _mc(v)) for k, v in named.items()) if v is not None}


def _median_series(
    named: dict[str, Sequence[Median]],
) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """(medians, lows, highs) per series whose medians are all finite (else left out)."""
    out = {}
    for k, v in named.items():
        if all(math.isfinite(m.median) for m in v):
            out[k] = ([m.median for m in v], [m.low for m in v], [m.high for m in v])
    return out


def _spread(series: dict[str, Any]) -> bool:
    vals = [m for curve in series.values() for m in curve[0]]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 100


def _num(v: float, digits: int = 3) -> str:
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if math.isnan(v):
        return "n/a"
    if abs(v) >= 1e4 or (0 < abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.{digits}f}"


def _fmt(e: Estimate | Median, digits: int = 3) -> str:
    if isinstance(e, Median):
        if math.isinf(e.median):
            return "median ∞ (at least half the tasks diverged)"
        return f"median {_num(e.median, digits)} [95% CI {_num(e.low, digits)}, {_num(e.high, digits)}]"
    if not math.isfinite(e.mean):
        return "n/a"
    if abs(e.mean) >= 1e4 or (0 < abs(e.mean) < 1e-3):
        return f"{e.mean:.3g} ± {e.ci:.2g}"
    return e.format(digits)


def _signed(e: Estimate | Median, digits: int = 3) -> str:
    if isinstance(e, Median):
        sign = "+" if e.median >= 0 else ""
        return f"median {sign}{_num(e.median, digits)} [95% CI {_num(e.low, digits)}, {_num(e.high, digits)}]"
    return ("+" if e.mean >= 0 else "") + _fmt(e, digits)


def _pick(entry: dict[str, Any], key: str, i: int | None, robust: bool) -> Estimate | Median:
    """``entry[key]`` (at ``i``), or its median where ``robust`` and the study recorded one."""
    k = key + "_median" if robust and key + "_median" in entry else key
    return entry[k] if i is None else entry[k][i]


def _ndiv(entry: dict[str, Any], key: str, i: int | None = None) -> int:
    """Diverged tasks behind ``entry[key]`` (at ``i``); 0 where none were counted."""
    d = entry.get(key + "_diverged", 0)
    return int(d if i is None else d[i])


def _div_text(counts: dict[str, int], total: int) -> str:
    """``"; 3 of 100 tasks diverged for MAML"`` for every nonzero count, else ``""``."""
    parts = [f"{d} of {total} tasks diverged for {n}" for n, d in counts.items() if d]
    return ("; " + ", ".join(parts)) if parts else ""


def _mcell(m: Median, d: int, digits: int = 3) -> Median | str:
    """A table cell: the median [CI], with the diverged-task count appended where nonzero."""
    return m if d == 0 else f"{format_value(m, digits)} ({d} diverged)"


def _pcell(mean: Estimate, median: Median | None, d: int, d_ref: int) -> Estimate | str:
    """A paired-difference cell: mean ± CI, or where either side diverged the paired median [CI], counts."""
    if (d == 0 and d_ref == 0) or median is None:
        return mean
    return f"median {format_value(median)} ({d} and {d_ref} diverged)"


def _paired_rows(r: dict[str, Any], ref: str, idx: Sequence[int]) -> tuple[list[list[Any]], bool]:
    """Rows of a paired-difference table at ``idx`` of the study's lists; whether a cell is a median."""
    L, medians = r["learners"], r.get("paired_query_loss_median", {})
    rows, robust = [], False
    for n, means in r["paired_query_loss"].items():
        row: list[Any] = [n]
        for i in idx:
            d, d_ref = _ndiv(L[n], "query_loss", i), _ndiv(L[ref], "query_loss", i)
            row.append(_pcell(means[i], medians[n][i] if n in medians else None, d, d_ref))
            robust = robust or isinstance(row[-1], str)
        rows.append(row)
    return rows, robust


def _paired_note(robust: bool, ref: str) -> str:
    """The note under a paired-difference table."""
    if not robust:
        return "Per-task differences on identical episodes, mean ± 95% CI."
    return ("Per-task differences on identical episodes, mean ± 95% CI; where a task diverged for either "
            f"learner (loss not finite or above {st.DIVERGENCE_FACTOR:g}× the task's step-0 loss), the "
            "median of the paired differences with its distribution-free 95% CI (a diverged loss counts as "
            f"+∞), and the diverged tasks of the learner and of {ref}.")


def _diverged_series(diverged: dict[str, Sequence[int]] | None, x: Sequence[Any]) -> str:
    """``"MAML: 71 at 10, ..."``: where tasks diverged, per series."""
    if not diverged:
        return ""
    parts = []
    for n, counts in diverged.items():
        where = [f"{c} at {xi}" for xi, c in zip(x, counts, strict=True) if c]
        if where:
            parts.append(f"{n}: {', '.join(where)}")
    return "; ".join(parts)


def _significant(e: Estimate | Median) -> int:
    """+1 / −1 if the 95% CI excludes 0 on that side, else 0."""
    if isinstance(e, Median):
        return 1 if e.low > 0 else (-1 if e.high < 0 else 0)
    if not (math.isfinite(e.mean) and math.isfinite(e.ci)):
        return 0
    return 1 if e.low > 0 else (-1 if e.high < 0 else 0)


def _neg(e: Estimate | Median) -> Estimate | Median:
    if isinstance(e, Median):
        return Median(-e.median, -e.high, -e.low, e.n, e.confidence)
    return Estimate(-e.mean, e.ci, e.n, e.confidence)


def _two_over_alpha(inner_lrs: dict[str, float | None], names: Sequence[str]) -> dict[str, float]:
    """Legend label → 2/α for each distinct single α among ``names`` (GD on a quadratic is stable below)."""
    by_lr: dict[float, list[str]] = {}
    for n in names:
        lr = inner_lrs.get(n)
        if lr is not None:
            by_lr.setdefault(lr, []).append(n)
    if len(by_lr) == 1:
        (lr, _), = by_lr.items()
        return {f"2/α = {2 / lr:g} (α = {lr:g})": 2 / lr}
    return {f"2/α = {2 / lr:g} (α = {lr:g}: {', '.join(ns)})": 2 / lr for lr, ns in by_lr.items()}


class SectionContext:
    """What every study section needs: the folder, colours, units, protocol.

    Args:
        tmp: the folder the figures are drawn into (the report's temporary folder).
        learners: every learner compared, the reference first; fixes each one's colour.
        config: the reference run's configuration (task, classification or regression, queries).
        tasks: held-out tasks per study.
        fixed: the inner steps of the studies at a fixed number of steps.
    """

    def __init__(self, tmp: Path, learners: list[st.Learner], config: TrainConfig, tasks: int, fixed: int):
        self.tmp, self.config, self.tasks, self.fixed = tmp, config, tasks, fixed
        self.names = [lr.name for lr in learners]
        self.colors = method_colors(self.names)
        self.ref = self.names[0]
        self.classify = is_classification(config)
        self.unit = "cross-entropy" if self.classify else "MSE"
        self.task = config.task
        self.inner_lrs = {lr.name: st.single_inner_lr(lr) for lr in learners}

    def line(
        self,
        name: str,
        x: Sequence[float],
        series: dict[str, Sequence[Estimate]],
        *,
        xlabel: str,
        ylabel: str,
        title: str,
        caption: str,
        xunit: str | None = None,
        yunit: str | None = None,
        own_colors: bool = False,
        logx: bool = False,
        medians: dict[str, Sequence[Median]] | None = None,
        diverged: dict[str, Sequence[int]] | None = None,
    ) -> Figure | None:
        """Draw ``name``.png: mean ± 95% CI curves against ``x``, or medians where tasks diverged.

        Args:
            name: the PNG's file name without suffix.
            x: the shared x values.
            series: per learner (or curve), one ``Estimate`` per x.
            xlabel, ylabel, title, xunit, yunit, logx: as ``report.plots.line_plot_ci``.
            caption: the figure's caption; notes on medians, a log axis and curves left out are appended.
            own_colors: let the plot choose colours (the series are not learners).
            medians: per series, one ``Median`` per x, plotted instead where ``diverged`` counts any.
            diverged: per series, the diverged tasks at each x.

        Returns:
            The figure, or None when no series has finite values.
        """
        where = _diverged_series(diverged, x)
        robust = bool(where) and medians is not None
        data: dict[str, Any] = _median_series(medians) if robust else _series(series)  # type: ignore[arg-type]
        if not data:
            return None
        dropped = [k for k in series if k not in data]
        if robust:
            caption += (
                f" The inner loop diverged on some tasks ({where}; diverged: loss not finite or above "
                f"{st.DIVERGENCE_FACTOR:g}× its step-0 loss), so the curves show medians over all tasks "
                "with their distribution-free 95% CI (order statistics), not means."
            )
        colors = None if own_colors else {k: self.colors[k] for k in data}
        logy = _spread(data)
        path = line_plot_ci(
            self.tmp / f"{name}.png",
            x,
            data,
            xlabel=xlabel,
            ylabel=ylabel,
            title=title,
            xunit=xunit,
            yunit=yunit,
            colors=colors,
            logx=logx,
            logy=logy,
            integer_x=not logx and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                       for v in x),
        )
        if logy:
            caption += " Logarithmic y axis."
        if dropped:
            what = "median infinite: most tasks diverged" if robust else "non-finite values"
            caption += f" Not drawn ({what}): {', '.join(dropped)}."
        return Figure(path, caption)

    def bars(
        self,
        name: str,
        groups: Sequence[str],
        values: dict[str, Sequence[Estimate]],
        *,
        ylabel: str,
        title: str,
        caption: str,
        ylim: tuple[float, float] | None = None,
        xlabel: str = "layer",
        hlines: dict[str, float] | None = None,
    ) -> Figure | None:
        """Draw ``name``.png: grouped bars with 95% CI error bars.

        Args:
            name: the PNG's file name without suffix.
            groups: the bar groups (layers or learners).
            values: per bar colour (learner or condition), one ``Estimate`` per group.
            ylabel, title, ylim, xlabel, hlines: as ``report.plots.layer_bar_chart``.
            caption: the figure's caption.

        Returns:
            The figure, or None when no series has finite values.
        """
        data = _series(values)
        if not data:
            return None
        path = layer_bar_chart(
            self.tmp / f"{name}.png",
            list(groups),
            {k: v[0] for k, v in data.items()},
            errors={k: v[1] for k, v in data.items()},
            ylabel=ylabel,
            title=title,
            colors={k: self.colors.get(k, "#555555") for k in data}
            if all(k in self.colors for k in data)
            else None,
            ylim=ylim,
            xlabel=xlabel,
            tick_rotation=20.0 if max(len(g) for g in groups) > 8 else 0.0,
            hlines=hlines,
        )
        return Figure(path, caption)


def _figs(*figs: Figure | None) -> list[Figure]:
    return [f for f in figs if f is not None]



# ---------------------------------------------------------------------- sections
def adaptation_section(
    c: SectionContext, r: dict[str, Any], learners: list[st.Learner], summary: list[str]
) -> Section:
    """The adaptation curves (``studies.adaptation_curves``): loss against inner steps, extrapolation.

    Args:
        c: the report's context (folder, colours, unit).
        r: the study's result dict, as it goes into results.json.
        learners: the learners compared (their trained inner steps mark the table's columns).
        summary: the page's summary lines; this section's are appended.

    Returns:
        The section: explanatory text, figures, tables.
    """
    steps, ref, u = r["steps"], r["reference"], c.unit
    smax, f = steps[-1], c.fixed
    L = r["learners"]
    figs = _figs(
        c.line(
            "adaptation_query_loss",
            steps,
            {n: e["query_loss"] for n, e in L.items()},
            xlabel="inner SGD steps",
            ylabel="query loss",
            yunit=u,
            title=f"Query loss on {r['tasks']} held-out tasks",
            caption="Mean query loss after each number of inner steps; shaded: 95% CI over tasks.",
            medians={n: e["query_loss_median"] for n, e in L.items()},
            diverged={n: e["query_loss_diverged"] for n, e in L.items()},
        ),
        c.line(
            "adaptation_support_loss",
            steps,
            {n: e["support_loss"] for n, e in L.items()},
            xlabel="inner SGD steps",
            ylabel="support loss",
            yunit=u,
            title="Support loss (the data adapted on)",
            caption="Loss on the support set itself: a falling support loss with a rising query loss would "
            "be overfitting the support set.",
            medians={n: e["support_loss_median"] for n, e in L.items()},
            diverged={n: e["support_loss_diverged"] for n, e in L.items()},
        ),
        c.line(
            "adaptation_query_accuracy",
            steps,
            {n: e["query_accuracy"] for n, e in L.items() if "query_accuracy" in e},
            xlabel="inner SGD steps",
            ylabel="query accuracy",
            title="Query accuracy",
            caption="Mean query accuracy; shaded: 95% CI.",
        )
        if c.classify
        else None,
        c.line(
            "adaptation_paired_difference",
            steps,
            r["paired_query_loss"],
            xlabel="inner SGD steps",
            ylabel=f"query loss − {ref}",
            yunit=u,
            title=f"Paired difference to {ref}",
            caption=f"Per-task query loss minus {ref}'s on the same task; above 0: worse than {ref}.",
            medians=r.get("paired_query_loss_median"),
            diverged={n: e["query_loss_diverged"] for n, e in L.items()},
        ),
    )
    shown = sorted({0, 1, min(f, smax), smax} | {min(lr.trained_steps, smax) for lr in learners})
    rows = [[n, *(L[n]["query_loss"][s] for s in shown)] for n in L]
    prow, prob = _paired_rows(r, ref, shown)
    xrow = []
    for n, x in r["extrapolation"].items():
        xrow.append(
            [
                n,
                x["trained_steps"] if x["trained_steps"] is not None else "n/a",
                x["gain_after_trained"],
                x["best_step"],
                x["rebound"],
                L[n]["support_loss"][smax],
                x["query_minus_support"],
            ]
        )
    tables = [
        Table(
            f"Query loss ({u}) after k inner steps",
            ["learner", *(f"k={s}" for s in shown)],
            rows,
            note=f"Mean ± 95% CI half-width over {r['tasks']} held-out tasks, the same for every learner "
            "(tasks with a non-finite loss left out).",
        ),
        Table(
            f"Median query loss ({u}) after k inner steps [95% CI] (diverged tasks)",
            ["learner", *(f"k={s}" for s in shown)],
            [[n, *(_mcell(L[n]["query_loss_median"][s], L[n]["query_loss_diverged"][s]) for s in shown)]
             for n in L],
            note=f"Median over all {r['tasks']} tasks (a diverged task counts as +∞) with its "
            f"distribution-free 95% CI; diverged: loss not finite or above {st.DIVERGENCE_FACTOR:g}× the "
            "task's step-0 loss.",
        ),
        Table(
            f"Paired difference learner − {ref} in query loss ({u})",
            ["learner", *(f"k={s}" for s in shown)],
            prow,
            note=_paired_note(prob, ref),
        ),
    ]
    if c.classify:
        tables.append(
            Table(
                "Query accuracy after k inner steps",
                ["learner", *(f"k={s}" for s in shown)],
                [[n, *(L[n]["query_accuracy"][s] for s in shown)] for n in L],
            )
        )
    tables.append(
        Table(
            f"More steps than trained with (S = {smax})",
            [
                "learner",
                "trained steps k",
                "loss(k) − loss(S)",
                "best step",
                "loss(S) − best",
                f"support loss at S ({u})",
                "query − support at S",
            ],
            xrow,
            note="loss(k) − loss(S) > 0: it kept improving beyond its training steps; "
            "loss(S) − best > 0: the query loss rose again (overfitting the support set).",
        )
    )
    # summary
    fs = min(f, smax)
    T = r["tasks"]
    others = [n for n in L if n != ref]
    runs = [n for n in others if r["learners"][n]["kind"] in ("maml", "fomaml", "pretrain")]
    pm = r.get("paired_query_loss_median", {})
    for n in runs or others[:1]:
        div = {m: _ndiv(L[m], "query_loss", fs) for m in (ref, n)}
        rb = any(div.values())
        summary.append(
            f"After {fs} steps on {T} held-out {c.task} tasks, {ref}'s query {u} is "
            f"{_fmt(_pick(L[ref], 'query_loss', fs, rb))} vs "
            f"{_fmt(_pick(L[n], 'query_loss', fs, rb))} for {n} "
            f"(paired difference {n} − {ref}: "
            f"{_signed(pm[n][fs] if rb else r['paired_query_loss'][n][fs])}{_div_text(div, T)})."
        )
    base = [n for n in others if n not in runs]
    if base:
        div = {n: _ndiv(L[n], "query_loss", fs) for n in [ref, *base]}
        rb = any(div.values())
        summary.append(
            f"Baselines after {fs} steps (query {u}, paired difference to {ref}): "
            + "; ".join(
                f"{n} {_fmt(_pick(L[n], 'query_loss', fs, rb))} "
                f"({_signed(pm[n][fs] if rb else r['paired_query_loss'][n][fs])})"
                for n in base
            )
            + _div_text(div, T)
            + "."
        )
    for lr in learners:
        if lr.kind not in ("maml", "fomaml"):
            continue
        x, k = r["extrapolation"][lr.name], min(lr.trained_steps, smax)
        if k >= smax:
            continue
        E = L[lr.name]
        div = {lr.name: max(_ndiv(E, "query_loss", k), _ndiv(E, "query_loss", smax),
                            _ndiv(E, "support_loss", smax))}
        robust = any(div.values())
        gain = x["gain_after_trained_median"] if robust else x["gain_after_trained"]
        verdict = {1: "it keeps improving", 0: "no significant change", -1: "it gets worse"}[
            _significant(gain)
        ]
        rb = x["rebound_median"] if robust else x["rebound"]
        if _significant(rb) > 0:
            over = (
                f"the query loss rises again after step {x['best_step']} ({_signed(rb)}): overfitting "
                "the support set"
            )
        elif x["best_step"] == smax:
            over = f"the query loss is still lowest at step {smax}: no sign of overfitting the support set"
        else:
            over = (
                f"no sign of overfitting the support set (loss at step {smax} within {_fmt(rb)} of its "
                f"best, at step {x['best_step']})"
            )
        qms = x["query_minus_support_median"] if robust else x["query_minus_support"]
        summary.append(
            f"{lr.name} was meta-trained with {lr.trained_steps} inner step(s); from step {k} to "
            f"{smax} its query {u} goes from {_fmt(_pick(E, 'query_loss', k, robust))} to "
            f"{_fmt(_pick(E, 'query_loss', smax, robust))} (paired change {_signed(_neg(gain))}): "
            f"{verdict}; {over}. Support {u} at step {smax}: "
            f"{_fmt(_pick(E, 'support_loss', smax, robust))} (query − support {_signed(qms)})"
            + (f"; by step {smax}, {_ndiv(E, 'query_loss', smax)} of {T} tasks diverged" if robust else "")
            + "."
        )
    text = [
        f"Every learner is adapted by plain SGD on each task's support set (its own inner learning rate) "
        f"for 0 to {smax} steps and scored on the task's query set. Learners: the runs given; "
        "'ANIL (…)': the same MAML network adapting only its last layer (Raghu et al. 2020); "
        "'random init': a randomly initialized network of the same architecture (seeded), fine-tuned "
        "the same way."
    ]
    return Section(TITLES["adaptation"], text, figs, tables)


def shots_section(c: SectionContext, r: dict[str, Any], summary: list[str]) -> Section:
    """The shot sweep (``studies.shot_sweep``): loss at a fixed number of steps against K.

    Args:
        c: the report's context (folder, colours, unit).
        r: the study's result dict, as it goes into results.json, with ``kinds`` and
            ``unavailable_shots`` added.
        summary: the page's summary lines; this section's are appended.

    Returns:
        The section: explanatory text, figures, tables.
    """
    shots, u, ref, L = r["shots"], c.unit, r["reference"], r["learners"]
    figs = _figs(
        c.line(
            "shots_query_loss",
            shots,
            {n: e["query_loss"] for n, e in L.items()},
            xlabel="support examples K" + (" per class" if c.classify else ""),
            ylabel="query loss",
            yunit=u,
            title=f"Query loss after {r['steps']} steps against K",
            logx=True,
            caption=f"Mean query loss after {r['steps']} inner steps against the number of shots; "
            "shaded: 95% CI. Tasks are drawn from the same seeded stream for every K.",
            medians={n: e["query_loss_median"] for n, e in L.items()},
            diverged={n: e["query_loss_diverged"] for n, e in L.items()},
        ),
        c.line(
            "shots_query_accuracy",
            shots,
            {n: e["query_accuracy"] for n, e in L.items() if "query_accuracy" in e},
            xlabel="support examples K per class",
            ylabel="query accuracy",
            title="Query accuracy against K",
            logx=True,
            caption="Mean query accuracy; shaded: 95% CI.",
        )
        if c.classify
        else None,
    )
    prow, prob = _paired_rows(r, ref, range(len(shots)))
    tables = [
        Table(
            f"Query loss ({u}) after {r['steps']} steps",
            ["learner", *(f"K={k}" for k in shots)],
            [[n, *L[n]["query_loss"]] for n in L],
        ),
        Table(
            f"Median query loss ({u}) after {r['steps']} steps [95% CI] (diverged tasks)",
            ["learner", *(f"K={k}" for k in shots)],
            [[n, *map(_mcell, e["query_loss_median"], e["query_loss_diverged"])] for n, e in L.items()],
        ),
        Table(
            f"Paired difference learner − {ref} ({u})",
            ["learner", *(f"K={k}" for k in shots)],
            prow,
            note=_paired_note(prob, ref),
        ),
    ]
    if c.classify:
        tables.insert(
            2,
            Table(
                f"Query accuracy after {r['steps']} steps",
                ["learner", *(f"K={k}" for k in shots)],
                [[n, *e["query_accuracy"]] for n, e in L.items() if "query_accuracy" in e],
            ),
        )
    others = [n for n in L if n != ref and r.get("kinds", {}).get(n) in ("maml", "fomaml", "pretrain")]
    T = r.get("tasks", c.tasks)
    div = {n: max(_ndiv(L[n], "query_loss", 0), _ndiv(L[n], "query_loss", -1)) for n in [ref, *others]}
    rb = any(div.values())

    def ends(n: str) -> str:
        acc = c.classify and "query_accuracy" in L[n]
        if len(shots) == 1:
            text = f"{_fmt(_pick(L[n], 'query_loss', 0, rb))} with K={shots[0]}, the only K that fits"
            return text + (f" (accuracy {_fmt(L[n]['query_accuracy'][0])})" if acc else "")
        text = f"{_fmt(_pick(L[n], 'query_loss', 0, rb))} with K={shots[0]} and " \
            f"{_fmt(_pick(L[n], 'query_loss', -1, rb))} with K={shots[-1]}"
        if acc:
            text += f" (accuracy {_fmt(L[n]['query_accuracy'][0])} and {_fmt(L[n]['query_accuracy'][-1])})"
        return text

    summary.append(
        f"Shots ({r['steps']} steps): {ref}'s query {u} is {ends(ref)}"
        + "".join(f"; {n}: {ends(n)}" for n in others)
        + _div_text(div, T)
        + "."
    )
    text = [f"Query loss at a fixed {r['steps']} inner steps as the support set grows."]
    if r.get("unavailable_shots"):
        text.append(
            f"Only K = {', '.join(map(str, shots))} fit the held-out task pool: with {c.config.queries} "
            f"query example(s) per class, K = {', '.join(map(str, r['unavailable_shots']))} would need more "
            "examples per class than it holds (e.g. Omniglot's all_runs: 2 drawings per class)."
        )
    return Section(
        TITLES["shots"],
        text,
        figs,
        tables,
    )


def generalization_section(
    c: SectionContext, r: dict[str, Any], curves: dict[str, Any], summary: list[str]
) -> Section:
    """The generalization gap (``studies.generalization_gap``) and the meta-overfitting curves.

    Args:
        c: the report's context (folder, colours, unit).
        r: the study's result dict, as it goes into results.json.
        curves: per run, its ``studies.meta_overfitting_curve`` (runs without checkpoints left out).
        summary: the page's summary lines; this section's are appended.

    Returns:
        The section: explanatory text, figures, tables.
    """
    u, L, names = c.unit, r["learners"], list(r["learners"])
    same = r["same_distribution"]
    pool = getattr(c.config, "train_tasks", None)  # a run trained on a finite pool is checked on it
    seen = "training pool" if pool is not None else "training distribution"
    short = "pool" if pool is not None else "train-distribution"
    figs = _figs(
        c.bars(
            "generalization_gap",
            names,
            {
                seen: [L[n]["train_query_loss"] for n in names],
                "held-out": [L[n]["heldout_query_loss"] for n in names],
            },
            ylabel=f"query loss after {r['steps']} steps ({u})",
            title="Training-distribution vs held-out tasks",
            ylim=None,
            xlabel="learner",
            caption="Query loss on tasks from the meta-training distribution vs held-out tasks; "
            "error bars: 95% CI.",
        )
    )
    for run, cv in curves.items():
        fig = c.line(
            f"meta_overfitting_{len(figs)}",
            cv["iterations"],
            {"held-out": cv["heldout_query_loss"], seen: cv["train_query_loss"]},
            xlabel="meta-training iteration",
            ylabel=f"query loss after {cv['steps']} steps",
            yunit=u,
            title=f"Meta-overfitting: {run}",
            own_colors=True,
            caption=f"{run}: query loss after adaptation at each saved checkpoint "
            f"({len(cv['iterations'])} checkpoints); shaded: 95% CI.",
            medians={"held-out": cv["heldout_query_loss_median"],
                     seen: cv["train_query_loss_median"]},
            diverged={"held-out": cv["heldout_query_loss_diverged"],
                      seen: cv["train_query_loss_diverged"]},
        )
        if fig is not None:
            figs.append(fig)
    rows = [
        [
            n,
            L[n]["train_query_loss"],
            L[n]["heldout_query_loss"],
            L[n]["heldout_minus_train"],
            L[n]["heldout_support_loss"],
            L[n]["query_minus_support"],
        ]
        for n in names
    ]
    tables = [
        Table(
            f"Generalization after {r['steps']} steps ({u})",
            [
                "learner",
                f"{short} query",
                "held-out query",
                "held-out − train",
                "held-out support",
                "query − support",
            ],
            rows,
            note="held-out − train: Welch interval (different tasks); query − support: paired over "
            "held-out tasks.",
        ),
        Table(
            f"Medians after {r['steps']} steps ({u}) [95% CI] (diverged tasks)",
            ["learner", f"{short} query", "held-out query", "held-out support", "query − support"],
            [
                [
                    n,
                    *(_mcell(L[n][k + "_median"], L[n][k + "_diverged"])
                      for k in ("train_query_loss", "heldout_query_loss", "heldout_support_loss")),
                    L[n]["query_minus_support_median"],
                ]
                for n in names
            ],
            note=f"Medians over all tasks (a diverged task counts as +∞); diverged: loss not finite or above "
            f"{st.DIVERGENCE_FACTOR:g}× its step-0 loss.",
        ),
    ]
    if c.classify:
        tables.append(
            Table(
                "Accuracy after adaptation",
                ["learner", short, "held-out"],
                [[n, L[n]["train_query_accuracy"], L[n]["heldout_query_accuracy"]] for n in names],
            )
        )
    if curves:
        tables.append(
            Table(
                f"Meta-overfitting across checkpoints (query {u})",
                [
                    "run",
                    "checkpoints",
                    "best iteration",
                    "held-out at best",
                    "held-out final",
                    "final − best (paired)",
                ],
                [
                    [
                        run,
                        len(cv["iterations"]),
                        cv["best_iteration"],
                        cv["heldout_query_loss"][cv["iterations"].index(cv["best_iteration"])],
                        cv["heldout_query_loss"][-1],
                        cv["final_minus_best"],
                    ]
                    for run, cv in curves.items()
                ],
            )
        )
    ref = names[0]
    note = (
        "for sinusoids both are the same distribution, the training family with another seed: the gap "
        "should be 0"
        if same
        else "training characters vs unseen characters"
        if c.task == "omniglot"
        else "different distributions"
    )
    E = L[ref]
    div = {k: _ndiv(E, k) for k in ("train_query_loss", "heldout_query_loss", "heldout_support_loss")}
    if any(div.values()):
        summary.append(
            f"Training-distribution vs held-out tasks ({note}): {ref}'s query {u} after {r['steps']} steps "
            f"is {_fmt(E['train_query_loss_median'])} vs {_fmt(E['heldout_query_loss_median'])}; query − "
            f"support on held-out tasks {_signed(E['query_minus_support_median'])}; "
            f"{div['train_query_loss']} of {r['train_tasks']} training-distribution and "
            f"{max(div['heldout_query_loss'], div['heldout_support_loss'])} of {r['heldout_tasks']} held-out "
            "tasks diverged."
        )
    else:
        summary.append(
            f"Training-distribution vs held-out tasks ({note}): {ref}'s query {u} after {r['steps']} steps "
            f"is {_fmt(E['train_query_loss'])} vs {_fmt(E['heldout_query_loss'])} (difference "
            f"{_signed(E['heldout_minus_train'])}); query − support on held-out tasks "
            f"{_signed(E['query_minus_support'])}."
        )
    for run, cv in curves.items():
        fb, best, last = cv["final_minus_best"], cv["best_iteration"], cv["iterations"][-1]
        if best == last:
            verdict = f"lowest at the final iteration {last}: no meta-overfitting"
        else:
            verdict = f"lowest at iteration {best}; final ({last}) − best {_signed(fb)}: " + (
                "meta-overfitting, the final checkpoint is worse than the best"
                if _significant(fb) > 0
                else "no significant meta-overfitting"
            )
        summary.append(f"{run} across {len(cv['iterations'])} checkpoints: held-out query {u} is {verdict}.")
    text = [
        "Scores after adaptation on tasks from the meta-training distribution (drawn from a stream "
        "distinct from training's) and on the held-out evaluation tasks. " + note[0].upper() + note[1:] + "."
    ]
    if pool is not None:
        text.append(f"The run meta-trained on a fixed pool of {pool} tasks (--train-tasks), so its "
                    "training tasks here are the pool's own tasks and examples: the gap is the "
                    "meta-generalization gap of Chen et al. 2020 and Fallah et al. 2021 (mamlab sweep "
                    "measures how it shrinks with the pool).")
    return Section(TITLES["generalization"], text, figs, tables)


def shift_section(c: SectionContext, r: dict[str, Any], summary: list[str]) -> Section:
    """Distribution shift (``studies.distribution_shift``): loss as test tasks leave the training range."""
    u, ref = c.unit, r["reference"]
    figs, tables, parts = [], [], []
    for axis, ax in r["axes"].items():
        labels = ax["labels"]
        x = list(range(len(labels)))
        fig = c.line(
            f"shift_{axis}",
            x,
            {n: e["query_loss"] for n, e in ax["learners"].items()},
            xlabel=f"{axis} band (0 = training range): "
            + ", ".join(f"{i}={lab.replace('train ', '')}" for i, lab in enumerate(labels)),
            ylabel=f"query loss after {r['steps']} steps",
            yunit=u,
            title=f"Shift in {axis}",
            caption=f"Query loss as the {axis} of the test tasks moves beyond the training range; "
            "shaded: 95% CI.",
            medians={n: e["query_loss_median"] for n, e in ax["learners"].items()},
            diverged={n: e["query_loss_diverged"] for n, e in ax["learners"].items()},
        )
        if fig is not None:
            figs.append(fig)
        tables.append(
            Table(
                f"{axis}: query loss ({u}) after {r['steps']} steps",
                ["learner", *labels],
                [[n, *e["query_loss"]] for n, e in ax["learners"].items()],
                note="Means over the tasks with a finite loss; where n (in results.json) is below "
                "the task count, the inner loop diverged on the rest.",
            )
        )
        tables.append(
            Table(
                f"{axis}: median query loss ({u}) [95% CI] (diverged tasks)",
                ["learner", *labels],
                [[n, *map(_mcell, e["query_loss_median"], e["query_loss_diverged"])]
                 for n, e in ax["learners"].items()],
                note=f"Medians over all {c.tasks} tasks (a diverged task counts as +∞); diverged: loss not "
                f"finite or above {st.DIVERGENCE_FACTOR:g}× its step-0 loss.",
            )
        )
        E = ax["learners"][ref]
        d0, d1 = _ndiv(E, "query_loss", 0), _ndiv(E, "query_loss", -1)
        rb = bool(d0 or d1)
        e0, e1 = _pick(E, "query_loss", 0, rb), _pick(E, "query_loss", -1, rb)
        div = f", {d1} of {c.tasks} tasks diverged" if d1 else ""
        div0 = f" ({d0} of {c.tasks} diverged)" if d0 else ""
        acc = ""
        if "query_accuracy" in E:
            acc = f" (accuracy {_fmt(E['query_accuracy'][-1])} vs {_fmt(E['query_accuracy'][0])})"
        parts.append(f"{axis} {labels[-1]}: {_fmt(e1)} vs {_fmt(e0)} in range{div0}{div}{acc}")
    if parts:
        summary.append(
            f"Distribution shift ({ref}, query {u} after {r['steps']} steps): " + "; ".join(parts) + "."
        )
    text = [
        "Test tasks drawn beyond the training distribution; each band has its own seeded tasks, the same "
        "for every learner."
    ]
    return Section(TITLES["shift"], text, figs, tables)


def representation_section(c: SectionContext, r: dict[str, Any], summary: list[str]) -> Section:
    """Rapid learning or feature reuse (``studies.representation_change``): CKA, SVCCA, parameter change."""
    L = r["learners"]
    ref = next(iter(L))
    layers = L[ref]["layers"]
    same_arch = {n: e for n, e in L.items() if e["layers"] == layers}
    figs = _figs(
        c.bars(
            "representations_cka",
            layers,
            {n: e["cka"] for n, e in same_arch.items()},
            ylabel="linear CKA (before, after)",
            title=f"Representation similarity, {r['steps']} steps",
            caption="Linear CKA between each layer's output on the query inputs before and after adaptation, "
            "mean over tasks; 1 = unchanged; error bars: 95% CI.",
        ),
        c.bars(
            "representations_cca",
            layers,
            {n: e["cca"] for n, e in same_arch.items() if "cca" in e},
            ylabel="SVCCA similarity (before, after)",
            title="Representation similarity (SVCCA)",
            caption="Mean canonical correlation (SVCCA, 99% variance kept, ridge-regularized for few "
            "inputs); error bars: 95% CI.",
        ),
        c.bars(
            "representations_param_change",
            L[ref]["param_layers"],
            {n: e["param_change"] for n, e in same_arch.items()},
            ylim=None,
            ylabel="‖θ' − θ‖ / ‖θ‖",
            title="Relative parameter change per layer",
            caption="How far each layer's parameters (weight and bias) move during adaptation, relative "
            "to their norm; error bars: 95% CI.",
        ),
    )
    tables = []
    for n, e in L.items():
        rows = [[lab, e["cka"][j], e["cca"][j] if "cca" in e else None] for j, lab in enumerate(e["layers"])]
        tables.append(
            Table(
                f"{n}: similarity before vs after {r['steps']} steps", ["layer", "linear CKA", "SVCCA"], rows
            )
        )
    tables.append(
        Table(
            "Relative parameter change ‖θ' − θ‖ / ‖θ‖",
            ["layer", *L],
            [
                [
                    lab,
                    *(
                        e["param_change"][j] if e["param_layers"] == L[ref]["param_layers"] else None
                        for e in L.values()
                    ),
                ]
                for j, lab in enumerate(L[ref]["param_layers"])
            ],
            digits=4,
        )
    )
    for n, e in L.items():
        if e["kind"] not in ("maml", "fomaml"):
            continue
        body, head = e["cka"][:-1], e["cka"][-1]
        body_min = min((b for b in body if math.isfinite(b.mean)), key=lambda b: b.mean, default=None)
        pc = e["param_change"]
        holds = body_min is not None and body_min.mean >= 0.9 and head.mean < body_min.mean
        summary.append(
            f"Rapid learning or feature reuse ({n}, {r['steps']} steps): CKA before vs after adaptation is "
            f"at least {_fmt(body_min) if body_min else 'n/a'} in the body layers and {_fmt(head)} at the "
            "output; "
            f"the head's parameters move {_fmt(pc[-1])} (relative) vs at most "
            f"{_fmt(max(pc[:-1], key=lambda x: x.mean)) if len(pc) > 1 else 'n/a'} in the body. "
            + (
                "Raghu et al.'s finding holds here: the body barely changes (feature reuse)."
                if holds
                else "Raghu et al.'s finding (body CKA ≈ 1, only the head changes) does not hold here: "
                "the body's representations change during adaptation too (rapid learning)."
            )
        )
    text = [
        "For each task, every layer's output on the task's query inputs is captured with forward hooks "
        "under θ and under the task's adapted θ' and compared (Raghu et al. 2020: on MiniImagenet the "
        "conv layers barely change, CKA ≈ 1, and the head changes most). Feature reuse is declared when "
        "every body layer keeps CKA >= 0.9 and the output changes more. ANIL adapts only the head, so its "
        "body parameters change by exactly 0."
    ]
    return Section(TITLES["representations"], text, figs, tables)


def landscape_section(c: SectionContext, r: dict[str, Any], summary: list[str]) -> Section:
    """The loss landscape (``studies.landscape``): sharpness at θ and θ', gradient norms."""
    L, names = r["learners"], list(r["learners"])
    lines = _two_over_alpha(c.inner_lrs, names)
    figs = _figs(
        c.bars(
            "landscape_sharpness",
            names,
            {
                "support loss at θ": [L[n]["sharpness_support_theta"] for n in names],
                "support loss at θ'": [L[n]["sharpness_support_adapted"] for n in names],
                "query loss at θ'": [L[n]["sharpness_query_adapted"] for n in names],
            },
            ylim=None,
            xlabel="learner",
            ylabel="top Hessian eigenvalue",
            title=f"Sharpness ({r['tasks']} tasks)",
            caption="Largest Hessian eigenvalue (power iteration on Hessian-vector products) of each task's "
            "loss w.r.t. the adapted parameters; error bars: 95% CI over tasks."
            + (" Dashed: 2/α, above which an inner gradient step of size α overshoots along the top "
               "eigenvector (learners with learned step sizes have no single α)." if lines else ""),
            hlines=lines,
        ),
        c.line(
            "landscape_grad_norm",
            list(range(r["steps"] + 1)),
            {n: e["grad_norm"] for n, e in L.items()},
            xlabel="inner SGD step",
            ylabel="‖∇ support loss‖",
            title="Gradient norm along the inner loop",
            caption="Norm of the support-loss gradient at each inner step; shaded: 95% CI.",
        ),
    )
    rows = [
        [
            n,
            L[n]["sharpness_support_theta"],
            L[n]["sharpness_support_adapted"],
            L[n]["sharpness_change"],
            L[n]["sharpness_query_adapted"],
            L[n]["converged"],
        ]
        for n in names
    ]
    tables = [
        Table(
            "Sharpness (top Hessian eigenvalue)",
            ["learner", "support @ θ", "support @ θ'", "θ' − θ (paired)", "query @ θ'", "converged"],
            rows,
            note=f"Power iteration: at most {r['iters']} products, relative tolerance {r['tol']}; "
            "converged: fraction of runs that met it.",
        )
    ]
    ref = names[0]
    g = L[ref]["grad_norm"]
    summary.append(
        f"Landscape ({ref}, {r['tasks']} tasks): top Hessian eigenvalue of the support loss "
        f"{_fmt(L[ref]['sharpness_support_theta'], 2)} at θ vs "
        f"{_fmt(L[ref]['sharpness_support_adapted'], 2)} at θ' (paired change "
        f"{_signed(L[ref]['sharpness_change'], 2)}); gradient norm {_fmt(g[0])} at step 0, "
        f"{_fmt(g[-1])} at step {r['steps']}."
    )
    return Section(
        TITLES["landscape"],
        [f"Curvature and gradients over the first {r['tasks']} held-out tasks, {r['steps']} inner steps."],
        figs,
        tables,
    )


def _alpha_text(lr: Any) -> str:
    """α as text, or ``"learned step sizes"`` where the learner has no single one."""
    try:
        return "learned step sizes" if lr is None else f"{float(lr):g}"
    except (TypeError, ValueError, RuntimeError):
        return "learned step sizes"


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def protocol_section(protocol: dict[str, Any], runs: Sequence[dict[str, Any]],
                     learners: Sequence[dict[str, Any]], classify: bool = False) -> Section:
    """What was measured and on which runs: episode sizes, α, steps, seed, tasks, and every run analysed.

    Args:
        protocol: ``results.json``'s ``"protocol"`` (tasks, seed, steps, fixed_steps, shots, queries,
            task, studies, reference, confidence).
        runs: ``results.json``'s ``"runs"``: per run its path, algorithm, options, iteration, inner_lr.
        learners: ``results.json``'s ``"learners"``: every learner compared, derived ones included.
        classify: classification tasks (the sizes are per class).

    Returns:
        The section: a paragraph and two tables (the protocol, the runs and learners).
    """
    per = " per class" if classify else ""
    steps, fixed = protocol["steps"], protocol["fixed_steps"]
    rows: list[list[Any]] = [
        ["task family", protocol["task"]],
        ["support set (K)", f"{protocol['shots']} examples{per}"],
        ["query set", f"{protocol['queries']} examples{per}"],
        ["held-out tasks", protocol["tasks"]],
        ["evaluation seed", protocol["seed"]],
        ["inner steps", f"up to {steps} (adaptation curves); {fixed} (the other studies)"],
        ["inner step size α", "; ".join(f"{lr['name']}: {_alpha_text(lr['inner_lr'])}" for lr in learners)],
        ["reference of paired differences", protocol["reference"]],
        ["confidence", f"{protocol['confidence']:.0%} intervals"],
        ["studies", ", ".join(protocol["studies"])],
    ]
    run_rows = [[r["path"], r["algorithm"], r["iterations"], _alpha_text(r["inner_lr"]), r["inner_steps"],
                 _options_text(r["algorithm_options"])] for r in runs]
    return Section(
        "Protocol",
        [f"Every learner is scored on the same {protocol['tasks']} held-out tasks (evaluation seed "
         f"{protocol['seed']}), each with {protocol['shots']} support and {protocol['queries']} query "
         f"examples{per}; the differences to {protocol['reference']} are paired over these tasks. "
         "Runs analysed and the learners derived from them are listed below."],
        tables=[
            Table("Protocol", ["setting", "value"], rows),
            Table("Runs analysed", ["run", "algorithm", "iteration", "α", "inner steps", "options"], run_rows,
                  note="iteration: the checkpoint (or final model) analysed; α: the inner step size, "
                  "or learned step sizes where the algorithm has no single one."),
            Table("Learners compared", ["learner", "kind", "α", "adapted parameters"],
                  [[lr["name"], lr["kind"], _alpha_text(lr["inner_lr"]),
                    "all" if lr["inner_params"] is None else ", ".join(lr["inner_params"])]
                   for lr in learners]),
        ],
    )


def cost_section(timings: dict[str, float], chosen: list[str], learners: int, tasks: int) -> Section:
    """The wall time of each study, with and without its figures, and the total.

    Args:
        timings: seconds per study, per ``study + "_with_figures"``, and ``"total"``.
        chosen: the studies run, in report order.
        learners: how many learners were compared.
        tasks: held-out tasks per study.

    Returns:
        The section: one sentence and one table.
    """
    rows = [[s, round(timings[s], 2), round(timings[s + "_with_figures"], 2)] for s in chosen]
    rows.append(["total (loading, episodes, all studies, figures)", round(timings["total"], 2), None])
    return Section(
        "Cost",
        [f"Wall time of each study on this machine ({learners} learners, {tasks} tasks)."],
        tables=[Table("Wall time (s)", ["study", "compute", "with figures"], rows, digits=2)],
    )


def skipped_section(study: str, reason: str) -> Section:
    """A study's section that only says why the study did not run.

    Args:
        study: one of ``studies.STUDIES``.
        reason: one sentence without its final period.

    Returns:
        The section: its title and the reason.
    """
    return Section(TITLES[study], [reason + "."])


def _reference_shots(run: dict[str, Any], shots: Sequence[int]) -> int:
    """A run's K for its 2×2 table: 5 (Finn et al.'s test K), else its training K, else the first measured."""
    for k in (5, run["training_shots"]):
        if k in shots:
            return k
    return shots[0]


def _predicts(cells: dict[str, int]) -> str:
    """One sentence on what a 2×2 table (sharp × diverged) says about λ_max > 2/α as a predictor."""
    div = cells["sharp_diverged"] + cells["flat_diverged"]
    sharp = cells["sharp_diverged"] + cells["sharp_stable"]
    if div == 0:
        return ("no task diverged, so these tasks cannot test whether λ_max > 2/α predicts divergence"
                + (f" ({sharp} were sharp and still converged)" if sharp else ""))
    caught = cells["sharp_diverged"]
    text = (f"{caught} of the {div} diverged tasks had λ_max > 2/α, and {caught} of the {sharp} sharp tasks "
            "diverged")
    if caught == div and caught == sharp:
        return text + ": the threshold separates diverged from stable tasks exactly"
    if caught == div:
        return text + ": every diverged task was sharp, but sharpness at θ alone does not make a task diverge"
    if caught == 0:
        return (text + ": the curvature at θ does not predict which tasks diverge (it changes along the "
                "inner trajectory)")
    return text + ": the threshold flags some, not all, of the diverging tasks"


def stability_section(c: SectionContext, r: dict[str, Any], summary: list[str]) -> Section:
    """The edge of stability (``studies.stability``): λ_max over training against 2/α, and divergence."""
    runs, skipped = r["runs"], r["skipped"]
    text: list[str] = []
    for name, reason in skipped.items():
        text.append(f"Skipped {name}: {reason}.")
    if not runs:
        return Section(TITLES["stability"], text or ["No run with a single inner step size was given."])
    steps, shots = r["steps"], r["shots"]
    last = len(steps) - 1
    curves = {n: e["curve"] for n, e in runs.items()}
    mc = {n: _mc(cv["sharpness"]) for n, cv in curves.items()}
    drawable = {n: (cv["iterations"], *mc[n]) for n, cv in curves.items() if mc[n] is not None}
    figs: list[Figure] = []
    if drawable:
        values = [v for _, m, _ in drawable.values() for v in m]
        values += [runs[n]["two_over_alpha"] for n in drawable]
        values += [v for n in drawable for v in curves[n]["sharpness_max"]]
        logy = min(values) > 0 and max(values) / min(values) > 20
        colors = {n: c.colors.get(n, "#555555") for n in drawable}
        path = curves_with_thresholds(
            c.tmp / "stability_sharpness.png", drawable, {n: runs[n]["two_over_alpha"] for n in drawable},
            maxima={n: curves[n]["sharpness_max"] for n in drawable}, colors=colors, logy=logy,
            xlabel="training iteration", ylabel="top Hessian eigenvalue of the support loss at θ",
            title=f"Sharpness over training ({r['curve_tasks']} tasks, training K)")
        figs.append(Figure(path, "Largest Hessian eigenvalue λ_max of each held-out task's support loss at "
                                 "the meta-learned θ, at each checkpoint (the same tasks throughout): mean "
                                 "with 95% CI band, dotted the largest over the tasks; dashed: 2/α of each "
                                 "run, above which one inner gradient step of size α overshoots along the "
                                 "top eigenvector of a quadratic."
                                 + (" Logarithmic y axis." if logy else "")))
    ns = steps[last]
    div_series = {f"{n}: diverged": ([float(d[last]) for d in e["diverged"]], [0.0] * len(shots))
                  for n, e in runs.items()}
    div_series.update({f"{n}: λ_max > 2/α": ([float(s) for s in e["sharp"]], [0.0] * len(shots))
                       for n, e in runs.items()})
    figs.append(Figure(
        line_plot_ci(c.tmp / "stability_diverged.png", shots, div_series, xlabel="support points K",
                     ylabel="tasks", title=f"Diverged after {ns} steps vs sharp tasks at θ", integer_x=True),
        f"Of the {runs[next(iter(runs))]['tasks'][0]} held-out tasks per K: those whose query loss diverged "
        f"after {ns} inner steps (not finite or above {st.DIVERGENCE_FACTOR:g}× its step-0 loss) and those "
        "whose support loss at the final θ has λ_max > 2/α (counts, no interval)."))
    curve_rows = []
    for n, e in runs.items():
        cv = curves[n]
        curve_rows.append([n, f"{e['inner_lr']:g}", round(e["two_over_alpha"], 3), cv["iterations"][0],
                           cv["sharpness"][0], cv["iterations"][-1], cv["sharpness"][-1],
                           round(cv["sharpness_max"][-1], 3),
                           f"{cv['above_two_over_alpha'][-1]} of {cv['tasks']}", cv["converged"][-1]])
    div_rows = []
    for n, e in runs.items():
        for i, k in enumerate(shots):
            div_rows.append([n, k, e["sharpness"][i], round(e["sharpness_max"][i], 3),
                             f"{e['sharp'][i]} of {e['tasks'][i]}", *e["diverged"][i]])
    tables = [
        Table("Sharpness over training (support loss at θ, training K)",
              ["run", "α", "2/α", "first iteration", "λ_max (mean ± CI)", "final iteration",
               "λ_max (mean ± CI)", "max over tasks", "tasks > 2/α", "converged"], curve_rows,
              note=f"Power iteration per task: at most {r['iters']} Hessian-vector products, relative "
                   f"residual tolerance {r['tol']}; converged: fraction of tasks that met it at the final "
                   "checkpoint."),
        Table("Diverged tasks against support points and inner steps (final θ)",
              ["run", "K", "λ_max (mean ± CI)", "max", "tasks > 2/α",
               *[f"diverged after {s}" for s in steps]],
              div_rows,
              note=f"Diverged: query loss not finite or above {st.DIVERGENCE_FACTOR:g}× the task's step-0 "
                   "loss."),
    ]
    for n, e in runs.items():
        k = _reference_shots(e, shots)
        cells = e["contingency"][shots.index(k)][last]
        tables.append(Table(
            f"{n}: sharp × diverged, K = {k}, {ns} steps",
            ["support loss at θ", f"diverged after {ns} steps", "not diverged"],
            [["λ_max > 2/α (sharp)", cells["sharp_diverged"], cells["sharp_stable"]],
             ["λ_max ≤ 2/α", cells["flat_diverged"], cells["flat_stable"]]],
            note=f"Tasks counted; α = {e['inner_lr']:g}, 2/α = {e['two_over_alpha']:.4g}."))
    all_rows = [[n, k, *[cell[key] for key in st.CONTINGENCY_CELLS]]
                for n, e in runs.items() for i, k in enumerate(shots) for cell in [e["contingency"][i][last]]]
    tables.append(Table(f"Sharp × diverged at every K ({ns} steps)",
                        ["run", "K", "sharp, diverged", "sharp, not", "not sharp, diverged",
                         "not sharp, not"],
                        all_rows))
    for n, e in runs.items():
        cv = curves[n]
        ratio = cv["sharpness"][-1].mean * e["inner_lr"] / 2
        text.append(
            f"{n} (α = {e['inner_lr']:g}, 2/α = {e['two_over_alpha']:.4g}): the top Hessian eigenvalue of "
            f"the support loss at θ (training K = {e['training_shots']}) went from "
            f"{_fmt(cv['sharpness'][0], 1)} at iteration {cv['iterations'][0]} to "
            f"{_fmt(cv['sharpness'][-1], 1)} at iteration {cv['iterations'][-1]}, "
            f"{ratio:.2f}× 2/α (largest over the {cv['tasks']} tasks {_num(cv['sharpness_max'][-1], 1)}); "
            f"{cv['above_two_over_alpha'][-1]} of {cv['tasks']} tasks lie above 2/α.")
        k = _reference_shots(e, shots)
        i = shots.index(k)
        counts = " / ".join(str(d) for d in e["diverged"][i])
        pooled = {key: sum(e["contingency"][j][last][key] for j in range(len(shots)))
                  for key in st.CONTINGENCY_CELLS}
        text.append(
            f"At the final θ with K = {k}, {counts} of {e['tasks'][i]} tasks diverged after "
            f"{' / '.join(str(s) for s in steps)} steps; over K = {', '.join(str(s) for s in shots)} and "
            f"{ns} steps, {_predicts(pooled)}.")
        summary.append(
            f"Stability ({n}, α = {e['inner_lr']:g}): final λ_max {_fmt(cv['sharpness'][-1], 1)} against "
            f"2/α = {e['two_over_alpha']:.4g}; at K = {k}, {counts} of {e['tasks'][i]} tasks diverged after "
            f"{' / '.join(str(s) for s in steps)} steps.")
    return Section(TITLES["stability"], text, figs, tables)
