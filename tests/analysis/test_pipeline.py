import json
import re
from pathlib import Path

import pytest
import torch

from mamlab.algorithms import InnerLoopAlgorithm
from mamlab.analysis import pipeline
from mamlab.analysis.pipeline import STUDIES, analyze_runs
from mamlab.config import resolve_config
from mamlab.errors import MamlabError
from mamlab.train import train

FAST = {"tasks": 20, "steps": 3, "echo": lambda s: None}


def make_runs(root: Path) -> dict[str, Path]:
    """Two tiny sinusoid runs (MAML and pretrain), 30 iterations, hidden 8, checkpoints every 10."""
    runs = {}
    for method in ("maml", "pretrain"):
        cfg = resolve_config("sinusoid", None, {"method": method, "iterations": 30, "hidden": [8, 8],
                                                "checkpoint_every": 10, "val_every": 10, "val_tasks": 5})
        train(cfg, root / method, progress=False, echo=lambda s: None)
        runs[method] = root / method
    return runs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def full_report(runs, tmp_path_factory) -> Path:
    return analyze_runs([runs["maml"], runs["pretrain"]], tmp_path_factory.mktemp("rep") / "report", **FAST)


def _walk(value, path=""):
    if isinstance(value, dict):
        yield path, value
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, value


def test_end_to_end_report(full_report):
    out = full_report.parent
    assert full_report.name == "index.html" and full_report.is_file()
    data = json.loads((out / "results.json").read_text())
    res = data["results"]
    assert set(res["studies"]) == set(STUDIES)
    assert set(STUDIES) <= set(res["timings"]) and res["timings"]["total"] > 0
    names = [lr["name"] for lr in res["learners"]]
    assert names == ["MAML", "pretrain", "ANIL (MAML)", "random init"]
    # every figure referenced exists, as a PNG file and embedded in the page
    page = full_report.read_text()
    figures = [f for sec in data["sections"] for f in sec["figures"]]
    assert len(figures) >= 12
    for f in figures:
        assert (out / f["file"]).read_bytes().startswith(b"\x89PNG")
        assert f'href="{f["file"]}"' in page
    assert page.count('src="data:image/png;base64,') == len(figures)
    assert len(list(out.glob("*.png"))) == len(figures)
    # every number of every study is an estimate with its CI (ints: steps, counts, iterations)
    numbers = 0
    for path, v in _walk(res["studies"]):
        if isinstance(v, dict) and "mean" in v:
            assert set(v) == {"mean", "ci", "n", "confidence"}, path
            assert v["ci"] is not None or v["mean"] is None, path
            numbers += 1
        elif isinstance(v, dict) and "median" in v:  # a loss's median with its order-statistic interval
            assert set(v) == {"median", "low", "high", "n", "confidence"}, path
        elif isinstance(v, float):
            parent = path.rsplit(".", 1)[0]
            assert parent.endswith(("mean", "ci", "confidence")) or path.endswith(
                (".mean", ".ci", ".confidence", ".median", ".low", ".high", ".tol", ".inner_lr",
                 ".divergence_factor", ".two_over_alpha")) or re.search(
                r"\.stability\..*\.(sharpness_max|converged)\[\d+\]$", path), path  # a max, a fraction
    assert numbers > 300
    # the summary is generated from those numbers
    adapt = res["studies"]["adaptation"]
    q = adapt["learners"]["MAML"]["query_loss"][3]
    assert any(f"{q['mean']:.3f} ± {q['ci']:.3f}" in line for line in data["summary"])
    assert any("paired difference pretrain − MAML" in line for line in data["summary"])
    assert not list(out.parent.glob(".report.*"))  # no temporary folders left behind
    # the protocol comes first: episode sizes, α, steps, seed, tasks, and every run analysed
    protocol = data["sections"][0]
    assert protocol["title"] == "Protocol"
    settings = {row[0]: row[1] for row in protocol["tables"][0]["rows"]}
    assert settings["support set (K)"] == "10 examples" and settings["query set"] == "10 examples"
    assert settings["held-out tasks"] == 20 and settings["evaluation seed"] == 0
    assert settings["inner steps"] == "up to 3 (adaptation curves); 3 (the other studies)"
    assert "MAML: 0.01" in settings["inner step size α"]
    run_rows = protocol["tables"][1]["rows"]
    assert [(row[0], row[1], row[2]) for row in run_rows] == [
        (str(r["path"]), r["algorithm"], 30) for r in res["runs"]]
    assert "inner_lr=0.01" in run_rows[0][-1]
    assert page.index(">Protocol<") < page.index(">Adaptation curves<")
    sharpness = next(f for sec in data["sections"] for f in sec["figures"] if "landscape_sharpness" in f["file"])
    assert "Dashed: 2/α" in sharpness["caption"]


def test_existing_report_is_refused_then_replaced_with_force(runs, tmp_path):
    out = tmp_path / "rep"
    analyze_runs([runs["maml"]], out, studies=["adaptation"], **FAST)
    first = (out / "results.json").read_text()
    with pytest.raises(MamlabError, match="already holds a report") as e:
        analyze_runs([runs["maml"]], out, studies=["adaptation"], **FAST)
    assert "\n" not in str(e.value)
    analyze_runs([runs["maml"]], out, studies="adaptation,shots", force=True, seed=1, **FAST)
    second = json.loads((out / "results.json").read_text())
    assert (out / "results.json").read_text() != first and "shots" in second["results"]["studies"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_a_failed_analysis_keeps_the_earlier_report(runs, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    analyze_runs([runs["maml"]], out, studies=["adaptation"], **FAST)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("study failed")

    monkeypatch.setattr(pipeline.st, "shot_sweep", boom)
    with pytest.raises(RuntimeError, match="study failed"):
        analyze_runs([runs["maml"]], out, studies=["adaptation", "shots"], force=True, **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # temp folder removed


def test_the_pipeline_pairs_episodes_across_learners(runs, tmp_path, monkeypatch):
    seen = []
    adapt = InnerLoopAlgorithm.adapt

    def spy(self, support_x, support_y, *args, **kwargs):
        if kwargs.get("start") is None:
            seen.append((support_x, support_y))
        return adapt(self, support_x, support_y, *args, **kwargs)

    monkeypatch.setattr(InnerLoopAlgorithm, "adapt", spy)
    analyze_runs([runs["maml"], runs["pretrain"]], tmp_path / "rep", studies=["adaptation"], **FAST)
    assert len(seen) == 4  # MAML, pretrain, ANIL, random init
    assert all(torch.equal(sx, seen[0][0]) and torch.equal(sy, seen[0][1]) for sx, sy in seen)


def _one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_bad_inputs_are_one_line_errors(runs, tmp_path):
    with pytest.raises(MamlabError, match="does not exist") as e:
        analyze_runs([tmp_path / "missing"], tmp_path / "a", **FAST)
    assert "missing" in _one_line(e)
    (tmp_path / "notarun").mkdir()
    with pytest.raises(MamlabError, match="not a mamlab run") as e:
        analyze_runs([tmp_path / "notarun"], tmp_path / "a", **FAST)
    _one_line(e)
    cfg = resolve_config("linear-regression", None, {"iterations": 2})
    train(cfg, tmp_path / "linear", progress=False, echo=lambda s: None)
    with pytest.raises(MamlabError, match="mix task families") as e:
        analyze_runs([runs["maml"], tmp_path / "linear"], tmp_path / "a", **FAST)
    assert "linear-regression" in _one_line(e)
    with pytest.raises(MamlabError, match="unknown study 'nope'; allowed: adaptation") as e:
        analyze_runs([runs["maml"]], tmp_path / "a", studies=["nope"], **FAST)
    with pytest.raises(MamlabError, match="tasks must be"):
        analyze_runs([runs["maml"]], tmp_path / "a", tasks=1, steps=3)
    with pytest.raises(MamlabError, match="no runs"):
        analyze_runs([], tmp_path / "a", **FAST)
    assert not (tmp_path / "a").exists()


def test_analyze_runs_signature_matches_the_demo_and_cli_calls():
    import inspect

    sig = inspect.signature(analyze_runs)
    assert list(sig.parameters) == ["runs", "out", "tasks", "seed", "steps", "studies", "force", "progress",
                                    "echo", "device"]
    assert re.search(r"analyze_runs\(\[out_dir / \"maml\", out_dir / \"pretrain\"\], out_dir / \"report\", "
                     r"progress=progress,\s*echo=echo, device=device\)", (Path(pipeline.__file__).parents[1] / "demo.py").read_text())


def test_stability_section_for_two_runs_with_different_step_sizes(runs, tmp_path):
    cfg = resolve_config("sinusoid", None, {"iterations": 20, "hidden": [8, 8], "inner_lr": 0.3,
                                            "checkpoint_every": 10, "val_every": 10, "val_tasks": 5})
    train(cfg, tmp_path / "alpha0.3", progress=False, echo=lambda s: None)
    report = analyze_runs([runs["maml"], tmp_path / "alpha0.3"], tmp_path / "rep", studies="stability", **FAST)
    data = json.loads((report.parent / "results.json").read_text())
    r = data["results"]["studies"]["stability"]
    assert list(r["runs"]) == ["MAML (maml)", "MAML (alpha0.3)"] and r["skipped"] == {}
    a, b = r["runs"]["MAML (maml)"], r["runs"]["MAML (alpha0.3)"]
    assert a["two_over_alpha"] == pytest.approx(200.0) and b["two_over_alpha"] == pytest.approx(2 / 0.3)
    assert a["curve"]["iterations"] == [0, 10, 20, 30] and b["curve"]["iterations"] == [0, 10, 20]
    assert a["curve"]["tasks"] == b["curve"]["tasks"] == FAST["tasks"]  # min(tasks, LANDSCAPE_TASKS)
    # both runs start from the same seed-0 θ and are probed on the same tasks and start vectors
    assert a["curve"]["sharpness"][0] == b["curve"]["sharpness"][0]
    assert r["steps"] == [1, 3] and r["shots"] == [1, 2, 5, 10, 20]  # steps capped at --steps 3
    for e in (a, b):
        assert all(sum(c.values()) == FAST["tasks"] for per_k in e["contingency"] for c in per_k)
        assert [c[-1]["sharp_diverged"] + c[-1]["flat_diverged"] for c in e["contingency"]] == [
            d[-1] for d in e["diverged"]]
    section = next(s for s in data["sections"] if s["title"] == "Edge of stability")
    assert [f["file"] for f in section["figures"]] == ["stability_sharpness.png", "stability_diverged.png"]
    assert any("2/α = 6.667" in t for t in section["text"])
    assert sum("sharp × diverged, K = 5" in t["title"] for t in section["tables"]) == 2
    assert any(line.startswith("Stability (MAML (alpha0.3), α = 0.3)") for line in data["summary"])
