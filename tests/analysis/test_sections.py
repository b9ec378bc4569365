"""Sections: a task whose inner loop diverges gets medians and diverged-task counts in the summary."""

import torch
from torch import nn

from mamlab.analysis import sections as sc
from mamlab.analysis import studies as st
from mamlab.config import resolve_config
from mamlab.experiments import build_model
from mamlab.tasks.base import TaskBatch


def _linear_tasks(num_tasks: int = 10, wild: int = 3) -> TaskBatch:
    """y = a·x tasks with |x| ≈ 0.5, except task ``wild`` with |x| = 20: SGD on it blows up."""
    gen = torch.Generator().manual_seed(0)
    x = 0.5 + 0.1 * torch.rand(num_tasks, 5, 1, generator=gen)
    x[wild] = 20.0
    a = torch.linspace(-1.0, 1.0, num_tasks).view(-1, 1, 1)
    return TaskBatch(x, a * x, x.clone(), a * x)


def _learners() -> list[st.Learner]:
    cfg = resolve_config("sinusoid", None, {"inner_lr": 0.01, "inner_steps": 1})
    torch.manual_seed(0)
    out = []
    for name in ("MAML", "pretrain"):
        model = nn.Sequential(nn.Linear(1, 1, bias=False))
        with torch.no_grad():
            model[0].weight.fill_(0.3 if name == "MAML" else -0.2)
        out.append(st.Learner(name, model, cfg, "maml" if name == "MAML" else "pretrain"))
    return out


def test_one_diverging_task_is_counted_and_the_summary_uses_medians(tmp_path):
    learners, batch = _learners(), _linear_tasks()
    r = st.adaptation_curves(learners, batch, steps=5)
    entry = r["learners"]["MAML"]
    assert entry["query_loss_diverged"][0] == 0 and entry["query_loss_diverged"][5] == 1
    assert entry["query_loss"][5].mean > 1e3  # the mean is dominated by the one diverged task ...
    med = entry["query_loss_median"][5]
    assert med.median < 1.0 and med.n == 10  # ... the median is not
    summary: list[str] = []
    ctx = sc.SectionContext(tmp_path, learners, learners[0].config, batch.num_tasks, 5)
    sec = sc.adaptation_section(ctx, r, learners, summary)
    head = summary[0]
    assert "median" in head and "1 of 10 tasks diverged for MAML" in head, head
    assert f"{med.median:.3f}" in head
    assert f"{entry['query_loss'][5].mean:.3g}" not in head
    captions = " ".join(f.caption for f in sec.figures)
    assert "medians" in captions and "MAML: 1 at" in captions
    assert any("Median query loss" in t.title for t in sec.tables)


def test_without_divergence_the_summary_uses_means(tmp_path):
    learners, batch = _learners(), _linear_tasks(wild=-1)
    batch.support_x[-1] = 0.5
    batch.query_x[-1] = 0.5
    batch = TaskBatch(batch.support_x, batch.support_x * 0.3, batch.query_x, batch.query_x * 0.3)
    r = st.adaptation_curves(learners, batch, steps=5)
    assert sum(r["learners"]["MAML"]["query_loss_diverged"]) == 0
    summary: list[str] = []
    sc.adaptation_section(sc.SectionContext(tmp_path, learners, learners[0].config, 10, 5), r, learners, summary)
    q = r["learners"]["MAML"]["query_loss"][5]
    assert f"{q.mean:.3f} ± {q.ci:.3f}" in summary[0] and "median" not in summary[0]


def test_cost_and_skipped_sections():
    timings = {"adaptation": 1.5, "adaptation_with_figures": 2.25, "total": 3.75}
    sec = sc.cost_section(timings, ["adaptation"], learners=4, tasks=20)
    assert sec.title == "Cost" and sec.text == ["Wall time of each study on this machine (4 learners, 20 tasks)."]
    assert [list(r) for r in sec.tables[0].rows] == [
        ["adaptation", 1.5, 2.25], ["total (loading, episodes, all studies, figures)", 3.75, None]]
    skipped = sc.skipped_section("shift", "no distribution shift is defined for task 'linear-regression'")
    assert skipped.title == sc.TITLES["shift"] == "Distribution shift"
    assert skipped.text == ["no distribution shift is defined for task 'linear-regression'."]
    assert set(sc.TITLES) == set(st.STUDIES)


def test_paired_difference_tables_use_medians_where_tasks_diverged(tmp_path):
    """A diverged task makes the mean paired difference huge; the tables quote the paired median instead."""
    learners, full = _learners(), _linear_tasks()
    two = TaskBatch(full.support_x[:, :2], full.support_y[:, :2], full.query_x, full.query_y)
    r = st.shot_sweep(learners, {2: two, 5: full}, steps=5)
    assert r["learners"]["MAML"]["query_loss_diverged"] == [1, 1]
    assert abs(r["paired_query_loss"]["pretrain"][1].mean) > 1e3  # the mean: ruled by the diverged task
    ctx = sc.SectionContext(tmp_path, learners, learners[0].config, full.num_tasks, 5)
    sec = sc.shots_section(ctx, r, [])
    table = next(t for t in sec.tables if t.title.startswith("Paired difference"))
    cells = table.rows[0][1:]
    d = r["learners"]["pretrain"]["query_loss_diverged"]
    for k, cell in enumerate(cells):
        m = r["paired_query_loss_median"]["pretrain"][k]
        assert isinstance(cell, str) and cell.startswith("median ") and f"({d[k]} and 1 diverged)" in cell
        assert abs(m.median) < 1.0 and sc.format_value(m) in cell
    assert "median of the paired differences" in table.note
    ra = st.adaptation_curves(learners, full, steps=5)
    sec = sc.adaptation_section(ctx, ra, learners, [])
    table = next(t for t in sec.tables if t.title.startswith("Paired difference"))
    assert not isinstance(table.rows[0][1], str)  # k=0: nothing diverged yet, the mean ± CI
    assert isinstance(table.rows[0][-1], str) and "diverged)" in table.rows[0][-1]


def test_paired_difference_tables_keep_means_without_divergence(tmp_path):
    learners, batch = _learners(), _linear_tasks(wild=-1)
    batch.support_x[-1] = 0.5
    batch.query_x[-1] = 0.5
    r = st.shot_sweep(learners, {5: batch}, steps=5)
    sec = sc.shots_section(sc.SectionContext(tmp_path, learners, learners[0].config, 10, 5), r, [])
    table = next(t for t in sec.tables if t.title.startswith("Paired difference"))
    assert table.rows[0][1] == r["paired_query_loss"]["pretrain"][0]
    assert table.note == "Per-task differences on identical episodes, mean ± 95% CI."


def test_sharpness_figure_marks_two_over_alpha_and_the_protocol_names_alpha(tmp_path):
    learners = _learners()
    assert sc._two_over_alpha({"MAML": 0.01, "pretrain": 0.01, "Meta-SGD": None}, ["MAML", "pretrain"]) == {
        "2/α = 200 (α = 0.01)": 200.0}
    assert sc._two_over_alpha({"A": 0.01, "B": 0.1}, ["A", "B"]) == {
        "2/α = 200 (α = 0.01: A)": 200.0, "2/α = 20 (α = 0.1: B)": 20.0}
    assert sc._two_over_alpha({"Meta-SGD": None}, ["Meta-SGD"]) == {}
    r = st.landscape(learners, _linear_tasks(wild=-1), steps=2)
    ctx = sc.SectionContext(tmp_path, learners, learners[0].config, 10, 2)
    assert ctx.inner_lrs == {"MAML": 0.01, "pretrain": 0.01}
    sec = sc.landscape_section(ctx, r, [])
    assert "Dashed: 2/α" in sec.figures[0].caption
    protocol = {"tasks": 10, "seed": 3, "steps": 5, "fixed_steps": 2, "shots": 5, "queries": 7,
                "task": "sinusoid", "studies": ["landscape"], "reference": "MAML", "confidence": 0.95}
    runs = [{"path": "runs/m", "algorithm": "maml", "iterations": 30, "inner_lr": 0.01, "inner_steps": 1,
             "algorithm_options": {"inner_lr": 0.01, "inner_steps": 1}},
            {"path": "runs/s", "algorithm": "metasgd", "iterations": 20, "inner_lr": None, "inner_steps": 1,
             "algorithm_options": {}}]
    learned = [{"name": "MAML", "kind": "maml", "inner_lr": 0.01, "inner_params": None},
               {"name": "Meta-SGD", "kind": "metasgd", "inner_lr": None, "inner_params": ["2.weight"]}]
    sec = sc.protocol_section(protocol, runs, learned)
    settings = dict(sec.tables[0].rows)
    assert settings["support set (K)"] == "5 examples" and settings["query set"] == "7 examples"
    assert settings["evaluation seed"] == 3 and settings["held-out tasks"] == 10
    assert settings["inner step size α"] == "MAML: 0.01; Meta-SGD: learned step sizes"
    assert [list(row) for row in sec.tables[1].rows] == [
        ["runs/m", "maml", 30, "0.01", 1, "inner_lr=0.01, inner_steps=1"],
        ["runs/s", "metasgd", 20, "learned step sizes", 1, "defaults"]]
    assert sec.tables[2].rows[1][-1] == "2.weight"


def test_stability_section_reports_the_two_by_two_table_and_what_it_says(tmp_path):
    alpha = 0.05
    cfg = resolve_config("linear-regression", None, {"dim": 3, "inner_lr": alpha})
    torch.manual_seed(0)
    model = build_model(cfg).double()
    learner = st.Learner("linear", model, cfg, "maml")
    meta = resolve_config("sinusoid", None, {"hidden": [4], "iterations": 1}, algorithm="metasgd")
    metasgd = st.Learner("Meta-SGD", st.random_init_model(meta, 0).double(), meta, "metasgd")
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(-1, 1, 1)

    def tasks(k: int) -> TaskBatch:
        xs = torch.randn(5, k, 3, generator=gen, dtype=torch.float64) * scales
        xq = torch.randn(5, 6, 3, generator=gen, dtype=torch.float64) * scales
        a = torch.randn(5, 3, 1, generator=gen, dtype=torch.float64)
        return TaskBatch(xs, xs @ a, xq, xq @ a)

    r = st.stability([(learner, [(10, model), (0, model)]), (metasgd, [])], {cfg.shots: tasks(cfg.shots)},
                     {k: tasks(k) for k in (2, 5)}, (1, 10), iters=500, tol=1e-9)
    ctx = sc.SectionContext(tmp_path, [learner, metasgd], cfg, 5, 10)
    summary: list[str] = []
    sec = sc.stability_section(ctx, r, summary)
    assert sec.title == "Edge of stability"
    assert [f.path.name for f in sec.figures] == ["stability_sharpness.png", "stability_diverged.png"]
    assert all(f.path.read_bytes().startswith(b"\x89PNG") for f in sec.figures)
    assert "dashed: 2/α" in sec.figures[0].caption
    e = r["runs"]["linear"]
    cells = e["contingency"][e["shots"].index(5)][-1]
    two_by_two = next(t for t in sec.tables if t.title.startswith("linear: sharp × diverged, K = 5"))
    assert [list(row) for row in two_by_two.rows] == [
        ["λ_max > 2/α (sharp)", cells["sharp_diverged"], cells["sharp_stable"]],
        ["λ_max ≤ 2/α", cells["flat_diverged"], cells["flat_stable"]]]
    assert sum(cells.values()) == 5
    assert any(t.startswith("Skipped Meta-SGD") for t in sec.text)
    pooled_div = sum(e["contingency"][i][-1]["sharp_diverged"] + e["contingency"][i][-1]["flat_diverged"]
                     for i in range(2))
    assert pooled_div > 0 and any(f"of the {pooled_div} diverged tasks had λ_max > 2/α" in t for t in sec.text)
    counts = " / ".join(str(d) for d in e["diverged"][e["shots"].index(5)])
    final = sc._fmt(e["curve"]["sharpness"][-1], 1)
    assert summary == [f"Stability (linear, α = 0.05): final λ_max {final} against 2/α = 40; at K = 5, "
                       f"{counts} of 5 tasks diverged after 1 / 10 steps."]
    none = {"sharp_diverged": 0, "sharp_stable": 3, "flat_diverged": 0, "flat_stable": 2}
    assert sc._predicts(none).startswith("no task diverged")
    exact = {"sharp_diverged": 2, "sharp_stable": 0, "flat_diverged": 0, "flat_stable": 3}
    assert sc._predicts(exact).endswith("separates diverged from stable tasks exactly")
