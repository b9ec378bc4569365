"""mamlab.runtime: device resolution, precision scopes, the task split, and a real 2-process all-reduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from mamlab import MamlabError
from mamlab.runtime import DEVICES_HELP, PRECISIONS, Distributed, precision_context, resolve_device
from subprocesses import clean_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "maml_allreduce.py"

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


# ------------------------------------------------------------------ devices
def test_resolve_device_auto_and_cpu():
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device(None) == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_resolve_device_cuda_absent_is_one_line_error(spec):
    with pytest.raises(MamlabError) as info:
        resolve_device(spec)
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(spec) in msg and "no CUDA device" in msg and "allowed: auto, cpu" in msg


@pytest.mark.parametrize("spec", ["gpu", "", "cuda:x", "tpu:0"])
def test_resolve_device_unknown_names_allowed_values(spec):
    with pytest.raises(MamlabError) as info:
        resolve_device(spec)
    msg = str(info.value)
    assert "\n" not in msg and repr(spec) in msg and DEVICES_HELP in msg


# ------------------------------------------------------------------ precision
def test_precision_bf16_autocasts_inside_only():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with precision_context("bf16", torch.device("cpu")):
        inside = layer(x)
    outside = layer(x)
    assert inside.dtype == torch.bfloat16 and outside.dtype == torch.float32
    inside.float().sum().backward()
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("initial", [False, True])
def test_precision_tf32_and_fp32_set_and_restore_flags(initial):
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        matmul.allow_tf32 = initial
        cudnn.allow_tf32 = initial
        saved = (matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision())
        with precision_context("tf32", torch.device("cpu")):
            assert matmul.allow_tf32 and cudnn.allow_tf32
        assert (matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision()) == saved
        with precision_context("fp32", torch.device("cpu")):
            assert not matmul.allow_tf32 and not cudnn.allow_tf32
        assert (matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision()) == saved
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before[0], before[1]
        torch.set_float32_matmul_precision(before[2])


def test_precision_unknown_name():
    assert PRECISIONS == ("fp32", "tf32", "bf16")
    with pytest.raises(MamlabError, match=r"unknown precision 'fp16'; allowed: fp32, tf32, bf16"):
        precision_context("fp16", torch.device("cpu"))


# ------------------------------------------------------------------ task split
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_task_share_partitions_the_batch(world):
    for num_tasks in range(1, 10):
        ranks = [Distributed(rank=r, world_size=world) for r in range(world)]
        if num_tasks < world:
            for d in ranks:
                with pytest.raises(MamlabError) as info:
                    d.task_share(num_tasks)
                assert str(info.value) == (f"meta_batch {num_tasks} cannot be split across {world} processes; "
                                           f"use a meta_batch of at least {world}")
            continue
        shares = [d.task_share(num_tasks) for d in ranks]
        assert shares[0].start == 0 and shares[-1].stop == num_tasks
        assert all(a.stop == b.start for a, b in zip(shares[:-1], shares[1:], strict=True))  # contiguous, in rank order
        covered = [i for s in shares for i in range(num_tasks)[s]]
        assert covered == list(range(num_tasks))
        sizes = [s.stop - s.start for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert sum(d.weight(num_tasks) for d in ranks) == pytest.approx(1.0, abs=1e-15)


def test_direct_construction_describes_a_rank_without_a_group():
    d = Distributed(rank=1, world_size=3)
    assert (d.rank, d.world_size, d.local_rank, d.device) == (1, 3, 1, torch.device("cpu"))
    assert not d.is_main and not d.enabled
    assert d.broadcast_object("x") == "x"
    with pytest.raises(MamlabError, match="needs a process group"):
        d.all_reduce_gradients([], 0.5)
    with pytest.raises(MamlabError, match="rank 3 is out of range for world_size 3"):
        Distributed(rank=3, world_size=3)
    with pytest.raises(MamlabError, match="world_size"):
        Distributed(rank=0, world_size=0)


def test_single_process_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with Distributed.from_env(torch.device("cpu")) as d:
        assert (d.rank, d.world_size, d.is_main, d.enabled) == (0, 1, True, False)
        a = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        b = torch.nn.Parameter(torch.ones(3))
        a.grad = torch.full((2,), 2.0, dtype=torch.float64)
        assert d.all_reduce_gradients([a, b], d.weight(4), [1.5, 2.0]) == [1.5, 2.0]
        assert a.grad.tolist() == [2.0, 2.0] and a.grad.dtype == torch.float64
        assert b.grad is not None and b.grad.tolist() == [0.0, 0.0, 0.0]
        d.barrier()
        assert d.broadcast_object({"k": 1}) == {"k": 1}
    assert not tdist.is_available() or not tdist.is_initialized()


def test_from_env_bad_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MamlabError, match="WORLD_SIZE='two'"):
        Distributed.from_env(torch.device("cpu"))


# ------------------------------------------------------------------ two real processes
@pytest.fixture(scope="module")
def two_process_findings(tmp_path_factory):
    if not tdist.is_available() or not tdist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this PyTorch build")
    out = tmp_path_factory.mktemp("dist") / "findings.json"
    env = clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_two_process_meta_gradient_equals_one_process(two_process_findings):
    r0, r1 = two_process_findings
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["enabled"] and r1["enabled"]
    assert (r0["share"], r1["share"]) == ([0, 3], [3, 5])  # uneven split: 3 tasks and 2
    assert (r0["weight"], r1["weight"]) == (0.6, 0.4)
    for r in (r0, r1):
        assert r["max_rel_diff"] <= 1e-12, r
        assert r["identical_to_rank0"]
        assert r["orphan_grad"] == [0.4, 0.4, 0.4]  # rank 0 had no .grad, rank 1 ones × 0.4


@pytest.mark.distributed
def test_two_process_extras_are_summed(two_process_findings):
    r0, r1 = two_process_findings
    for r in (r0, r1):
        mean_loss, ranks, halves = r["extras"]
        assert mean_loss == pytest.approx(r["full_loss"], rel=1e-12)  # Σ w_r · loss_r = the full meta-loss
        assert ranks == 3.0 and halves == 1.0
        assert r["broadcast"] == {"from": 0}


@pytest.mark.distributed
def test_two_process_batch_too_small_errors_cleanly(two_process_findings):
    for r in two_process_findings:
        assert r["small_error"] == ("meta_batch 1 cannot be split across 2 processes; "
                                    "use a meta_batch of at least 2")
