"""The ``exact`` study end to end: tiny linear runs → ``mamlab analyze --studies exact`` → results and page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mamlab.analysis import exact
from mamlab.analysis import linear_theory as lt
from mamlab.analysis.pipeline import analyze_runs
from mamlab.checkpoint import list_checkpoints
from mamlab.config import resolve_config
from mamlab.experiments import build_family
from mamlab.train import load_run, train

FAST = {"tasks": 50, "steps": 2, "echo": lambda s: None}
HARD = {"dim": 3, "hard_fraction": 0.5, "hard_scale": 0.1, "hard_offset": 2.0, "inner_lr": 0.3}


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(root: Path, name: str, task: str, algorithm: str, **options) -> Path:
    cfg = resolve_config(task, None, {"iterations": 40, "checkpoint_every": 10, "val_every": 20, "val_tasks": 5,
                                      **options}, algorithm=algorithm)
    train(cfg, root / name, progress=False, echo=lambda s: None)
    return root / name


@pytest.fixture(scope="module")
def regression(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = {"maml": _train(root, "maml", "linear-regression", "maml", **HARD),
            "pretrain": _train(root, "pretrain", "linear-regression", "pretrain", **HARD),
            "two steps": _train(root, "two", "linear-regression", "maml", inner_steps=2, **HARD),
            "hidden": _train(root, "hidden", "linear-regression", "maml", hidden=[4], **HARD)}
    out = root / "report"
    analyze_runs(list(runs.values()), out, studies=["exact"], **FAST)
    return runs, out


def test_exact_excess_of_every_checkpoint_matches_the_public_function(regression):
    runs, out = regression
    data = json.loads((out / "results.json").read_text())["results"]["studies"]["exact"]
    assert set(data["runs"]) == {"MAML (maml)", "pretrain"} and data["exact"] is True
    for name, path in (("MAML (maml)", runs["maml"]), ("pretrain", runs["pretrain"])):
        entry = data["runs"][name]
        ckpts = [load_run(path, checkpoint=p) for p in list_checkpoints(path)]
        assert entry["iterations"] == [c.iteration for c in ckpts] == [0, 10, 20, 30, 40]
        expected = [lt.exact_excess_loss(c.model, c.config) for c in ckpts]
        assert entry["excess"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert min(entry["excess"]) >= 0 and entry["excess"][-1] < entry["excess"][0]
        fam = build_family(ckpts[0].config, "test")
        assert entry["advantage"] == pytest.approx(lt.maml_advantage(fam, 0.3, 10), rel=1e-12) and entry["advantage"] > 0
        assert entry["loss_star"] == pytest.approx(entry["final_loss"] - entry["excess"][-1], rel=1e-12)
        # the Monte-Carlo check on the held-out episodes brackets the exact loss
        h = entry["heldout_loss"]
        assert abs(h["mean"] - entry["heldout_exact"]) < 2 * h["ci"]
    erm = data["runs"]["pretrain"]["erm_excess"]
    assert len(erm) == 5 and min(erm) >= 0 and "erm_excess" not in data["runs"]["MAML (maml)"]
    assert "takes 2 inner steps" in data["not_covered"]["MAML (two)"]
    assert "hidden layers [4]" in data["not_covered"]["MAML (hidden)"]


def test_the_section_shows_the_log_log_figure_before_the_numbers(regression):
    _, out = regression
    page = json.loads((out / "results.json").read_text())
    sec = next(s for s in page["sections"] if s["title"] == "The linear model, exactly")
    assert [f["file"] for f in sec["figures"]] == ["exact_excess.png", "exact_erm_excess.png"]
    assert "log-log" in sec["figures"][0]["caption"] and "Iteration 0 is not drawn" in sec["figures"][0]["caption"]
    assert [t["title"] for t in sec["tables"]] == ["Final models against θ*", "Optima", "Runs not covered"]
    html = (out / "index.html").read_text()
    assert html.index("exact_excess.png") < html.index("Final models against")
    assert any(line.startswith("Exact (MAML (maml), α=0.3, K=10)") for line in page["summary"])


def test_runs_the_theory_does_not_cover_skip_the_study(regression, tmp_path):
    runs, _ = regression
    analyze_runs([runs["hidden"], runs["two steps"]], tmp_path / "rep", studies=["exact"], **FAST)
    page = json.loads((tmp_path / "rep" / "results.json").read_text())
    reason = page["results"]["studies"]["exact"]["skipped"]
    assert reason.startswith("no run is covered by the exact linear theory") and "hidden layers" in reason
    sec = next(s for s in page["sections"] if s["title"] == "The linear model, exactly")
    assert sec["figures"] == [] and reason in sec["text"][0]


def test_classification_uses_the_sampled_optimum_with_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(exact, "CLASSIFICATION_TASKS", 800)
    runs = [_train(tmp_path, a, "linear-classification", a, dim=3, weight_mean=1.0, inner_lr=0.5)
            for a in ("maml", "pretrain")]
    analyze_runs(runs, tmp_path / "rep", studies=["exact"], **FAST)
    data = json.loads((tmp_path / "rep" / "results.json").read_text())["results"]["studies"]["exact"]
    assert data["exact"] is False
    m = data["runs"]["MAML"]
    assert m["grad_norm"] < lt.GRAD_TOL and m["sample_tasks"] == 800
    assert all(e["n"] == 800 and e["ci"] >= 0 for e in m["excess"]) and m["excess"][-1]["mean"] < m["excess"][0]["mean"]
    assert all(0 < se < 1 for se in m["theta_star_se"])
    cfg = load_run(runs[0]).config
    obj = lt.SampledLogisticObjective(build_family(cfg, "test"), 0.5, 10, tasks=800, queries=exact.CLASSIFICATION_QUERIES,
                                      seed=exact.CLASSIFICATION_SEED)
    assert m["theta_star"] == pytest.approx(obj.optimum().theta.tolist(), abs=1e-9)
    assert "erm_excess" in data["runs"]["pretrain"]


def test_the_collins_benchmark_runs_at_a_tiny_size(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "maml_vs_pretrain_linear.py"
    spec = importlib.util.spec_from_file_location("maml_vs_pretrain_linear", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--out", str(tmp_path), "--scales", "1,0.1", "--offsets", "0,2", "--iterations", "5",
                      "--tasks", "20", "--dim", "3"])
    torch.set_num_threads(1)
    cells = {(c["hard_scale"], c["hard_offset"]): c for c in res["cells"]}
    assert [abs(cells[k]["exact_advantage"]) < 1e-12 for k in [(1.0, 0.0), (1.0, 2.0), (0.1, 0.0)]] == [True] * 3
    corner = cells[(0.1, 2.0)]
    fam = build_family(resolve_config("linear-regression", None, {"dim": 3, "weight_std": 0.5, "hard_fraction": 0.5,
                                                                  "hard_scale": 0.1, "hard_offset": 2.0}), "test")
    assert corner["exact_advantage"] == pytest.approx(lt.maml_advantage(fam, 0.3, 10), rel=1e-12)
    assert corner["exact_advantage"] > 0
    assert corner["measured"]["n"] == 20 and corner["measured"]["ci"] > 0
    assert corner["maml_excess"] >= 0 and corner["pretrain_excess"] >= 0
    assert corner["trained_exact_difference"] == pytest.approx(corner["pretrain_excess"] - corner["maml_excess"])
    assert (tmp_path / "advantage.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "results.json").read_text())["cells"][3]["hard_offset"] == 2.0
    assert (tmp_path / "runs" / "s0.1_o2" / "maml" / "config.json").is_file()
