"""Omniglot through the training loop, the evaluation protocol and the one-shot challenge harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mamlab.cli import main
from mamlab.config import resolve_config
from mamlab.errors import MamlabError
from mamlab.evaluate import evaluate_model, evaluate_on_oneshot_runs
from mamlab.models import Conv4
from mamlab.train import train


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAMLAB_CACHE_DIR", str(tmp_path / "cache"))


def small(root: Path, **kw) -> dict:
    return {"data": str(root), "split": "minimal", "ways": 3, "shots": 1, "queries": 1, "meta_batch": 2,
            "iterations": 4, "val_every": 2, "val_tasks": 2, "checkpoint_every": 2, "filters": 4,
            "validation_fraction": 0.3, **kw}


def test_train_and_evaluate_omniglot(omniglot_zips: Path, tmp_path: Path) -> None:
    config = resolve_config("omniglot", None, small(omniglot_zips))
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_accuracy" in metrics[-1]
    result = evaluate_model(run.model, run.config, steps=[0, 1], num_tasks=6, seed=0)
    assert set(result.accuracies) == {0, 1}
    again = evaluate_model(run.model, run.config, steps=[0, 1], num_tasks=6, seed=0)
    assert torch.equal(result.losses[1], again.losses[1])


def test_oneshot_runs_harness_with_a_maml_model(omniglot_folders: Path) -> None:
    config = resolve_config("omniglot", None, small(omniglot_folders, ways=20))
    torch.manual_seed(0)
    result = evaluate_on_oneshot_runs(Conv4(20, hidden=4), config, omniglot_folders / "all_runs", steps=2)
    assert result["runs"] == 3 and len(result["errors"]) == 3
    assert all(0 <= e <= 100 for e in result["errors"]) and "mean" in result["table"]
    with pytest.raises(MamlabError, match="the one-shot runs are 20-way but this model has 3 outputs"):
        evaluate_on_oneshot_runs(Conv4(3, hidden=4), resolve_config("omniglot", None, small(omniglot_folders)),
                                 omniglot_folders / "all_runs")


def test_cli_omniglot_errors(omniglot_zips: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    assert main(["train", "omniglot", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err and not out.exists()
    assert main(["train", "omniglot", "--data", str(omniglot_zips), "--ways", "50", "--out", str(out),
                 "--no-progress"]) == 2
    assert "ways=50 exceeds the" in capsys.readouterr().err
    assert main(["train", "omniglot", "--data", str(omniglot_zips), "--ways", "3", "--out", str(out),
                 "--no-progress"]) == 2
    assert "Omniglot minimal split, validation characters: ways=3 exceeds the 1 classes" in \
        capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("validation_fraction = 0.4\n")
    assert main(["train", "omniglot", "--data", str(omniglot_zips), "--ways", "3", "--shots", "3",
                 "--queries", "2", "--out", str(out), "--no-progress", "--config", str(cfg)]) == 2
    assert "shots + queries = 5 exceeds the 4 drawings per class" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_eval_fewer_ways_than_the_model_has(omniglot_zips: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = resolve_config("omniglot", None, small(omniglot_zips))
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    assert main(["eval", str(tmp_path / "run"), "--ways", "2", "--tasks", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["accuracy"] >= 0
    assert main(["eval", str(tmp_path / "run"), "--ways", "4"]) == 2
    assert "--ways must be between 1 and the model's 3 outputs, got 4" in capsys.readouterr().err


@pytest.mark.parametrize("chunk,together", [(None, "1 task"), (2, "2 tasks")])
def test_the_memory_check_counts_the_tasks_the_conv_path_holds(omniglot_zips: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, chunk, together):
    """On the CPU the conv path holds one task's graph at a time (a given task_chunk: that many)."""
    import mamlab.train

    free = iter([10**15, 1])  # enough for the parameters, then nothing for the step
    monkeypatch.setattr(mamlab.train, "available_bytes", lambda device: next(free, 1))
    config = resolve_config("omniglot", None, small(omniglot_zips, meta_batch=4, task_chunk=chunk,
                                                     execution="conv", device="cpu"))
    with pytest.raises(MamlabError, match=f"for {together} at once on the conv path"):
        train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_a_conv4_graph_too_big_for_vmap_points_to_the_conv_path(omniglot_zips: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import mamlab.train

    free = iter([10**15, 1])
    monkeypatch.setattr(mamlab.train, "available_bytes", lambda device: next(free, 1))
    config = resolve_config("omniglot", None, small(omniglot_zips, execution="vmap", device="cpu"))
    with pytest.raises(MamlabError, match=r"on the vmap path.*use --execution conv \(far less memory for a "
                                          r"Conv4-like net\), --execution loop, a smaller task_chunk"):
        train(config, tmp_path / "run", progress=False, echo=lambda s: None)
