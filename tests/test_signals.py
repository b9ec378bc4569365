"""Stop signals during training, for real: a second SIGINT/SIGTERM never corrupts a run nor prints a traceback.

Each test runs ``mamlab train`` in a subprocess that receives two real signals at a chosen moment
(sent by the process to itself from inside a patched function, so the moment is exact, or by this
test from outside, so the moment is arbitrary), then checks the one-line message, that every
checkpoint on disk is intact, and that resuming gives bitwise the model of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from mamlab.checkpoint import list_checkpoints, load_checkpoint, load_model
from mamlab.config import resolve_config
from mamlab.train import train

ARGS = ["--meta-batch", "4", "--shots", "5", "--queries", "5", "--hidden", "8,8", "--val-every", "10",
        "--val-tasks", "8", "--checkpoint-every", "10", "--no-progress"]


def _script(tmp_path: Path, body: str, iterations: int) -> subprocess.CompletedProcess:
    """Run ``mamlab train sinusoid`` into tmp_path/run after ``body`` (which patches mamlab) in one process."""
    code = textwrap.dedent(body) + textwrap.dedent(f"""
        from mamlab.cli import main
        sys.exit(main(["train", "sinusoid", "--iterations", "{iterations}", "--out", {str(tmp_path / 'run')!r},
                       *{ARGS!r}]))
    """)
    path = tmp_path / "victim.py"
    path.write_text("import os, signal, sys\n" + code)
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _reference(tmp_path: Path, iterations: int) -> dict[str, torch.Tensor]:
    config = resolve_config("sinusoid", None, {"meta_batch": 4, "shots": 5, "queries": 5, "hidden": [8, 8],
                                               "val_every": 10, "val_tasks": 8, "checkpoint_every": 10,
                                               "iterations": iterations})
    train(config, tmp_path / "reference", progress=False, echo=lambda s: None)
    return load_model(tmp_path / "reference" / "model.safetensors")


def _resume_matches_reference(tmp_path: Path, iterations: int) -> None:
    run = tmp_path / "run"
    assert not list((run / "checkpoints").glob(".tmp-*")), "a temporary checkpoint was left behind"
    for ckpt in list_checkpoints(run):
        load_checkpoint(ckpt)  # every checkpoint is intact (checksums of every file)
    train(None, run, resume=True, iterations=iterations, progress=False, echo=lambda s: None)
    got, want = load_model(run / "model.safetensors"), _reference(tmp_path, iterations)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1]


def test_a_second_signal_while_the_checkpoint_is_written_lets_the_write_finish(tmp_path: Path) -> None:
    # the first SIGINT arrives while iteration 10's checkpoint is written (the run stops after
    # iteration 11, with a checkpoint); the second while that checkpoint's weights are being written
    done = _script(tmp_path, """
        import mamlab.checkpoint as ck
        write = ck._write_fsynced
        def patched(path, data):
            write(path, data)
            if path.name == "weights.safetensors" and (".tmp-iter_000010-" in str(path)
                                                       or ".tmp-iter_000011-" in str(path)):
                os.kill(os.getpid(), signal.SIGINT)
        ck._write_fsynced = patched
    """, iterations=1000)
    assert done.returncode == 130, done.stderr
    assert "a file of the run is being written; stopping as soon as it is complete" in done.stderr
    assert _one_error_line(done.stderr) == (
        f"mamlab: SIGINT received twice: stopped at once; its newest checkpoint, iteration 11, is kept; "
        f"continue with: mamlab train --resume {tmp_path / 'run'}")
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "iter_000011"
    _resume_matches_reference(tmp_path, 20)


def test_a_second_signal_during_an_iteration_stops_at_once_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    # two SIGTERMs inside iteration 15's meta-loss: the iteration is dropped, checkpoint 10 is kept
    done = _script(tmp_path, """
        from mamlab.algorithms.base import InnerLoopAlgorithm
        meta_loss, calls = InnerLoopAlgorithm.meta_loss, []
        def patched(self, batch):
            if batch.num_tasks == 4:  # the training loop's meta-batches (the memory check uses 1 task)
                calls.append(1)
                if len(calls) == 15:
                    os.kill(os.getpid(), signal.SIGTERM)
                    os.kill(os.getpid(), signal.SIGTERM)
            return meta_loss(self, batch)
        InnerLoopAlgorithm.meta_loss = patched
    """, iterations=1000)
    assert done.returncode == 130, done.stderr
    assert "SIGTERM received: stopping after this iteration, with a checkpoint" in done.stderr
    assert _one_error_line(done.stderr) == (
        f"mamlab: SIGTERM received twice: stopped at once; its newest checkpoint, iteration 10, is kept; "
        f"continue with: mamlab train --resume {tmp_path / 'run'}")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["iter_000000", "iter_000010"]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    _resume_matches_reference(tmp_path, 20)


def test_two_sigints_from_outside_at_any_moment(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mamlab", "train", "sinusoid", "--iterations", "100000",
                             "--out", str(run), *ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while len(list_checkpoints(run)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)  # the second lands anywhere: in the iteration, the checkpoint, or the exit
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = _one_error_line(err)
    assert last.startswith("mamlab: SIGINT received") and f"mamlab train --resume {run}" in last, last
    kept = int(list_checkpoints(run)[-1].name.removeprefix("iter_"))
    assert f"iteration {kept}" in last
    _resume_matches_reference(tmp_path, kept + 5)


def _interrupt_when_working(cmd: list[str], sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run ``mamlab cmd`` and send it ``sig`` once it has worked a moment (past its imports)."""
    code = "import sys\nfrom mamlab.cli import main\nprint('ready', flush=True)\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    time.sleep(1.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_stopped_eval_or_analyze_is_one_line_and_leaves_no_output(tmp_path: Path) -> None:
    _reference(tmp_path, 10)
    run = tmp_path / "reference"
    done = _interrupt_when_working(["eval", str(run), "--tasks", "1000000", "--steps", "0,10"], signal.SIGINT)
    assert (done.returncode, done.stderr, done.stdout) == (130, "mamlab: interrupted\n", "")
    report = tmp_path / "report"  # SIGTERM is handled as Ctrl-C: the report's temporary folder goes too
    done = _interrupt_when_working(["analyze", str(run), "--out", str(report), "--tasks", "100000",
                                    "--no-progress"], signal.SIGTERM)
    assert done.returncode == 130 and _one_error_line(done.stderr) == "mamlab: interrupted", done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference"]  # no report, no temporary folder


def test_a_ctrl_c_while_pytorch_loads_is_one_line() -> None:
    # the signal arrives during `import torch`, before any of mamlab's command line exists
    code = textwrap.dedent("""
        import builtins, os, signal, sys
        real = builtins.__import__
        def patched(name, *args, **kwargs):
            if name == "torch":
                builtins.__import__ = real
                os.kill(os.getpid(), signal.SIGINT)
            return real(name, *args, **kwargs)
        builtins.__import__ = patched
        sys.argv = ["mamlab", "--version"]
        from mamlab.launch import run
        run()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 130, done.stderr
    assert done.stderr == "mamlab: interrupted\n" and done.stdout == ""
    ok = subprocess.run([sys.executable, "-m", "mamlab", "--version"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("mamlab ")
