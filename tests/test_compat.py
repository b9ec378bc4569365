"""Runs written by mamlab 0.1.0 (tests/fixtures/v0_1_0) still load, evaluate to the same numbers and resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mamlab.checkpoint import load_model
from mamlab.cli import main
from mamlab.train import load_run, train

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1_0"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixtures were made (the CLI's choice for MLP tasks)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("run, algorithm", [("maml", "maml"), ("pretrain", "pretrain"),
                                            ("fomaml-lincls", "maml")])
def test_a_0_1_0_run_evaluates_to_the_same_numbers(run: str, algorithm: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / run
    shutil.copytree(FIXTURES / run, copy)
    loaded = load_run(copy)
    assert loaded.config.algorithm == algorithm and loaded.iteration == 20
    expected = json.loads((FIXTURES / f"{run}.eval.json").read_text())
    assert main(["eval", str(copy), "--tasks", "20", "--steps", "0,1,3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got["results"]) == len(expected["results"]) == 3
    for g, e in zip(got["results"], expected["results"], strict=True):
        assert g.keys() >= e.keys()  # 0.2 adds the median's interval and the diverged count
        for k in e:
            assert g[k] == pytest.approx(e[k], rel=1e-9, abs=1e-12), (run, k)


def test_a_0_1_0_run_resumes_as_0_1_0_did(tmp_path: Path) -> None:
    copy = tmp_path / "maml"
    shutil.copytree(FIXTURES / "maml", copy)
    train(None, copy, resume=True, iterations=30, progress=False, echo=lambda s: None)
    got = load_model(copy / "model.safetensors")
    want = load_model(FIXTURES / "maml-extended-30.safetensors")
    assert got.keys() == want.keys()
    for k in want:  # the same computation: equal to float32 rounding (bitwise on the machine that made it)
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert json.loads((copy / "config.json").read_text())["format"] == 2  # rewritten in the new format
    assert load_run(copy).iteration == 30
