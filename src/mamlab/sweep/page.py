"""The sweep's page: the gap against M and N on log-log axes, fitted slopes against theory, other keys.

``write_sweep_report(folder, spec, records)`` turns the runs' records (``runner.load_results``)
into figures, sentences and tables and writes them with ``mamlab.report.html.write_report``.

Theory the slopes are held against:

* Chen et al. 2020 (A Closer Look at the Training Strategy for Modern Meta-Learning): the
  meta-generalization gap (new tasks − pool tasks) is O(1/√M): slope −0.5 in M, 0 in N.
* Fallah et al. 2021 (Generalization of MAML: Recurring and Unseen Tasks): on recurring tasks
  (the pool's tasks with fresh examples) the gap is O(1/(MN)): slope −1 in M and in N.

A gap that is ≤ 0 cannot go on a log axis; such points are left out of the figures and fits and
counted on the page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mamlab.errors import MamlabError
from mamlab.report.html import Figure, Section, Table, write_report
from mamlab.report.plots import DPI, PALETTE, new_figure
from mamlab.stats import mean_ci, paired_difference_ci
from mamlab.sweep.fit import PowerLawFit, power_law_fit
from mamlab.sweep.grid import SweepSpec, format_value

__all__ = ["write_sweep_report", "seed_mean", "gap_fits", "THEORY"]

#: The predicted slopes: (gap kind, regressor) → (slope, who predicts it).
THEORY: dict[tuple[str, str], tuple[float, str]] = {
    ("gap", "M"): (-0.5, "Chen et al. 2020 predict a gap of O(1/√M)"),
    ("gap", "N"): (0.0, "Chen et al. 2020 predict a gap independent of the examples per task"),
    ("recurring_gap", "M"): (-1.0, "Fallah et al. 2021 predict O(1/(MN)) on recurring tasks"),
    ("recurring_gap", "N"): (-1.0, "Fallah et al. 2021 predict O(1/(MN)) on recurring tasks"),
    ("exact_excess", "M"): (-1.0, "classical asymptotics predict O(d/M) for the minimizer of an average of "
                            "M tasks' quadratic losses"),
}
_GAP_WORDS = {"gap": "gap on new tasks (new − pool)",
              "recurring_gap": "gap on recurring tasks (recurring − pool)",
              "exact_excess": "exact excess meta-test loss F(θ) − F(θ*)"}
_POOL_KEYS = ("train_tasks", "shots", "train_examples")


def seed_mean(values: Sequence[float]) -> tuple[float, float]:
    """The mean over seeds and its 95% t half-width (``nan`` with one seed or a non-finite value)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        return float("nan"), float("nan")
    if arr.size == 1:
        return float(arr[0]), float("nan")
    return mean_ci(arr)


def _label(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in values.items()) or "all runs"


def _others(record: Mapping[str, Any], drop: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in record["values"].items() if k not in drop)


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _groups(records: Sequence[Mapping[str, Any]],
            drop: Sequence[str]) -> dict[tuple, list[Mapping[str, Any]]]:
    out: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        out.setdefault(tuple((k, _freeze(v)) for k, v in _others(r, drop)), []).append(r)
    return out


# ---------------------------------------------------------------------- fits
def gap_fits(records: Sequence[Mapping[str, Any]], kind: str = "gap") -> list[dict[str, Any]]:
    """Power-law fits of a gap against M and N, one set per combination of the other grid keys.

    For each combination: the joint fit ``log gap = a + b_M log M + b_N log N`` when both vary,
    and the fits in M alone at each N and in N alone at each M (OLS over every seed's point).
    """
    pooled = [r for r in records if r.get("train_tasks") is not None and kind in r]
    fits = []
    for key, group in _groups(pooled, _POOL_KEYS).items():
        gaps = [r[kind]["mean"] for r in group]
        m = [r["train_tasks"] for r in group]
        n = [r["train_examples"] for r in group]
        entry: dict[str, Any] = {"others": dict(key), "kind": kind, "points": len(group),
                                 "nonpositive": sum(1 for g in gaps if not (g == g and g > 0)),
                                 "joint": None, "in_M": [], "in_N": []}
        if len(set(m)) > 1 and len(set(n)) > 1:
            entry["joint"] = _try_fit(gaps, M=m, N=n)
        for label, x, by in (("in_M", m, n), ("in_N", n, m)):
            name = "M" if label == "in_M" else "N"
            for fixed in sorted(set(by)):
                idx = [i for i, b in enumerate(by) if b == fixed]
                xs = [x[i] for i in idx]
                if len(set(xs)) > 1:
                    entry[label].append({"at": fixed, "fit": _try_fit([gaps[i] for i in idx], **{name: xs})})
        fits.append(entry)
    return fits


def _try_fit(y: Sequence[float], **xs: Sequence[float]) -> PowerLawFit | str:
    try:
        return power_law_fit(y, **xs)
    except MamlabError as e:
        return str(e)


def _slope_text(fit: PowerLawFit | str | None, name: str, kind: str) -> str:
    if fit is None:
        return ""
    if isinstance(fit, str):
        return f"no fit ({fit})"
    s = fit.slopes[name]
    if (kind, name) not in THEORY:
        return (f"slope in log {name} = {s.value:.3f} [{s.low:.3f}, {s.high:.3f}] (95% CI, {fit.n} points, "
                f"{fit.excluded} ≤ 0 left out); no power law is predicted in {name}")
    predicted, who = THEORY[(kind, name)]
    if not math.isfinite(s.ci):
        verdict = "no interval (as many points as coefficients)"
    else:
        verdict = (f"the interval contains {predicted:g}" if s.contains(predicted)
                   else f"the interval excludes {predicted:g}")
    return (f"slope in log {name} = {s.value:.3f} [{s.low:.3f}, {s.high:.3f}] (95% CI, {fit.n} points, "
            f"{fit.excluded} ≤ 0 left out); {who}: slope {predicted:g}; {verdict}")


# ---------------------------------------------------------------------- figures
def _loglog_figure(path: Path, lines: Mapping[str, list[tuple[float, float, float]]], *, xlabel: str,
                   ylabel: str, title: str) -> tuple[Path, int]:
    """Mean ± CI against x on log-log axes, one line per name; returns the path and the points not drawn."""
    fig, ax = new_figure(6.4, 4.2, log_grid=True)
    hidden = 0
    for i, (name, pts) in enumerate(lines.items()):
        shown = [(x, m, c) for x, m, c in pts if m == m and m > 0]
        hidden += len(pts) - len(shown)
        if not shown:
            continue
        xs, ms, cs = (np.array(v, dtype=np.float64) for v in zip(*shown, strict=True))
        cs = np.where(np.isfinite(cs), cs, 0.0)
        low = np.minimum(cs, ms - ms / 10)  # a band reaching below 0 stops short of the log axis' bottom
        ax.errorbar(xs, ms, yerr=[low, cs], color=PALETTE[i % len(PALETTE)], marker="o", markersize=4,
                    linewidth=1.6, capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if lines:
        ax.legend(frameon=False, fontsize="small", title="bars: 95% CI over seeds", title_fontsize="small")
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path, hidden


def _key_figure(path: Path, key: str, xs: Sequence[Any], lines: Mapping[str, list[tuple[float, float]]],
                *, ylabel: str, title: str) -> Path:
    """Mean ± CI against a grid key's values (numbers on a log axis when positive, else categories)."""
    fig, ax = new_figure(6.4, 4.2, log_grid=True)
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    positions = [float(x) for x in xs] if numeric else list(range(len(xs)))
    for i, (name, pts) in enumerate(lines.items()):
        ms = np.array([p[0] for p in pts], dtype=np.float64)
        cs = np.array([p[1] if p[1] == p[1] else 0.0 for p in pts], dtype=np.float64)
        ax.errorbar(positions, ms, yerr=cs, color=PALETTE[i % len(PALETTE)], marker="o", markersize=4,
                    linewidth=1.6 if numeric else 0, elinewidth=1.4, capsize=3, label=name)
    if numeric and all(p > 0 for p in positions) and max(positions) / min(positions) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(positions, [format_value(x) for x in xs])
    ax.set_xlabel(key)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize="small", title="bars: 95% CI", title_fontsize="small")
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


# ---------------------------------------------------------------------- sections
def _series(records: Sequence[Mapping[str, Any]], xkey: str, value: Any, line_drop: Sequence[str],
            label: Any) -> dict[str, list[tuple[float, float, float]]]:
    """Line name → [(x, mean over seeds, CI)] for x = ``xkey`` of the records, ``value(record)``."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for key, group in _groups(records, line_drop).items():
        by_x: dict[float, list[float]] = {}
        for r in group:
            by_x.setdefault(r[xkey], []).append(value(r))
        lines[label(dict(key), group[0])] = [(x, *seed_mean(v)) for x, v in sorted(by_x.items())]
    return lines


def _pool_section(folder: Path, records: Sequence[Mapping[str, Any]], summary: list[str],
                  results: dict[str, Any]) -> list[Section]:
    """The figures (first), then the fitted slopes held against theory and the pool runs' table."""
    pooled = [r for r in records if r.get("train_tasks") is not None and "gap" in r]
    if not pooled:
        return []
    kinds = ["gap"] + [k for k in ("recurring_gap", "exact_excess") if all(k in r for r in pooled)]
    vary_m = len({r["train_tasks"] for r in pooled}) > 1
    vary_n = len({r["train_examples"] for r in pooled}) > 1
    figures, text = [], []

    def n_label(others: dict[str, Any], r: Mapping[str, Any]) -> str:
        rest = {k: v for k, v in others.items() if k not in _POOL_KEYS}
        extra = f", {_label(rest)}" if rest else ""
        return f"N={r['train_examples']} ({r['shots']}-shot){extra}"

    def m_label(others: dict[str, Any], r: Mapping[str, Any]) -> str:
        rest = {k: v for k, v in others.items() if k not in _POOL_KEYS}
        return f"M={r['train_tasks']}" + (f", {_label(rest)}" if rest else "")

    for kind in kinds:
        word = _GAP_WORDS[kind]
        if vary_m:
            lines = _series(pooled, "train_tasks", lambda r, k=kind: r[k]["mean"], ["train_tasks"], n_label)
            png, hidden = _loglog_figure(folder / f"{kind}_vs_M.png", lines, xlabel="training tasks M",
                                         ylabel=word, title=f"Meta-generalization {word} against M")
            figures.append(Figure(png, f"The {word} against the number of training tasks M (log-log), "
                                  "one line per examples per task N; mean over seeds with 95% CI. "
                                  f"{hidden} mean(s) ≤ 0 not drawn."))
        if vary_n:
            lines = _series(pooled, "train_examples", lambda r, k=kind: r[k]["mean"],
                            ["shots", "train_examples"], m_label)
            png, hidden = _loglog_figure(folder / f"{kind}_vs_N.png", lines, xlabel="examples per task N",
                                         ylabel=word, title=f"Meta-generalization {word} against N")
            figures.append(Figure(png, f"The {word} against the examples per task N (log-log), one line "
                                  f"per M; mean over seeds with 95% CI. {hidden} mean(s) ≤ 0 not drawn."))
    if vary_m:
        lines = _series(pooled, "train_tasks", lambda r: r["new"]["loss"], ["train_tasks"], n_label)
        png, _ = _loglog_figure(folder / "new_loss_vs_M.png", lines, xlabel="training tasks M",
                                ylabel="query loss on new tasks", title="New-task loss against M")
        figures.append(Figure(png, "Query loss on new tasks after the inner steps against M (log-log); mean "
                              "over seeds with 95% CI."))
    fits_json = {}
    for kind in kinds:
        fits = gap_fits(pooled, kind)
        fits_json[kind] = [_fit_json(f) for f in fits]
        nonpos = sum(f["nonpositive"] for f in fits)
        total = sum(f["points"] for f in fits)
        other = "new-task" if kind == "gap" else "recurring-task"
        if kind == "exact_excess":
            text.append("Exact excess meta-test loss: the linear model's F(θ) − F(θ*) after one inner "
                        "step, computed in closed form (mamlab.analysis.linear_theory), so it has no "
                        f"sampling error; {nonpos} of {total} runs are at the optimum to rounding.")
        else:
            text.append(f"{_GAP_WORDS[kind].capitalize()}: {nonpos} of {total} runs have a gap ≤ 0 (the "
                        f"pool loss is not below the {other} loss); they cannot go on a log axis and are "
                        "left out of the fits, not dropped silently.")
            summary.append(f"{kind}: {nonpos} of {total} runs with a gap ≤ 0 left out of the log-log fits")
        for f in fits:
            where = f" ({_label(f['others'])})" if f["others"] else ""
            if isinstance(f["joint"], str):
                text.append(f"Joint fit in M and N{where}: no fit ({f['joint']}).")
            elif f["joint"] is not None:
                for name in ("M", "N"):
                    line = _slope_text(f["joint"], name, kind)
                    text.append(f"Joint fit log gap = a + b_M log M + b_N log N{where}: {line}.")
                    summary.append(f"{kind} {name}-slope{where}: {_short(f['joint'], name, kind)}")
            for label, name, other in (("in_M", "M", "N"), ("in_N", "N", "M")):
                for item in f[label]:
                    text.append(f"Fit in {name} at {other}={item['at']}{where}: "
                                f"{_slope_text(item['fit'], name, kind)}.")
                    if f["joint"] is None and not isinstance(item["fit"], str):
                        summary.append(f"{kind} {name}-slope at {other}={item['at']}{where}: "
                                       f"{_short(item['fit'], name, kind)}")
    results["fits"] = fits_json
    rows = []
    for r in pooled:
        row = [r["name"], r["train_tasks"], r["train_examples"], (r["pool"]["loss"], r["pool"]["loss_ci95"]),
               (r["new"]["loss"], r["new"]["loss_ci95"]), (r["gap"]["mean"], r["gap"]["ci"])]
        if "recurring_gap" in kinds:
            row.append((r["recurring_gap"]["mean"], r["recurring_gap"]["ci"]))
        if "exact_excess" in kinds:
            row.append(r["exact_excess"]["mean"])
        rows.append(row)
    columns = ["run", "M", "N", "pool loss", "new-task loss", "gap (new − pool)"]
    if "recurring_gap" in kinds:
        columns.append("recurring − pool")
    if "exact_excess" in kinds:
        columns.append("exact F(θ) − F(θ*)")
    tables = [Table("Every pool run: losses after the inner steps (95% CI over tasks)", columns, rows)]
    intro = ("Each run meta-trains on a fixed pool of M tasks with N examples each and is scored on its pool "
             "tasks (their own examples), on the pool tasks with fresh examples (recurring, where the task "
             "family is parametric) and on new tasks, all on episodes drawn with the sweep's evaluation "
             "seed. The gap is new − pool (Welch's 95% CI over tasks per run); slopes are OLS fits of log "
             "gap over every seed's run with a t interval. Theory: Chen et al. 2020 predict a gap of "
             "O(1/√M), slope −0.5 in M, independent of N; Fallah et al. 2021 predict O(1/(MN)) on recurring "
             "tasks, slope −1 in M and in N (and, for new tasks, a term set by the distance between the "
             "task distributions).")
    if "exact_excess" in kinds:
        intro += (" For a linear model on linear-regression tasks with one inner step the meta-test loss is "
                  "known in closed form, so each run's exact excess F(θ) − F(θ*) over the population "
                  "optimum is shown too, free of evaluation noise.")
    return [Section("Meta-generalization against tasks M and examples N", [intro], figures),
            Section("Fitted slopes against theory", text, [], tables)]


def _short(fit: PowerLawFit, name: str, kind: str) -> str:
    s = fit.slopes[name]
    if (kind, name) not in THEORY:
        return f"{s.value:.3f} [{s.low:.3f}, {s.high:.3f}], no prediction"
    predicted = THEORY[(kind, name)][0]
    inside = s.contains(predicted)
    verdict = "no CI" if inside is None else ("contains" if inside else "excludes")
    return f"{s.value:.3f} [{s.low:.3f}, {s.high:.3f}], theory {predicted:g} ({verdict})"


def _fit_json(entry: Mapping[str, Any]) -> dict[str, Any]:
    def one(f: PowerLawFit | str | None) -> Any:
        return f.to_dict() if isinstance(f, PowerLawFit) else f

    return {"others": entry["others"], "points": entry["points"], "nonpositive": entry["nonpositive"],
            "joint": one(entry["joint"]),
            "in_M": [{"N": i["at"], "fit": one(i["fit"])} for i in entry["in_M"]],
            "in_N": [{"M": i["at"], "fit": one(i["fit"])} for i in entry["in_N"]]}


def _key_sections(folder: Path, spec: SweepSpec, records: Sequence[Mapping[str, Any]],
                  summary: list[str]) -> list[Section]:
    sections = []
    multi_seed = spec.seeds > 1
    for key, xs in spec.grid.items():
        if key in ("train_tasks",) or len(xs) < 2:
            continue
        lines: dict[str, list[tuple[float, float]]] = {}
        for other, group in _groups(records, [key]).items():
            pts = []
            for x in xs:
                rs = [r for r in group if _freeze(r["values"][key]) == _freeze(x)]
                if multi_seed:
                    pts.append(seed_mean([r["new"]["loss"] for r in rs]))
                else:
                    pts.append((rs[0]["new"]["loss"], rs[0]["new"]["loss_ci95"]))
            lines[_label(dict(other))] = pts
        png = _key_figure(folder / f"loss_vs_{key}.png", key, xs, lines, ylabel="query loss on new tasks",
                          title=f"New-task loss against {key}")
        ci = "over seeds" if multi_seed else "over tasks (one seed)"
        rows = [[name, format_value(x), p] for name, pts in lines.items()
                for x, p in zip(xs, pts, strict=True)]
        tables = [Table(f"New-task loss against {key} (95% CI {ci})", ["runs", key, "loss"], rows)]
        text = [f"Every run is scored on the same new tasks; the loss is the mean query loss after the inner "
                f"steps, averaged over seeds with a 95% CI {ci}."]
        if key == "algorithm":
            paired = _paired_rows(records)
            exact = bool(paired) and all(len(row) == 7 for row in paired)
            if paired:
                columns = ["runs", "seed", "first", "second", "difference"]
                if exact:
                    columns += ["exact difference", "exact, at the optima"]
                else:
                    paired = [row[:5] for row in paired]
                tables.append(Table("Paired differences between algorithms on the same episodes (loss of the "
                                    "first − loss of the second; 95% CI over tasks)", columns, paired))
                text.append("Runs that differ only in the algorithm saw the very same evaluation episodes, "
                            "so their per-task losses are compared pairwise.")
                if exact:
                    text.append("Linear models with one inner step: the exact difference is F(θ_first) − "
                                "F(θ_second) of the two trained models in closed form, and the last column "
                                "the same difference at the optima the algorithms aim for, MAML's θ* and "
                                "pretraining's θ_ERM (Collins et al. 2020): it is nonzero only when task "
                                "hardness varies and the hard tasks' optima lie apart.")
        sections.append(Section(f"Loss against {key}", text, [Figure(png, f"Query loss on new tasks against "
                                                                          f"{key}; 95% CI {ci}.")], tables))
        best = min(((name, x, p) for name, pts in lines.items() for x, p in zip(xs, pts, strict=True)
                    if p[0] == p[0]), key=lambda t: t[2][0], default=None)
        if best is not None:
            summary.append(f"lowest new-task loss over {key}: {format_value(best[1])} ({best[0]}) at "
                           f"{best[2][0]:.4g}")
    return sections


def _paired_rows(records: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    by: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        by.setdefault((_others(r, ["algorithm"]), r["seed"]), []).append(r)
    for (others, seed), group in by.items():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                la, lb = np.asarray(a["new"]["losses"]), np.asarray(b["new"]["losses"])
                ok = np.isfinite(la) & np.isfinite(lb)
                diff = paired_difference_ci(la[ok], lb[ok]) if ok.sum() >= 2 else (float("nan"), float("nan"))
                row = [_label(dict(others)), seed, a["values"]["algorithm"], b["values"]["algorithm"], diff]
                if "exact_excess" in a and "exact_excess" in b:
                    # F(θ_a) − F(θ_b) exactly; and the same difference at the optima the two algorithms aim
                    # for, MAML's θ* and pretraining's θ_ERM (F(θ_ERM) − F(θ*) is the family's advantage)
                    pair = (a["values"]["algorithm"], b["values"]["algorithm"])
                    advantage = a.get("exact_optimum_advantage", float("nan"))
                    at_optima = {("maml", "pretrain"): -advantage, ("pretrain", "maml"): advantage}
                    row += [a["exact_excess"]["mean"] - b["exact_excess"]["mean"],
                            at_optima.get(pair, float("nan"))]
                rows.append(row)
    return rows


def _runs_section(records: Sequence[Mapping[str, Any]]) -> Section:
    classify = any("accuracy" in r["new"] for r in records)
    columns = ["run", "iterations", "steps", "new-task loss", "median", "diverged"]
    columns += ["accuracy"] if classify else []
    rows = []
    for r in records:
        n = r["new"]
        row = [r["name"], r["iterations"], r["steps"], (n["loss"], n["loss_ci95"]), n["loss_median"],
               n["loss_diverged"]]
        if classify:
            row.append((n.get("accuracy", float("nan")), n.get("accuracy_ci95", float("nan"))))
        rows.append(row)
    return Section("Every run", ["The numbers of each run on the sweep's new tasks (95% CI over tasks); "
                                 "diverged counts tasks whose loss is not finite (the mean is over the "
                                 "others)."],
                   [], [Table("Runs", columns, rows)])


def write_sweep_report(folder: str | Path, spec: SweepSpec, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``index.html``, ``results.json`` and the figures of a sweep into ``folder``.

    Args:
        folder: where to write (created if needed).
        spec: the sweep (grid, seeds, evaluation protocol).
        records: one per run, as ``runner.load_results`` gives them.

    Returns:
        The path of ``index.html``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary: list[str] = []
    results: dict[str, Any] = {"sweep": spec.to_dict()}
    sections: list[Section] = []
    sections += _pool_section(folder, records, summary, results)
    sections += _key_sections(folder, spec, records, summary)
    sections.append(_runs_section(records))
    results["runs"] = [{k: ({kk: vv for kk, vv in v.items() if kk not in ("losses", "accuracies")}
                            if isinstance(v, dict) and "losses" in v else v)
                        for k, v in r.items()} for r in records]
    grid = "; ".join(f"{k} ∈ {{{', '.join(format_value(v) for v in vs)}}}" for k, vs in spec.grid.items())
    title = f"Sweep on {spec.task}: {grid}, {spec.seeds} seed{'s' if spec.seeds > 1 else ''}"
    summary.insert(0, f"{len(records)} runs, each evaluated on the same {spec.eval_tasks} new tasks "
                      f"(evaluation seed {spec.eval_seed})")
    return write_report(folder, title, summary, sections, results)
