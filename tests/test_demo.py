import json
from pathlib import Path

from mamlab.demo import fresh_directory, run_demo


def test_demo_end_to_end_never_overwrites(tmp_path: Path) -> None:
    lines: list[str] = []
    out = run_demo(tmp_path / "demo", iterations=40, echo=lines.append)
    d = out["out"]
    assert d == tmp_path / "demo"
    assert (d / "figure2.png").stat().st_size > 10_000
    summary = json.loads((d / "comparison.json").read_text())
    assert set(summary["results"]) == {"MAML", "pretrained"} and "10" in summary["paired_difference"]
    assert (d / "report" / "index.html").exists() and out["report"] == d / "report" / "index.html"
    assert any("pretrained − MAML (paired)" in line for line in lines)
    assert fresh_directory(tmp_path / "demo") == tmp_path / "demo-2"
    (tmp_path / "empty").mkdir()
    assert fresh_directory(tmp_path / "empty") == tmp_path / "empty"
