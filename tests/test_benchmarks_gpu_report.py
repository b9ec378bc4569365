"""benchmarks/gpu_report.py reads what gpu_check.sh writes and judges the issue's targets honestly.

The GPU call runs rarely; its report must read the files ``speed.py`` and ``long_inner_loops.py``
really write (so they are produced here by those scripts, on tiny CPU cases), and a target counts
as met only on a number that meets it: not measured stays "not measured".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmark_scripts import BENCHMARKS, load_benchmark

report = load_benchmark("gpu_report")
speed = load_benchmark("speed")


def _row(it_s: float, peak: float, **extra: Any) -> dict[str, Any]:
    return {"it_s": it_s, "median_s": 1 / it_s, "peak_bytes": peak, **extra}


def _case(rows: dict[str, dict[str, Any]], desc: str = "a case") -> dict[str, Any]:
    return {"desc": desc, "tasks": 32, "steps": 1, "iters": 10, "warmup": 3, "results": rows}


def _verdict(data: dict[str, Any], prefix: str) -> Any:
    data = {"speed": {}, **data}
    return next(v for v in report.verdicts(data) if v.target.startswith(prefix))


def test_the_report_reads_what_speed_py_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # speed.py runs each implementation in a spawned process
    out = tmp_path / "out"
    out.mkdir()
    assert speed.main(["--case", "sinusoid", "--impls", "loop,mamlab", "--tasks", "2", "--iters", "2", "--warmup",
                       "0", "--threads", "1", "--peers", str(tmp_path), "--profile", "mamlab",
                       "--json", str(out / "speed-sinusoid.json")]) == 0
    capsys.readouterr()
    rows = json.loads((out / "speed-sinusoid.json").read_text())["cases"]["sinusoid"]["results"]
    assert report.main([str(out), "--json", str(tmp_path / "v.json")]) == 0
    text = capsys.readouterr().out
    mamlab, loop = rows["mamlab"], rows["loop"]
    assert (f"| mamlab | {mamlab['it_s']:.2f} | {mamlab['it_s'] / loop['it_s']:.2f} | - | "
            f"{report._gb(mamlab['peak_bytes'])} |") in text
    assert f"| {mamlab['profile']['ops_per_it']:.0f} | - |" in text  # operations per iteration, no GPU busy time
    assert "| learn2learn | no load_learn2learn_maml.py in" in text
    verdicts = {v["target"].split(":")[0]: v for v in json.loads((tmp_path / "v.json").read_text())}
    assert verdicts["sinusoid"] == {"target": "sinusoid: >= 50x learn2learn", "met": None,
                                    "evidence": "learn2learn was not measured"}
    assert all(v["met"] is None for v in verdicts.values())  # nothing else was measured


def test_the_report_reads_what_long_inner_loops_prints() -> None:
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent / "src"), "OMP_NUM_THREADS": "1"}
    printed = subprocess.run([sys.executable, str(BENCHMARKS / "long_inner_loops.py"), "--repeat", "1",
                              "--steps", "1", "2"], capture_output=True, text=True, env=env, check=True).stdout
    log = f"=== long-inner-loops: python3 ...\n{printed}=== long-inner-loops: exit 0 after 3 s\n=== done\n"
    rows = report.long_inner_loops(log)
    assert [(r["case"], r["steps"], r["recompute"]) for r in rows] == [
        (c, s, r) for c in ("sinusoid", "conv4") for s in (1, 2) for r in (False, True)]
    assert all(r["saved_mib"] > 0 and r["cuda_mib"] is None for r in rows)
    one, two = (next(r for r in rows if r["case"] == "conv4" and r["steps"] == s and not r["recompute"])
                for s in (1, 2))
    assert two["saved_mib"] > one["saved_mib"]  # without recompute the graph grows with the steps
    v = _verdict({"log": log}, "long_inner_loops")  # 2 steps, not 20: not measured
    assert v.met is None and v.evidence == "no long-inner-loops table in log.txt"


def test_a_ratio_target_needs_the_ratio() -> None:
    rows = {"loop": _row(11.0, 1e7), "learn2learn": _row(10.0, 1e7), "mamlab": _row(155.0, 2e7),
            "mamlab:graph": _row(499.0, 2e7)}
    v = _verdict({"speed": {"sinusoid": _case(rows)}}, "sinusoid")
    assert v.met is False and v.evidence.startswith("mamlab:graph: 499.00 it/s = 49.9x learn2learn")
    rows["mamlab:graph"] = _row(500.0, 2e7)
    assert _verdict({"speed": {"sinusoid": _case(rows)}}, "sinusoid").met is True


def test_the_conv4_target_counts_only_runs_within_2_gb() -> None:
    rows = {"learn2learn": _row(2.65, 1e9), "mamlab": _row(60.0, 3.46e9), "mamlab:conv": _row(40.0, 1.2e9)}
    v = _verdict({"speed": {"conv4": _case(rows)}}, "conv4")
    assert v.met is False and v.evidence.startswith("mamlab:conv: 40.00 it/s = 15.1x")
    rows["mamlab:graph:conv"] = _row(53.0, 2e9)
    v = _verdict({"speed": {"conv4": _case(rows)}}, "conv4")
    assert v.met is True and v.evidence.startswith("mamlab:graph:conv: 53.00 it/s = 20.0x")
    rows = {"learn2learn": _row(2.65, 1e9), "mamlab": {"skipped": "out of memory", "oom": True}}
    assert _verdict({"speed": {"conv4": _case(rows)}}, "conv4").met is False
    rows = {"loop": _row(1.9, 1e9), "learn2learn": _row(2.65, 1e9)}  # cut short before mamlab's rows
    assert _verdict({"speed": {"conv4": _case(rows)}}, "conv4").met is None


def test_scale_tells_not_tried_from_failed() -> None:
    assert _verdict({}, "scale").met is None
    small = {"32": _row(30.0, 1e9)}
    assert _verdict({"scale": {"mamlab": small}}, "scale").evidence == "1,024 tasks were not tried"
    scale = {"mamlab": {**small, "1024": {"skipped": "out of memory", "oom": True}},
             "mamlab:conv": {**small, "1024": {"skipped": "process killed (likely out of memory), exit code -9"}}}
    v = _verdict({"scale": scale}, "scale")
    assert v.met is False and "mamlab: out of memory" in v.evidence
    scale["mamlab:conv"]["1024"] = _row(0.5, 2.2e10)
    v = _verdict({"scale": scale}, "scale")
    assert v.met is True and v.evidence.startswith("mamlab:conv: 512.0 tasks/s, peak 22.00 GB")
    assert "| 1024 | out of memory |  | 512.0 | 22.00 GB |" in report.scale_table(scale)


def test_the_omniglot_target_takes_the_fastest_second_order_run() -> None:
    omni = {"first": {"exit": 0, "median_s": 0.01}, "second": {"exit": 0, "median_s": 0.091},
            "second-conv-graph": {"exit": 0, "median_s": 0.031}, "second-graph": {"exit": 1, "median_s": 0.001}}
    v = _verdict({"device": {"omniglot_speed": omni}}, "omniglot20")
    assert v.met is False and v.evidence.startswith("mamlab train omniglot, second-conv-graph: 0.0310 s")
    omni["second-conv"] = {"exit": 0, "median_s": 0.030}
    assert _verdict({"device": {"omniglot_speed": omni}}, "omniglot20").met is True
    assert _verdict({"device": {}}, "omniglot20").met is None


def test_cuda_graphs_must_all_match() -> None:
    graphs = {"float64_max_relative": {"mlp/maml/batched": 3e-16, "conv4/maml/conv": 2e-15}, "captures": {}}
    v = _verdict({"device": {"cuda_graphs": graphs}}, "cuda_graphs")
    assert v.met is True and v.evidence == "2 cases, worst 2.0e-15"
    graphs["float64_max_relative"]["mlp/imaml"] = "MamlabError: could not capture imaml's meta-step"
    v = _verdict({"device": {"cuda_graphs": graphs}}, "cuda_graphs")
    assert v.met is False and "mlp/imaml" in v.evidence
    v = _verdict({"device": {"cuda_graphs": {"error": "RuntimeError: CUDA error", "traceback": "..."}}}, "cuda_graphs")
    assert v.met is False and v.evidence == "the step failed: RuntimeError: CUDA error"


def test_long_inner_loops_use_the_cuda_peak_when_there_is_one() -> None:
    log = ("=== long-inner-loops: python3 benchmarks/long_inner_loops.py --device cuda\n"
           "case      steps recompute    s/iter  saved MiB cuda max MiB\n"
           "sinusoid      1      True    0.0031       0.87        10.00\n"
           "sinusoid     20      True    0.0449       2.21        31.00\n"
           "=== long-inner-loops: exit 0 after 9 s\n")
    v = _verdict({"log": log}, "long_inner_loops")
    assert v.met is False and v.evidence == "sinusoid: 3.10x (torch.cuda.max_memory_allocated)"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "is not a folder; give the OUT that gpu_check.sh wrote"),
    (lambda p: p, "holds none of gpu_check.sh's files"),
])
def test_a_wrong_folder_is_one_line(make: Any, message: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
