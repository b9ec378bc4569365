"""Memory: the step estimate is a lower bound of what is measured, refusals come before allocation, OOM is one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mamlab.checkpoint import list_checkpoints
from mamlab.config import resolve_config
from mamlab.core import memory
from mamlab.core.memory import available_bytes, batch_bytes, estimate_step, is_out_of_memory, peak_saved_bytes
from mamlab.experiments import build_family
from mamlab.train import TrainingOutOfMemory, build_run_algorithm, train


@pytest.mark.parametrize("options", [
    {"shots": 5, "queries": 9},
    {"shots": 7, "queries": 3, "execution": "vmap", "inner_steps": 3},
    {"shots": 4, "queries": 4, "execution": "loop", "first_order": True},
    {"shots": 6, "queries": 2, "recompute": True, "inner_steps": 4},
])
def test_the_estimate_is_the_data_exactly_and_a_lower_bound_of_the_measured_graph(options: dict) -> None:
    config = resolve_config("sinusoid", None, {"meta_batch": 6, "hidden": [16, 16], **options})
    family, algorithm = build_family(config, "train"), build_run_algorithm(config)
    gen = torch.Generator().manual_seed(0)
    path = algorithm.resolved_execution("cpu")
    together = 1 if path == "loop" else config.meta_batch
    est = estimate_step(algorithm.meta_loss, lambda s, q: family.sample(1, s, q, gen), tasks=config.meta_batch,
                        shots=config.shots, queries=config.queries, tasks_together=together, parameter_bytes=7)
    batch = family.sample(config.meta_batch, config.shots, config.queries, gen)
    measured = peak_saved_bytes(lambda: algorithm.meta_loss(batch))
    assert est.data == batch_bytes(batch)
    assert 0 < est.graph <= measured
    assert est.graph >= 0.5 * measured  # a useful bound, not a trivial one
    assert est.total == est.data + est.graph + 7


def test_available_memory_is_plausible() -> None:
    free = available_bytes("cpu")
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert free is not None and 0 < free <= total
    assert available_bytes("meta") is None


def test_out_of_memory_errors_are_recognised() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 800000000000 bytes."))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))
    assert memory.format_bytes(1536) == "1.5 KiB" and memory.format_bytes(3 * 2**40) == "3 TiB"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mamlab", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, names", [
    (["--meta-batch", "1000000000", "--shots", "100000"], ["(data: ", "for 1000000000 tasks of 100000 shots + 10 queries", "lower meta_batch, shots or queries"]),
    (["--hidden", "1000000,1000000"], ["(parameters: 1,000,004,000,001 ", "use a smaller network"]),
])
def test_a_step_too_big_for_memory_is_refused_before_anything_is_allocated(tmp_path: Path, flags: list[str],
                                                                           names: list[str]) -> None:
    start = time.perf_counter()
    done = _cli("train", "sinusoid", "--out", str(tmp_path / "run"), "--no-progress", *flags)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamlab: error: one meta-batch step needs at least ")
    assert "of memory is free on cpu" in lines[0] and all(n in lines[0] for n in names), lines[0]
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - start < 120  # nothing of that size was ever allocated


def test_a_refused_run_leaves_the_config_printable(tmp_path: Path) -> None:
    # --print-config resolves the configuration only: it never needs the memory
    done = _cli("train", "sinusoid", "--meta-batch", "1000000000", "--shots", "100000", "--print-config")
    assert done.returncode == 0 and json.loads(done.stdout)["run"]["meta_batch"] == 1000000000


def test_out_of_memory_during_training_is_one_line_and_keeps_the_checkpoints(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from mamlab.algorithms.base import InnerLoopAlgorithm

    meta_loss, calls = InnerLoopAlgorithm.meta_loss, []

    def failing(self, batch):  # the 7th training meta-batch cannot be allocated
        if batch.num_tasks == 4:
            calls.append(1)
            if len(calls) == 7:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                                   "allocate memory: you tried to allocate 123456789012 bytes.\nmore lines")
        return meta_loss(self, batch)

    monkeypatch.setattr(InnerLoopAlgorithm, "meta_loss", failing)
    config = resolve_config("sinusoid", None, {"iterations": 20, "meta_batch": 4, "hidden": [8, 8],
                                               "checkpoint_every": 5, "val_every": 5, "val_tasks": 4})
    with pytest.raises(TrainingOutOfMemory) as e:
        train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    message = str(e.value)
    assert "\n" not in message and message.startswith("out of memory during training ([enforce fail")
    assert "the checkpoint of iteration 5 is kept" in message and "--resume" in message
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["iter_000000", "iter_000005"]
    monkeypatch.setattr(InnerLoopAlgorithm, "meta_loss", meta_loss)
    train(None, tmp_path / "run", resume=True, progress=False, echo=lambda s: None)  # and it resumes
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_the_command_line_says_out_of_memory_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from mamlab import evaluate
    from mamlab.cli import main

    config = resolve_config("sinusoid", None, {"iterations": 2, "meta_batch": 2, "hidden": [4], "val_every": 2,
                                               "val_tasks": 2})
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(evaluate, "evaluate_model", no_memory)
    assert main(["eval", str(tmp_path / "run"), "--tasks", "5"]) == 1
    assert capsys.readouterr().err == ("mamlab: error: out of memory (CUDA out of memory. Tried to allocate "
                                       "20.00 GiB); use fewer --tasks\n")
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad")))
    with pytest.raises(RuntimeError, match="bad"):  # other errors are not dressed up as memory
        main(["eval", str(tmp_path / "run"), "--tasks", "5"])
