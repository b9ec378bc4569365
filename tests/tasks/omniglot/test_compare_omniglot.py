"""benchmarks/compare_omniglot.py at a tiny size: its results.json equals evaluating each run directly."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from benchmark_scripts import load_benchmark
from mamlab.errors import MamlabError
from mamlab.evaluate import evaluate_model, evaluate_on_oneshot_runs
from mamlab.train import load_run


def _script() -> ModuleType:
    return load_benchmark("compare_omniglot")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, omniglot_helpers: SimpleNamespace) -> Path:
    """A minimal split with 200 characters (20 held out for 20-way validation), 4 drawings each."""
    root = tmp_path_factory.mktemp("omniglot_compare")
    h = omniglot_helpers
    for part, first in (("images_background_small1", 0), ("images_background_small2", 10)):
        files = {f"{part}/Alphabet{a:02d}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png":
                 h.stroke_png(10_000 * a + 100 * c + d)
                 for a in range(first, first + 10) for c in range(1, 11) for d in range(1, 5)}
        h.write_zip(root / f"{part}.zip", files)
    h.write_zip(root / "all_runs.zip", h.runs_files())
    return root


def _metrics_seconds(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["seconds"] for r in rows)


def test_results_equal_a_direct_evaluation_and_finished_runs_are_skipped(data: Path, tmp_path: Path) -> None:
    bench = _script()
    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--data", str(data), "--iterations", "2", "--algorithms", "fomaml,reptile",
            "--episodes", "6", "--jobs", "2"]
    returned = bench.main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["runs"]) == ["fomaml", "reptile"] and saved["iterations"] == 2
    torch.set_num_threads(1)
    direct_acc: dict[tuple[str, int], torch.Tensor] = {}
    for name in ("fomaml", "reptile"):
        run = load_run(out / "runs" / name)
        r = saved["runs"][name]
        assert run.config.algorithm == name and run.iteration == r["iterations"] == 2
        assert run.config.ways == 20 and run.config.queries == 3 and run.config.meta_batch == 8
        assert run.config.inner_steps == 5 and run.config.inner_lr == 0.1
        challenge = evaluate_on_oneshot_runs(run.algorithm, run.config, data / "all_runs.zip")
        assert r["challenge"]["errors"] == challenge["errors"]
        assert r["challenge"]["mean"] == pytest.approx(challenge["mean"], abs=1e-12)
        for ways in (20, 5):
            result = evaluate_model(run.algorithm, run.config.with_options(ways=ways), shots=1, queries=1,
                                    steps=(5,), num_tasks=6, seed=0)
            direct, direct_acc[name, ways] = result.summary()[0], result.accuracies[5]
            row = r["episodes"][f"{ways}-way"]["results"][0]
            assert row["steps"] == 5
            assert row["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-12)
            assert row["accuracy_ci95"] == pytest.approx(direct["accuracy_ci95"], abs=1e-12)
        assert r["train_seconds"] == pytest.approx(_metrics_seconds(out / "runs" / name), rel=1e-12)
        assert r["transductive"] == {"challenge": True, "episodes": True}
    # paired differences from the first run (no maml here), over the same episodes
    assert saved["runs"]["fomaml"]["minus_base"] == {} and saved["runs"]["reptile"]["paired_vs"] == "fomaml"
    for ways in (20, 5):
        diff = (direct_acc["reptile", ways] - direct_acc["fomaml", ways]).double()
        got = saved["runs"]["reptile"]["minus_base"][f"{ways}-way"]
        assert got["mean"] == pytest.approx(float(diff.mean()), abs=1e-12)
        half = float(diff.std() / 6 ** 0.5 * 2.570581835636314)  # t(0.975, 5 degrees of freedom)
        assert got["ci95"] == pytest.approx(half, rel=1e-9)
    reptile = load_run(out / "runs" / "reptile").config
    assert (reptile.meta_optimizer, reptile.meta_lr, reptile.lr_schedule) == ("sgd", 1.0, "linear")
    assert returned["runs"]["fomaml"]["challenge"] == saved["runs"]["fomaml"]["challenge"]
    # a second call trains nothing and evaluates nothing again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "results.json"}
    again = bench.main(argv)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["runs"] == saved["runs"]


def test_bad_options_are_one_line_errors() -> None:
    bench = _script()
    with pytest.raises(MamlabError, match="'nope' is not a run of this comparison"):
        bench.run_specs(["fomaml"], 10, overrides=["nope:inner_lr=0.1"])
    with pytest.raises(MamlabError, match="'lam' is not an option of fomaml"):
        bench.run_specs(["fomaml"], 10, overrides=["fomaml:lam=1"])
    with pytest.raises(MamlabError, match="expected NAME:KEY=VALUE"):
        bench.run_specs(["fomaml"], 10, overrides=["fomaml-inner_lr"])
    specs = {s.name: s for s in bench.run_specs(["mamlpp"], 100, ablation=True, overrides=["mamlpp-da:msl_epochs=3"])}
    assert specs["mamlpp-none"].options["lslr"] is False and specs["mamlpp-all"].options["first_order_epochs"] == 50
    assert specs["mamlpp-da"].options["msl_epochs"] == 3 and specs["mamlpp"].options["first_order_epochs"] == 0
