"""benchmarks/speed.py's implementations compute the per-task loop's meta-gradient (float64, 1e-10).

The script times mamlab beside learn2learn, higher and TorchOpt; a speed ratio means something
only if every implementation computes the same thing. Each one's second-order meta-gradient (two
inner steps) is compared with ``loop_step``'s, the loop users write by hand, on a tiny sinusoid
MLP and a tiny Conv4 with affine BatchNorm. learn2learn is loaded from the peers folder
(``../shared/peers``, or ``$MAMLAB_PEERS``); a peer that is not there is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from benchmark_scripts import load_benchmark


def _script() -> ModuleType:
    return load_benchmark("speed")


speed = _script()
MAML_IMPLS = [name for name in speed.IMPLEMENTATIONS if name not in speed.NOT_MAML and name != "loop"]
APPLIES = {"sinusoid": lambda name: not name.startswith("mamlab:conv") and not name.endswith(":conv"),
           "conv": lambda name: name != "mamlab:batched"}


@pytest.fixture(scope="module")
def loop_grads() -> dict[str, list[torch.Tensor]]:
    return {case: speed.meta_gradient("loop", case) for case in speed.TINY_CASES}


def _available(name: str) -> None:
    if name == "learn2learn" and not (speed.default_peers() / "load_learn2learn_maml.py").is_file():
        pytest.skip(f"no learn2learn loader in {speed.default_peers()}")
    if name in ("higher", "torchopt"):
        pytest.importorskip(name)
    if name.startswith("mamlab:graph"):  # its logic is tested on the CPU in tests/core/test_graphs.py
        pytest.skip("CUDA graphs need a CUDA device (the tiny cases run on the CPU)")


@pytest.mark.parametrize("case", speed.TINY_CASES)
@pytest.mark.parametrize("name", MAML_IMPLS)
def test_meta_gradient_equals_the_loop(name: str, case: str, loop_grads: dict[str, list[torch.Tensor]]) -> None:
    if not APPLIES[case](name):
        pytest.skip(f"{name} does not run this model")
    _available(name)
    got = speed.meta_gradient(name, case, peers=speed.default_peers())
    assert all(g.dtype == torch.float64 for g in got)
    assert speed.relative_difference(got, loop_grads[case]) < 1e-10


@pytest.mark.parametrize("case", speed.TINY_CASES)
def test_the_comparison_sees_a_different_meta_gradient(case: str, loop_grads: dict[str, list[torch.Tensor]]) -> None:
    """The check can fail: ANIL (only the head adapts) and one inner step instead of two both differ."""
    assert speed.relative_difference(speed.meta_gradient("anil", case), loop_grads[case]) > 1e-4
    s = speed.make_tiny(case)
    speed.loop_step(s.model, s.batch, s.lr, s.loss_fn, steps=1)
    one_step = [p.grad for p in s.model.parameters()]
    assert speed.relative_difference(one_step, loop_grads[case]) > 1e-4


def test_check_reports_each_implementation() -> None:
    results = speed.check(["mamlab", "mamlab:batched", "anil"])
    assert set(results) == set(speed.TINY_CASES)
    assert results["sinusoid"]["mamlab"] < 1e-10 and results["sinusoid"]["mamlab:batched"] < 1e-10
    assert results["conv"]["mamlab:batched"].startswith("skipped: execution 'batched' needs")
    assert results["conv"]["anil"].startswith("skipped: ANIL")


def test_learn2learn_without_peers_is_skipped_with_a_reason(tmp_path: Path) -> None:
    results = speed.check(["learn2learn"], peers=tmp_path)
    assert results["sinusoid"]["learn2learn"] == (f"skipped: no load_learn2learn_maml.py in {tmp_path} "
                                                  "(give --peers DIR or set MAMLAB_PEERS)")


def test_measure_times_the_median_meta_iteration() -> None:
    r = speed.measure(speed.Job("sinusoid", "mamlab", tasks=3, iters=3, warmup=1, threads=1))
    assert len(r["times_s"]) == 3 and r["median_s"] == sorted(r["times_s"])[1]
    assert r["it_s"] == pytest.approx(1 / r["median_s"]) and r["tasks"] == 3 and r["steps"] == 1


def test_profile_counts_what_one_meta_iteration_runs() -> None:
    """The per-task loop runs each task's operations one by one; the batched path runs every task in one.

    Both run the same 25 sinusoid tasks, so the loop must show many times the operations, and
    profiling comes after the timing (which it leaves as measured).
    """
    rows = {impl: speed.measure(speed.Job("sinusoid", impl, iters=2, warmup=1, threads=1, profile=2))
            for impl in ("loop", "mamlab:batched")}
    loop, batched = rows["loop"]["profile"], rows["mamlab:batched"]["profile"]
    assert loop["iters"] == batched["iters"] == 2 and loop["busy_s"] is None
    assert batched["ops_per_it"] > 20 and loop["ops_per_it"] > 8 * batched["ops_per_it"]
    assert all(n >= 1 and t >= 0 for _, t, n in loop["top"]) and len(loop["top"]) == 5
    assert [t for _, t, _ in loop["top"]] == sorted((t for _, t, _ in loop["top"]), reverse=True)
    assert not any(name in speed._NO_WORK for name, _, _ in loop["top"] + batched["top"])
    assert len(rows["loop"]["times_s"]) == 2
    assert "profile" not in speed.measure(speed.Job("sinusoid", "mamlab", tasks=2, iters=1, warmup=0))


def test_the_comparison_profiles_the_named_implementations(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(speed.__file__).parent))  # each implementation runs in a spawned process
    argv = ["--case", "sinusoid", "--impls", "loop,mamlab", "--tasks", "2", "--iters", "1", "--warmup", "0",
            "--threads", "1", "--peers", str(tmp_path), "--profile", "mamlab", "--json", str(tmp_path / "r.json")]
    assert speed.main(argv) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["cases"]["sinusoid"]["results"]
    assert "profile" in rows["mamlab"] and "profile" not in rows["loop"]
    assert rows["mamlab"]["profile"]["iters"] == speed.PROFILE_ITERS
    out = capsys.readouterr().out
    assert f"profile, {speed.PROFILE_ITERS} meta-iterations under torch.profiler" in out
    assert f"mamlab             {rows['mamlab']['profile']['ops_per_it']:.0f} operations" in out


def test_each_result_is_handed_on_as_it_comes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu_check.sh cuts a step at its time limit: what was measured before must already be saved."""
    monkeypatch.syspath_prepend(str(Path(speed.__file__).parent))
    seen: list[list[str]] = []
    rows: dict[str, dict[str, object]] = {}
    base = speed.Job("", "", tasks=2, iters=1, warmup=0, threads=1, peers=str(tmp_path))
    got = speed.compare("sinusoid", ["loop", "mamlab"], base, 1, rows=rows, done=lambda: seen.append(list(rows)))
    assert got is rows and seen == [["loop"], ["loop", "mamlab"]]
    seen.clear()
    out: dict[str, dict[int, dict[str, object]]] = {}
    speed.scale([1, 2], ["mamlab"], speed.Job("", "", iters=1, warmup=0, threads=1), out,
                lambda: seen.append(list(out["mamlab"])))
    assert seen == [[1], [1, 2]] and out["mamlab"][2]["tasks"] == 2


def test_busy_time_is_the_union_of_intervals() -> None:
    assert speed._busy_us([]) == 0
    assert speed._busy_us([(5, 7), (0, 2), (1, 3), (6, 6.5)]) == 3 + 2  # [0, 3] and [5, 7]


def test_measure_reports_a_missing_peer() -> None:
    r = speed.measure(speed.Job("sinusoid", "learn2learn", tasks=2, iters=1, warmup=0, peers="/nonexistent"))
    assert r == {"skipped": "no load_learn2learn_maml.py in /nonexistent (give --peers DIR or set MAMLAB_PEERS)"}


def test_make_keeps_its_signature_for_conv_cpu() -> None:
    """benchmarks/conv_cpu.py imports ``make`` and ``loop_step``: the 4-tuple and the Conv4 case stay."""
    model, batch, lr, loss_fn = speed.make("conv4", tasks=2)
    assert batch.num_tasks == 2 and batch.query_x.shape[1:] == (75, 1, 28, 28) and lr == 0.4
    model, batch, lr, _ = speed.make("omniglot20", tasks=2)
    assert batch.support_x.shape[1] == 20 and batch.query_x.shape[1] == 20 and lr == 0.1
    assert speed.CASES["omniglot20"].steps == 5 and speed.CASES["omniglot20"].tasks == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert speed.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: CUDA is not available" in err


@pytest.mark.parametrize("argv, message", [
    (["--impls", "mamlab,nope"], "unknown implementation 'nope'"),
    (["--tasks", "0"], "--tasks must be a positive integer, got 0"),
    (["--scale", "32,x"], "--scale wants comma-separated positive integers (meta-batch sizes), got '32,x'"),
    (["--scale", "32", "--impls", "loop"], "--scale times mamlab implementations only, got 'loop'"),
    (["--profile", "mamlab,nope"], "--profile: unknown implementation 'nope'"),
    (["--impls", "mamlab", "--profile", "anil"], "--profile names 'anil', which --impls does not compare"),
    (["--check", "--profile"], "--profile goes with a comparison of implementations, not with --check or --scale"),
])
def test_bad_arguments_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert speed.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_the_prepared_gpu_call_names_implementations_that_exist() -> None:
    """``benchmarks/gpu_check.sh`` runs once on a rare GPU machine: a renamed implementation must fail here."""
    import re

    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh").read_text()
    names = set()
    for value in re.findall(r'--(?:impls|profile) "?([^"\s]+)"?', script) + re.findall(r'^\w+_(?:impls|profiled)="?([^"\n]+)"?', script,
                                                                                flags=re.M):
        names |= {n for n in value.split(",") if n and not n.startswith("$")}
    assert {"mamlab:graph", "mamlab:graph:conv", "mamlab:conv-nchw", "learn2learn"} <= names
    assert names <= set(speed.IMPLEMENTATIONS), names - set(speed.IMPLEMENTATIONS)
    outputs = set(re.findall(r'\$out/([\w.-]+)', script)) | {"device_check.json", "commands.log"}
    assert len(outputs) <= 8, outputs  # what the GPU machine brings back
