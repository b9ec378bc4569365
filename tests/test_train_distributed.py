"""``mamlab train`` under torchrun: 2 processes match 1, resume, a dead rank, a meta-batch too small.

Every run here is a real ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m mamlab
train ...`` on the CPU (gloo), each subprocess with a timeout and one OpenMP thread.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from mamlab.checkpoint import list_checkpoints, load_checkpoint, load_model
from mamlab.runlog import read_metrics
from subprocesses import clean_env

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available in this PyTorch build"),
]

RUN = ["--meta-batch", "5", "--hidden", "40,40", "--seed", "7", "--no-progress"]  # 5 tasks: split 3 / 2
SHORT = ["--val-every", "100", "--checkpoint-every", "100", *RUN]
TIMEOUT = 180


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "mamlab", *args]


def _single(*args: str) -> list[str]:
    return [sys.executable, "-m", "mamlab", *args]


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (torchrun's workers), from /proc; none where /proc is absent."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and its workers (torchrun starts each worker in a session of its own)."""
    for pid in _children(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.communicate()


def _launch(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=clean_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = _launch(cmd, cwd)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            _kill(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = _run(cmd, cwd)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _flat(run_dir: Path) -> torch.Tensor:
    """Every parameter of the run's final model.safetensors, in key order, as one vector."""
    state = load_model(run_dir / "model.safetensors")
    return torch.cat([state[k].reshape(-1) for k in sorted(state)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((b - a).norm() / a.norm())


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 200-iteration sinusoid run on 2 processes."""
    root = tmp_path_factory.mktemp("dist-train")
    proc = _ok(_torchrun("train", "sinusoid", "--out", "two", "--iterations", "200", *SHORT), root)
    assert "trained 200 iterations" in proc.stdout and "on 2 processes" in proc.stdout
    assert proc.stdout.count("trained 200 iterations") == 1  # rank 0 alone speaks
    return root / "two"


def test_two_processes_match_one_and_rank_zero_alone_writes(two_process_run: Path, tmp_path: Path) -> None:
    _ok(_single("train", "sinusoid", "--out", "one", "--iterations", "200", *SHORT), tmp_path)
    one, two = _flat(tmp_path / "one"), _flat(two_process_run)
    assert one.dtype == two.dtype == torch.float32
    rel = _rel(one, two)
    assert rel <= 1e-4, rel  # the same tasks, only the summation order of the meta-gradient differs
    assert [m["iteration"] for m in read_metrics(two_process_run)] == list(range(1, 201))
    assert len((two_process_run / "metrics.jsonl").read_text().splitlines()) == 200
    assert [p.name for p in list_checkpoints(two_process_run)] == ["iter_000000", "iter_000100", "iter_000200"]
    assert (two_process_run / "config.json").is_file()
    meta = json.loads((two_process_run / "metadata.json").read_text())
    assert meta["processes"] == 2 and meta["device"] == "cpu"
    assert json.loads((tmp_path / "one" / "metadata.json").read_text())["processes"] == 1


def test_resume_under_torchrun_matches_the_uninterrupted_run(two_process_run: Path, tmp_path: Path) -> None:
    _ok(_torchrun("train", "sinusoid", "--out", "half", "--iterations", "100", *SHORT), tmp_path)
    proc = _ok(_torchrun("train", "--resume", "half", "--iterations", "200", "--no-progress"), tmp_path)
    assert proc.stdout.count("resuming half from iteration 100 of 200") == 1
    a, b = _flat(two_process_run), _flat(tmp_path / "half")
    assert _rel(a, b) <= 1e-4
    assert torch.equal(a, b)  # observed: bitwise, as for one process (same ranks, same summation order)
    assert [m["iteration"] for m in read_metrics(tmp_path / "half")] == list(range(1, 201))


def _local_rank(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"LOCAL_RANK="):
            return int(item.split(b"=", 1)[1])
    return None


def _signal_rank_1(launcher: subprocess.Popen, ready, sig: signal.Signals) -> tuple[str, str, float]:
    """Once ``ready()``, send ``sig`` to rank 1 alone; torchrun's output and seconds until it ended.

    Fails if the job ends first or nothing is ready within 120 s; never leaves a worker behind.
    """
    try:
        deadline = time.time() + 120
        while not ready():
            assert launcher.poll() is None, launcher.communicate()
            assert time.time() < deadline, "the run never got ready to be signalled"
            time.sleep(0.05)
        ranks = {_local_rank(pid): pid for pid in _children(launcher.pid)}
        assert set(ranks) >= {0, 1}, ranks
        os.kill(ranks[1], sig)
        sent = time.time()
        out, err = launcher.communicate(timeout=60)
        return out, err, time.time() - sent
    finally:
        if launcher.poll() is None:
            _kill(launcher)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_dead_rank_stops_the_job_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = _torchrun("train", "sinusoid", "--out", "run", "--iterations", "100000", "--val-every", "1000",
                    "--checkpoint-every", "20", *RUN)
    launcher = _launch(cmd, tmp_path)
    # iter_000000 and at least one checkpoint after training began; torchrun's agent tears the group down
    out, err, took = _signal_rank_1(launcher, lambda: len(list_checkpoints(run)) >= 2, signal.SIGKILL)
    assert launcher.returncode != 0
    assert took < 60
    # torchrun's summary names the failure: the rank and the signal that ended it
    assert "ChildFailedError" in err and "Root Cause" in err, err[-3000:]
    root_cause = err[err.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1\b", root_cause) and "SIGKILL" in root_cause, root_cause
    # the surviving rank either says why in one line or was stopped by torchrun first; never a traceback
    # from mamlab's code
    assert not re.search(r'File "[^"]*[/\\]src[/\\]mamlab[/\\][^"]*\.py"', err), err[-3000:]
    assert not (run / "model.safetensors").exists()
    ckpt = load_checkpoint(run)  # the latest checkpoint is whole (atomic writes by rank 0)
    assert ckpt.iteration >= 20 and ckpt.iteration % 20 == 0
    target = ckpt.iteration + 20
    proc = _ok(_single("train", "--resume", "run", "--iterations", str(target), "--no-progress"), tmp_path)
    assert f"resuming run from iteration {ckpt.iteration} of {target}" in proc.stdout
    assert [m["iteration"] for m in read_metrics(run)] == list(range(1, target + 1))
    assert (run / "model.safetensors").is_file()


def test_a_meta_batch_too_small_for_the_processes_is_a_one_line_error(tmp_path: Path) -> None:
    proc = _run(_torchrun("train", "sinusoid", "--out", "run", "--meta-batch", "1", "--iterations", "5",
                          "--no-progress"), tmp_path)
    assert proc.returncode != 0
    line = "mamlab: error: meta_batch 1 cannot be split across 2 processes; use a meta_batch of at least 2"
    assert proc.stderr.splitlines().count(line) == 1, proc.stderr[-3000:]  # said once, by rank 0
    # torchrun adds its own summary (with its own traceback); none comes from mamlab's code
    assert not re.search(r'File "[^"]*[/\\]src[/\\]mamlab[/\\][^"]*\.py"', proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_checkpointed_iteration(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = _torchrun("train", "sinusoid", "--out", "run", "--iterations", "100000", "--val-every", "1000",
                    "--checkpoint-every", "50000", *RUN)
    launcher = _launch(cmd, tmp_path)
    # rank 1 alone is told to stop, once training is under way
    out, err, _ = _signal_rank_1(launcher, lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 20,
                                 signal.SIGTERM)
    ckpt = load_checkpoint(run)
    assert ckpt.iteration > 0 and ckpt.iteration % 50000 != 0  # written because of the signal
    assert [m["iteration"] for m in read_metrics(run)] == list(range(1, ckpt.iteration + 1))
    assert f"continue with: mamlab train --resume {run.name}" in err, err[-3000:]
    assert not re.search(r'File "[^"]*[/\\]src[/\\]mamlab[/\\][^"]*\.py"', err), err[-3000:]
