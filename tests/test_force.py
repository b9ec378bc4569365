"""``--force`` replaces only what mamlab wrote: never a user's files, the current directory or a run it analyses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mamlab.cli import main

SMALL = ["--iterations", "3", "--meta-batch", "2", "--shots", "2", "--queries", "2", "--hidden", "4",
         "--no-progress", "--val-every", "3", "--checkpoint-every", "3"]


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fails(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        sys.exit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.fixture
def thesis(tmp_path: Path) -> Path:
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "chapter1.tex").write_text("precious")
    (d / "code").mkdir()
    (d / "code" / "analysis.py").write_text("print(1)")
    return d


def test_force_never_deletes_a_folder_of_other_files(thesis: Path, capsys: pytest.CaptureFixture) -> None:
    before = files(thesis)
    fails(["train", "sinusoid", "--out", str(thesis), "--force", *SMALL],
          "--force replaces only a run written by mamlab", capsys)
    fails(["train", "sinusoid", "--out", str(thesis), *SMALL], "holds files that are not a mamlab run", capsys)
    assert files(thesis) == before


def test_force_never_deletes_the_current_directory_or_its_parents(thesis: Path, capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["train", "sinusoid", "--out", str(thesis / "run"), *SMALL]) == 0
    monkeypatch.chdir(thesis / "run")  # even a real run: not the folder the user stands in
    before = files(thesis)
    fails(["train", "sinusoid", "--out", ".", "--force", *SMALL], "it is the current directory", capsys)
    fails(["train", "sinusoid", "--out", "..", "--force", *SMALL], "it is the current directory", capsys)
    assert files(thesis) == before


def test_force_replaces_a_run_but_not_one_holding_other_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["train", "sinusoid", "--out", str(run), *SMALL]) == 0
    assert main(["train", "sinusoid", "--out", str(run), "--force", *SMALL, "--seed", "1"]) == 0
    assert '"seed": 1' in (run / "config.json").read_text()
    (run / "notes.txt").write_text("mine")
    before = files(run)
    fails(["train", "sinusoid", "--out", str(run), "--force", *SMALL], "it holds 'notes.txt'", capsys)
    assert files(run) == before


def test_analyze_force_never_destroys_the_run_it_analyses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["train", "sinusoid", "--out", str(run), *SMALL]) == 0
    before = files(run)
    fails(["analyze", str(run), "--out", str(run), "--force", "--tasks", "4", "--steps", "1", "--no-progress"],
          "--force replaces only a report written by mamlab", capsys)
    assert files(run) == before
    report = tmp_path / "report"
    args = ["analyze", str(run), "--out", str(report), "--tasks", "4", "--steps", "1", "--studies", "adaptation",
            "--no-progress"]
    assert main(args) == 0
    assert main([*args, "--force"]) == 0  # a report mamlab wrote may be replaced
    (report / "mine.csv").write_text("1")
    fails([*args, "--force"], "it holds 'mine.csv'", capsys)
    assert (report / "mine.csv").read_text() == "1"


def test_no_folder_holding_the_home_directory_is_replaced(capsys: pytest.CaptureFixture) -> None:
    fails(["train", "sinusoid", "--out", os.path.expanduser("~"), "--force", *SMALL], "--force will not delete",
          capsys)
