"""``mamlab sweep``: grid expansion, slope fits, cached evaluations, resume after a kill, refusal, 2 processes.

The runs are tiny (linear regression, dim 2, 20 iterations). Results are compared with an
independent computation: evaluating the run's model directly with ``evaluate_model``/``pool_gap``
on the same seed, ``numpy.polyfit`` and exact power laws for the slopes, and a one-process sweep
for the two-process one.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as tdist

from mamlab.analysis.linear_theory import exact_excess_loss, maml_advantage
from mamlab.cli import main
from mamlab.errors import MamlabError
from mamlab.evaluate import evaluate_model, pool_gap
from mamlab.experiments import build_family
from mamlab.stats import t_quantile
from mamlab.sweep import SweepSpec, expand, parse_grid_values, power_law_fit, run_sweep
from mamlab.sweep.runner import EVAL_FILE, evaluate_run, model_hash
from mamlab.train import load_run
from subprocesses import clean_env

TINY = {"dim": 2, "iterations": 20, "val_every": 10, "checkpoint_every": 5, "meta_batch": 4}
TINY_FLAGS = ["--dim", "2", "--iterations", "20", "--val-every", "10", "--checkpoint-every", "5",
              "--meta-batch", "4", "--no-progress"]
TIMEOUT = 240


def _spec(**kw: object) -> SweepSpec:
    base = {"task": "linear-regression", "grid": {"train_tasks": [4, 16], "shots": [2, 4]}, "fixed": dict(TINY),
            "seeds": 2, "eval_tasks": 12}
    base.update(kw)
    return SweepSpec(**base)  # type: ignore[arg-type]


def _quiet(line: str) -> None:
    return None


# ---------------------------------------------------------------------- grid
def test_grid_expands_to_every_cell_and_seed_with_checked_configs() -> None:
    runs = expand(_spec(fixed={**TINY, "seed": 3}))
    assert [r.name for r in runs] == [
        f"train_tasks={m},shots={k},seed={s}" for m in (4, 16) for k in (2, 4) for s in (3, 4)]
    assert [(r.config.train_tasks, r.config.shots, r.config.seed) for r in runs] == [
        (m, k, s) for m in (4, 16) for k in (2, 4) for s in (3, 4)]
    assert all(r.config.iterations == 20 and r.config.dim == 2 for r in runs)
    assert [r.index for r in runs] == list(range(8))


def test_grid_values_go_through_the_option_machinery() -> None:
    assert parse_grid_values("inner_lr", "0.001,0.01", "linear-regression", ["maml"]) == [0.001, 0.01]
    assert parse_grid_values("hidden", "40,40;8", "linear-regression", ["maml"]) == [[40, 40], [8]]
    assert parse_grid_values("algorithm", "maml,pretrain", "sinusoid", ["maml"]) == ["maml", "pretrain"]
    with pytest.raises(MamlabError, match="inner_lr must be a number > 0, got -1.0"):
        parse_grid_values("inner_lr", "0.1,-1", "linear-regression", ["maml"])
    with pytest.raises(MamlabError, match="unknown grid key 'bogus'"):
        parse_grid_values("bogus", "1,2", "linear-regression", ["maml"])
    with pytest.raises(MamlabError, match="unknown algorithm 'mam'"):
        parse_grid_values("algorithm", "maml,mam", "sinusoid", ["maml"])
    with pytest.raises(MamlabError, match="seed cannot be a grid key"):
        parse_grid_values("seed", "1,2", "sinusoid", ["maml"])
    # a cell whose configuration is invalid is a one-line error naming it, before anything runs
    with pytest.raises(MamlabError, match=r"sweep run train_tasks=4,shots=2: .*train_examples = 3"):
        expand(_spec(grid={"train_tasks": [4], "shots": [2]}, fixed={**TINY, "train_examples": 3}))


def test_cli_bad_grid_value_is_one_line_and_writes_nothing(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sweep", "linear-regression", "--out", str(tmp_path / "s"), "--grid", "inner_lr=0.1,x",
                 *TINY_FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "inner_lr must be a number > 0, got 'x'" in err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------- fits
def test_slope_of_an_exact_power_law_is_exact() -> None:
    m = np.array([10.0, 100.0, 1000.0, 10000.0] * 3)
    n = np.repeat([5.0, 10.0, 20.0], 4)
    y = 3.0 * m ** -0.5 * n ** -1.0
    fit = power_law_fit(y, M=m, N=n)
    assert fit.slopes["M"].value == pytest.approx(-0.5, abs=1e-12)
    assert fit.slopes["N"].value == pytest.approx(-1.0, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log(3.0), abs=1e-12)
    assert fit.slopes["M"].ci == pytest.approx(0.0, abs=1e-9) and fit.slopes["M"].contains(-0.5)


def test_slope_and_interval_match_polyfit_and_the_textbook_formula() -> None:
    rng = np.random.default_rng(0)
    m = np.repeat([10.0, 30.0, 100.0, 300.0, 1000.0], 3)
    y = 2.0 * m ** -0.7 * np.exp(rng.normal(0, 0.2, m.size))
    y[4] = -0.01  # a gap <= 0: left out and counted
    fit = power_law_fit(y, M=m)
    keep = y > 0
    lx, ly = np.log(m[keep]), np.log(y[keep])
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    se = math.sqrt(resid @ resid / (keep.sum() - 2) / ((lx - lx.mean()) ** 2).sum())
    assert fit.slopes["M"].value == pytest.approx(slope, rel=1e-10)
    assert fit.intercept == pytest.approx(intercept, rel=1e-10)
    assert fit.slopes["M"].ci == pytest.approx(t_quantile(0.975, keep.sum() - 2) * se, rel=1e-10)
    assert fit.excluded == 1 and fit.n == 14 and fit.dof == 12


def test_fit_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(MamlabError, match="needs at least 2 points with y > 0, got 1"):
        power_law_fit([1.0, -1.0, 0.0], M=[1.0, 2.0, 3.0])
    with pytest.raises(MamlabError, match="takes one value"):
        power_law_fit([1.0, 2.0], M=[5.0, 5.0])
    with pytest.raises(MamlabError, match="must be finite and > 0"):
        power_law_fit([1.0, 2.0], M=[0.0, 5.0])


# ---------------------------------------------------------------------- a sweep in this process
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "s"
    run_sweep(_spec(), out, echo=_quiet)
    return out


def test_results_match_evaluating_each_run_directly(finished: Path) -> None:
    results = json.loads((finished / "results.json").read_text())["results"]
    spec = _spec()
    assert len(results["runs"]) == 8
    for record in results["runs"]:
        run = load_run(finished / "runs" / record["name"])
        assert record["iterations"] == 20 and record["values"] == {"train_tasks": run.config.train_tasks,
                                                                   "shots": run.config.shots}
        steps = run.algorithm.inner_steps
        direct = evaluate_model(run.algorithm, run.config, steps=[steps], num_tasks=spec.eval_tasks,
                                seed=spec.eval_seed)
        gap = pool_gap(run.algorithm, run.config, num_tasks=spec.eval_tasks, steps=[steps], seed=spec.eval_seed)
        assert record["new"]["loss"] == pytest.approx(float(direct.losses[steps].mean()), rel=1e-12)
        assert record["pool"]["loss"] == pytest.approx(float(gap["pool"].losses[steps].mean()), rel=1e-12)
        assert record["recurring"]["loss"] == pytest.approx(float(gap["recurring"].losses[steps].mean()),
                                                            rel=1e-12)
        expected = float(direct.losses[steps].mean() - gap["pool"].losses[steps].mean())
        assert record["gap"]["mean"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        # a linear model with one inner step: its exact excess meta-test loss is reported too
        assert record["exact_excess"]["mean"] == pytest.approx(exact_excess_loss(run.algorithm.model, run.config),
                                                               rel=1e-12)
        assert record["exact_excess"]["mean"] > 0
    page = (finished / "index.html").read_text()
    assert "exact_excess_vs_M.png" in page and "exact F(θ) − F(θ*)" in page
    assert "gap_vs_M.png" in page and "Chen et al. 2020" in page and "Fallah et al. 2021" in page
    assert page.index("<img") < page.index("Fit in M at")  # the figure comes before the numbers


def test_the_cache_is_reused_and_a_retrained_model_invalidates_it(finished: Path, tmp_path: Path) -> None:
    spec = _spec()
    run_dir = finished / "runs" / "train_tasks=4,shots=2,seed=0"
    cached = json.loads((run_dir / EVAL_FILE).read_text())
    assert cached["model_sha256"] == model_hash(run_dir)
    # a tampered result no longer matches its hash: evaluated again, the true number comes back
    tampered = json.loads((run_dir / EVAL_FILE).read_text())
    tampered["result"]["new"]["loss"] = 123.0
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(run_dir, copy)
    (copy / EVAL_FILE).write_text(json.dumps(tampered))
    assert evaluate_run(copy, spec)["new"]["loss"] == pytest.approx(cached["result"]["new"]["loss"])
    # another model in the folder (a retrained run): the cache says another hash, so it is not used
    other = finished / "runs" / "train_tasks=16,shots=4,seed=1"
    shutil.copy(other / "model.safetensors", copy / "model.safetensors")
    shutil.copy(run_dir / EVAL_FILE, copy / EVAL_FILE)
    fresh = evaluate_run(copy, spec)
    direct = load_run(copy)
    steps = direct.algorithm.inner_steps
    loss = evaluate_model(direct.algorithm, direct.config, steps=[steps], num_tasks=12, seed=0).losses[steps]
    assert fresh["new"]["loss"] == pytest.approx(float(loss.mean()), rel=1e-12)
    assert fresh["new"]["loss"] != pytest.approx(cached["result"]["new"]["loss"])
    assert json.loads((copy / EVAL_FILE).read_text())["model_sha256"] == model_hash(copy)


def test_a_changed_grid_is_refused_and_says_what_differs(finished: Path) -> None:
    with pytest.raises(MamlabError, match=r"grid shots: \[2, 4\] in sweep.json, \[2, 8\] now"):
        run_sweep(_spec(grid={"train_tasks": [4, 16], "shots": [2, 8]}), finished, echo=_quiet)
    with pytest.raises(MamlabError, match="option iterations: 20 in sweep.json, 30 now"):
        run_sweep(_spec(fixed={**TINY, "iterations": 30}), finished, echo=_quiet)


def test_grid_over_algorithms_gives_a_paired_table(tmp_path: Path) -> None:
    hard = {"hard_fraction": 0.5, "hard_scale": 0.3, "hard_offset": 2.0, "inner_lr": 0.3}  # MAML's optimum wins
    spec = SweepSpec("linear-regression", {"algorithm": ["maml", "pretrain"]}, {**TINY, **hard}, seeds=1,
                     eval_tasks=12)
    run_sweep(spec, tmp_path / "a", echo=_quiet)
    payload = json.loads((tmp_path / "a" / "results.json").read_text())
    tables = [t for s in payload["sections"] for t in s["tables"] if t["title"].startswith("Paired")]
    assert len(tables) == 1 and len(tables[0]["rows"]) == 1
    runs = {r["values"]["algorithm"]: r for r in payload["results"]["runs"]}
    a, b = (load_run(tmp_path / "a" / "runs" / runs[k]["name"]) for k in ("maml", "pretrain"))
    la = evaluate_model(a.algorithm, a.config, steps=[1], num_tasks=12, seed=0).losses[1]
    lb = evaluate_model(b.algorithm, b.config, steps=[1], num_tasks=12, seed=0).losses[1]
    assert tables[0]["rows"][0][4]["mean"] == pytest.approx(float((la - lb).mean()), rel=1e-9)
    # linear models with one step: the exact difference of the trained models and of the optima
    exact = exact_excess_loss(a.algorithm.model, a.config) - exact_excess_loss(b.algorithm.model, b.config)
    assert tables[0]["columns"][5:] == ["exact difference", "exact, at the optima"]
    assert tables[0]["rows"][0][5] == pytest.approx(exact, rel=1e-9)
    family = build_family(a.config, "test")
    advantage = maml_advantage(family, a.config.inner_lr, a.config.shots)
    assert advantage > 0.01 and tables[0]["rows"][0][6] == pytest.approx(-advantage)


# ---------------------------------------------------------------------- subprocesses


SWEEP_ARGS = ["sweep", "linear-regression", "--train-tasks", "4,16", "--shots", "2,4", "--seeds", "2",
              "--eval-tasks", "12", *TINY_FLAGS]


def _numbers(out: Path) -> list[tuple[str, float, float]]:
    runs = json.loads((out / "results.json").read_text())["results"]["runs"]
    return [(r["name"], r["new"]["loss"], r["pool"]["loss"]) for r in runs]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_sweep_picks_up_where_it_stopped(tmp_path: Path, finished: Path, sig: signal.Signals) -> None:
    out = tmp_path / "s"
    slow = [a if a != "20" else "400" for a in SWEEP_ARGS]  # long enough to be killed mid-way
    slow[slow.index("--checkpoint-every") + 1] = "50"
    proc = subprocess.Popen([sys.executable, "-m", "mamlab", *slow, "--out", str(out)], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:  # wait until one run has finished and a later one has a checkpoint past iteration 0
        while time.monotonic() < deadline:
            done = list(out.glob("runs/*/model.safetensors"))
            partial = [p for p in out.glob("runs/*/checkpoints/iter_*") if not p.name.endswith("000000")]
            if done and any(p.parent.parent.name not in {d.parent.name for d in done} for p in partial):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "continue the sweep with: mamlab sweep --resume" in err
    finished_before = {p.parent.name for p in out.glob("runs/*/model.safetensors")}
    assert 0 < len(finished_before) < 8 and not (out / "results.json").exists()
    stamps = {n: (out / "runs" / n / "model.safetensors").stat().st_mtime_ns for n in finished_before}
    resumed = subprocess.run([sys.executable, "-m", "mamlab", "sweep", "--resume", str(out), "--no-progress"],
                             env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("already trained") == len(finished_before)
    assert "resumed and trained" in resumed.stdout
    assert {n: (out / "runs" / n / "model.safetensors").stat().st_mtime_ns for n in finished_before} == stamps
    # the result equals an uninterrupted sweep's: resume is exact on the CPU
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "mamlab", *slow, "--out", str(straight)], env=clean_env(), check=True,
                   capture_output=True, timeout=TIMEOUT)
    assert _numbers(out) == _numbers(straight)


@pytest.mark.distributed
@pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(), reason="no gloo backend")
def test_two_processes_give_the_numbers_of_one(tmp_path: Path, finished: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mamlab",
           *SWEEP_ARGS, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[rank 0]") == 4 and proc.stdout.count("[rank 1]") == 4
    assert proc.stdout.count("report:") == 1
    two, one = _numbers(tmp_path / "two"), _numbers(finished)
    assert [r[0] for r in two] == [r[0] for r in one]
    assert np.allclose([r[1:] for r in two], [r[1:] for r in one], rtol=1e-6, atol=0)
