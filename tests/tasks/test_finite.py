"""Finite task pools (``train_tasks`` / ``train_examples``): what is drawn, trained on and measured."""

from __future__ import annotations

import json

import pytest
import torch

from mamlab import MamlabError
from mamlab.cli import main
from mamlab.config import resolve_config
from mamlab.evaluate import eval_generator, evaluate_model, gap_summary, pool_gap
from mamlab.experiments import build_family
from mamlab.tasks import LinearRegression, Sinusoid
from mamlab.tasks.finite import TaskPool
from mamlab.tasks.omniglot import CharacterPool, OmniglotTasks
from mamlab.train import train


def _rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.reshape(x.shape[0], -1).tolist()}


def test_a_pool_serves_only_its_own_tasks_and_examples_split_disjointly() -> None:
    family = LinearRegression(dim=3)
    pool = TaskPool(family, 5, 12, torch.Generator().manual_seed(1))
    again = TaskPool(family, 5, 12, torch.Generator().manual_seed(1))
    assert torch.equal(pool.x, again.x) and torch.equal(pool.y, again.y)  # the seed fixes the pool
    g = torch.Generator().manual_seed(2)
    index = pool.sample_indices(40, g)
    batch = pool.batch(index, 4, 6, g)
    assert set(index.tolist()) <= set(range(5)) and len(set(index.tolist())) == 5
    for t, i in enumerate(index.tolist()):
        own = _rows(torch.cat([pool.x[i, 0], pool.y[i, 0]], -1))
        s = _rows(torch.cat([batch.support_x[t], batch.support_y[t]], -1))
        q = _rows(torch.cat([batch.query_x[t], batch.query_y[t]], -1))
        assert s <= own and q <= own and not s & q and len(s) == 4 and len(q) == 6
        # the examples are the task's: y = wᵀx for the pool task's own w
        w = pool.params["weight"][i]
        torch.testing.assert_close(batch.support_x[t] @ w, batch.support_y[t, :, 0])


def test_recurring_tasks_are_the_pool_tasks_with_fresh_examples() -> None:
    family = Sinusoid()
    pool = TaskPool(family, 3, 4, torch.Generator().manual_seed(0))
    batch = pool.recurring_tasks().sample(30, 5, 5, torch.Generator().manual_seed(3))
    amp, phase = pool.params["amplitude"], pool.params["phase"]
    seen = 0
    for t in range(30):
        x, y = batch.support_x[t, :, 0], batch.support_y[t, :, 0]
        fits = [torch.allclose(a * torch.sin(x - p), y, atol=1e-5) for a, p in zip(amp, phase, strict=True)]
        assert sum(fits) == 1  # exactly one pool task explains the examples
        seen += not (_rows(batch.support_x[t]) <= _rows(pool.x.flatten(0, 1)))
    assert seen == 30  # and they are not the pool's own examples


def test_an_n_way_pool_keeps_classes_balanced_and_labels_consistent() -> None:
    images = torch.arange(8 * 6 * 2 * 2, dtype=torch.float32).view(8, 6, 2, 2)  # every image unique
    chars = CharacterPool(images, tuple(f"a/character{i:02d}" for i in range(8)), torch.zeros(8, dtype=torch.long),
                          ("a",))
    pool = TaskPool(OmniglotTasks(chars, ways=3), 4, 5, torch.Generator().manual_seed(0))
    batch = pool.sample(10, 2, 3, torch.Generator().manual_seed(1))
    assert batch.support_x.shape == (10, 6, 1, 2, 2) and batch.query_y.shape == (10, 9)
    assert batch.support_y.tolist()[0] == [0, 0, 1, 1, 2, 2]
    character = (batch.support_x.flatten(2)[..., 0] // 24).long()  # which character each image is
    q_character = (batch.query_x.flatten(2)[..., 0] // 24).long()
    for t in range(10):
        for label in range(3):  # one character per label, the same in support and query
            chars_s = set(character[t][batch.support_y[t] == label].tolist())
            chars_q = set(q_character[t][batch.query_y[t] == label].tolist())
            assert len(chars_s) == 1 and chars_s == chars_q
        assert not _rows(batch.support_x[t]) & _rows(batch.query_x[t])
    with pytest.raises(MamlabError, match="fresh examples of a pool task need a parametric"):
        pool.recurring_tasks()


def test_pool_options_are_checked_before_anything_runs() -> None:
    with pytest.raises(MamlabError, match="train_examples = 25 needs train_tasks"):
        resolve_config("sinusoid", None, {"train_examples": 25})
    with pytest.raises(MamlabError, match="train_examples = 5 is less than shots \\+ queries = 20"):
        resolve_config("sinusoid", None, {"train_tasks": 3, "train_examples": 5})
    with pytest.raises(MamlabError, match="train_tasks must be"):
        resolve_config("sinusoid", None, {"train_tasks": 0})
    config = resolve_config("sinusoid", None, {"train_tasks": 3})
    assert build_family(config, "train").examples == 20  # default: shots + queries
    assert not isinstance(build_family(config, "test"), TaskPool)


def test_meta_training_on_one_task_learns_that_task(tmp_path) -> None:
    # with a pool of a single noiseless linear task, the MAML optimum is that task's own weights
    config = resolve_config("linear-regression", None, {"dim": 2, "train_tasks": 1, "iterations": 400,
                                                        "meta_lr": 0.05, "val_every": 400, "seed": 3})
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    w = build_family(config, "train").params["weight"][0]
    (weight,) = run.algorithm.model.parameters()  # f_θ(x) = θᵀx: one weight row, no bias
    theta = weight.detach()[0]
    torch.testing.assert_close(theta, w, atol=2e-2, rtol=0)
    assert float(w.norm()) > 0.5  # far from the distribution's mean (0), so the test can fail


def test_pool_gap_scores_pool_episodes_as_a_hand_computation(tmp_path) -> None:
    config = resolve_config("linear-regression", None, {"dim": 3, "train_tasks": 4, "train_examples": 30,
                                                        "iterations": 20, "val_every": 20})
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    result = pool_gap(run.algorithm, config, num_tasks=50, steps=[0, 1], seed=7)
    assert set(result) == {"pool", "recurring", "new"}
    theta = next(run.algorithm.model.parameters()).detach()[0].double()
    batch = build_family(config, "train").sample(50, 10, 10, eval_generator(7))
    alpha, k = config.inner_lr, 10
    for t in range(50):  # one SGD step on the support MSE of a linear model, by hand
        xs, ys = batch.support_x[t].double(), batch.support_y[t, :, 0].double()
        xq, yq = batch.query_x[t].double(), batch.query_y[t, :, 0].double()
        adapted = theta - alpha * (2.0 / k) * xs.T @ (xs @ theta - ys)
        torch.testing.assert_close(result["pool"].losses[0][t], ((xq @ theta - yq) ** 2).mean(), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(result["pool"].losses[1][t], ((xq @ adapted - yq) ** 2).mean(), rtol=1e-5,
                                   atol=1e-6)
    new = evaluate_model(run.algorithm, config, steps=[0, 1], num_tasks=50, seed=7)
    torch.testing.assert_close(result["new"].losses[1], new.losses[1])
    rows = gap_summary(result)
    gap = rows[1]["gap_pool"]["loss"]
    assert gap == pytest.approx(float(new.losses[1].mean() - result["pool"].losses[1].mean()))
    with pytest.raises(MamlabError, match="no train_tasks"):
        pool_gap(run.algorithm, config.with_options(train_tasks=None, train_examples=None))


def test_eval_prints_the_gap_of_a_pool_run(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "linear-regression", "--dim", "2", "--train-tasks", "3", "--iterations", "10",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "20", "--steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "trained on a pool of 3 tasks with 20 examples each" in text and "gap: new − pool" in text
    assert main(["eval", str(out), "--tasks", "20", "--steps", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["gap"][0]) >= {"pool", "recurring", "new", "gap_pool", "gap_recurring"}


def test_analyze_checks_a_pool_run_on_its_own_pool(tmp_path) -> None:
    from mamlab.analysis import analyze_runs

    config = resolve_config("linear-regression", None, {"dim": 2, "train_tasks": 3, "iterations": 20,
                                                        "val_every": 10, "checkpoint_every": 10})
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    out = analyze_runs([tmp_path / "run"], tmp_path / "report", tasks=10, steps=2, studies="generalization",
                       echo=lambda s: None)
    page = out.read_text()
    assert "fixed pool of 3 tasks" in page and "pool query" in page and "train-distribution" not in page


def test_a_pool_too_big_for_memory_is_refused_before_it_is_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    import mamlab.tasks.finite as finite

    monkeypatch.setattr(finite, "available_bytes", lambda device="cpu": 10_000)
    # 1,000 tasks x 20 examples x (3 inputs + 1 target) float32 = 320 KB, twice while drawn
    with pytest.raises(MamlabError, match=r"^a pool of 1000 tasks with 20 examples each needs about 625 KiB "
                                          r"while it is drawn, and 9.77 KiB of memory is free; lower train_tasks"):
        TaskPool(LinearRegression(dim=3), 1000, 20, torch.Generator().manual_seed(0))
    TaskPool(LinearRegression(dim=3), 10, 20, torch.Generator().manual_seed(0))  # 6.25 KiB fits
