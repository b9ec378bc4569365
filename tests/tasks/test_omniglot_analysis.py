"""``analyze_runs`` end to end on a tiny Omniglot run: accuracies, rotation shift, Conv4 layer similarity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mamlab.analysis import STUDIES, analyze_runs
from mamlab.config import resolve_config
from mamlab.train import train


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_analyze_a_tiny_omniglot_run(omniglot_zips: Path, tmp_path: Path) -> None:
    config = resolve_config("omniglot", None, {
        "data": str(omniglot_zips), "split": "minimal", "ways": 3, "shots": 1, "queries": 1, "meta_batch": 2,
        "iterations": 4, "filters": 4, "validation_fraction": 0.3, "val_every": 2, "val_tasks": 2,
        "checkpoint_every": 2})
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    lines: list[str] = []
    page = analyze_runs([tmp_path / "run"], tmp_path / "report", tasks=4, steps=2, echo=lines.append)
    assert page.is_file() and "<table" in page.read_text()
    res = json.loads((page.parent / "results.json").read_text())["results"]
    studies = res["studies"]
    assert set(studies) == set(STUDIES)
    assert all(any(line.strip().startswith(s + ":") for line in lines) for s in STUDIES)
    # accuracies next to the losses
    adapt = studies["adaptation"]["learners"]["MAML"]
    assert len(adapt["query_accuracy"]) == 3 and 0.0 <= adapt["query_accuracy"][0]["mean"] <= 1.0
    assert "query_accuracy" in studies["shots"]["learners"]["MAML"]
    assert "heldout_query_accuracy" in studies["generalization"]["learners"]["MAML"]
    # the shot sweep respects the held-out pool: all_runs has 2 drawings per class
    assert studies["shots"]["shots"] == [1] and studies["shots"]["unavailable_shots"][0] == 2
    # rotation shift, with accuracies
    rot = studies["shift"]["axes"]["rotation"]
    assert rot["labels"] == ["0°", "90°", "180°", "270°"]
    assert len(rot["learners"]["MAML"]["query_accuracy"]) == 4
    # Conv4 layer similarity: four conv blocks and the head
    rep = studies["representations"]["learners"]["MAML"]
    assert len(rep["layers"]) >= 5 and len(rep["cka"]) == len(rep["layers"])
    assert any("conv" in lab.lower() or "block" in lab.lower() for lab in rep["layers"]), rep["layers"]
    sections = json.loads((page.parent / "results.json").read_text())["sections"]
    titles = [t["title"] for sec in sections for t in sec["tables"]]
    assert any("accuracy" in t.lower() for t in titles)
