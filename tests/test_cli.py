"""The command line: train/eval/demo end to end, and bad input that changes nothing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mamlab.cli import main

SMALL = ["--iterations", "20", "--meta-batch", "4", "--shots", "5", "--queries", "5", "--hidden", "8",
         "--val-every", "10", "--val-tasks", "4", "--checkpoint-every", "10", "--no-progress"]


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "sinusoid", "--out", str(d), *SMALL]) == 0
    return d


def test_eval_json_is_reproducible_and_paired(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(run_dir), "--shots", "5", "--steps", "0,1,5", "--tasks", "50", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert [r["steps"] for r in first["results"]] == [0, 1, 5]
    assert all(r["loss_ci95"] > 0 for r in first["results"])
    assert main(["eval", str(run_dir), "--shots", "5", "--steps", "0,1,5", "--tasks", "50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert main(["eval", str(run_dir), "--tasks", "30"]) == 0
    table = capsys.readouterr().out
    assert "held-out tasks" in table and "±" in table


def test_print_config_and_toml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('inner_lr = 0.02\nmeta_batch = 7\nhidden = [20, 20]\n')
    assert main(["train", "sinusoid", "--config", str(cfg), "--meta-batch", "9", "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["algorithm_options"]["inner_lr"] == 0.02 and resolved["run"]["meta_batch"] == 9
    assert resolved["task_options"]["hidden"] == [20, 20]
    assert resolved["run"]["iterations"] == 70000  # the paper's default
    assert main(["train", "omniglot", "--data", "x", "--ways", "20", "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["algorithm_options"]["inner_steps"], resolved["algorithm_options"]["inner_lr"],
            resolved["run"]["meta_batch"]) == (5, 0.1, 16)
    # only what applies: no sinusoid keys for omniglot, no first_order for the pretrain baseline
    assert "amplitude" not in resolved["task_options"] and "ways" in resolved["task_options"]
    assert main(["train", "sinusoid", "--algorithm", "pretrain", "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["algorithm"] == "pretrain" and set(resolved["algorithm_options"]) == {"inner_lr", "inner_steps"}


def test_baseline_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pre"
    assert main(["train", "sinusoid", "--baseline", "pretrain", "--out", str(out), *SMALL]) == 0
    assert json.loads((out / "config.json").read_text())["algorithm"] == "pretrain"
    assert main(["eval", str(out), "--tasks", "20", "--json"]) == 0


BAD = [
    (["train", "sinusoid", "--inner-lr", "-0.1"], "inner_lr must be a number > 0, got -0.1"),
    (["train", "sinusoid", "--inner-lr", "0"], "inner_lr must be a number > 0, got 0"),
    (["train", "sinusoid", "--meta-lr", "0"], "meta_lr must be a number > 0, got 0"),
    (["train", "sinusoid", "--shots", "0"], "shots must be an integer > 0, got 0"),
    (["train", "sinusoid", "--queries", "-3"], "queries must be an integer > 0, got -3"),
    (["train", "sinusoid", "--iterations", "0"], "iterations must be an integer > 0, got 0"),
    (["train", "sinusoid", "--inner-steps", "0"], "inner_steps must be an integer > 0, got 0"),
    (["train", "sinusoid", "--meta-batch", "0"], "meta_batch must be an integer > 0, got 0"),
    (["train", "cosine"], "unknown task family 'cosine'; allowed: sinusoid, linear-regression"),
    (["train", "sinusoid", "--execution", "gpu"], "unknown execution 'gpu'; allowed: auto, batched"),
    (["train", "sinusoid", "--lr-schedule", "step"], "unknown lr_schedule 'step'; allowed: constant, cosine"),
    (["train", "sinusoid", "--seed", "-1"], "seed must be an integer >= 0, got -1"),
    (["train", "sinusoid", "--amplitude", "5,1"], "amplitude must be two finite numbers LOW,HIGH with LOW <= HIGH"),
    (["train", "sinusoid", "--amplitude", "1"], "amplitude must be two finite numbers LOW,HIGH with LOW <= HIGH, got [1.0]"),
    (["train", "sinusoid", "--hidden", "4,a"], "hidden must be a list of integers (each > 0), got '4,a'"),
    (["train", "sinusoid", "--iterations", "ten"], "iterations must be an integer > 0, got 'ten'"),
    (["train", "omniglot", "--data", "x", "--amplitude", "1,2"],
     "option 'amplitude' applies to task sinusoid, not to task 'omniglot' with algorithm 'maml'"),
    (["train", "sinusoid", "--ways", "5"], "option 'ways' applies to task omniglot, not to task 'sinusoid'"),
    (["train", "sinusoid", "--algorithm", "pretrain", "--first-order"],
     "option 'first_order' applies to algorithm maml and algorithm anil"),  # ... and any algorithm registered later
    (["train", "sinusoid", "--algorithm", "reptyle"], "unknown algorithm 'reptyle'; allowed: maml, fomaml, anil"),
    (["train", "sinusoid", "--preset", "nope"], "unknown preset 'nope'; allowed: omniglot-minimal-20way, sinusoid-finn2017"),
    (["train", "sinusoid", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["train", "sinusoid", "--device", "cuda:7", "--out", "{tmp}/o"], "device 'cuda:7' is not available here"),
    (["train", "sinusoid", "--precision", "fp16"], "unknown precision 'fp16'; allowed: fp32, tf32, bf16"),
    (["train", "sinusoid", "--config", "{tmp}/string.toml"], "first_order must be true or false, got 'no'"),
    (["train", "--resume", "{run}", "--inner-lr", "0.5"], "--inner-lr cannot be given with --resume"),
    (["train", "--resume", "{run}", "--iterations", "1"], "the run has already trained 20 iterations; --iterations must be at least that, got 1"),
    (["eval", "{run}", "--device", "cuda:7"], "device 'cuda:7' is not available here"),
    (["train", "sinusoid"], "train needs --out DIR"),
    (["train"], "train needs a TASK"),
    (["train", "omniglot", "--out", "{tmp}/o"], "omniglot needs --data PATH"),
    (["train", "sinusoid", "--out", "{run}"], "already holds a run; use --resume to continue it"),
    (["train", "--resume", "{tmp}/nothing"], "cannot resume: '{tmp}/nothing' holds no run"),
    (["train", "sinusoid", "--config", "{tmp}/missing.toml"], "config file '{tmp}/missing.toml' does not exist"),
    (["train", "sinusoid", "--config", "{tmp}/bad.toml"], "is not valid TOML"),
    (["train", "sinusoid", "--config", "{tmp}/unknown.toml"], "unknown.toml: unknown option 'inner_rate'"),
    (["eval", "{tmp}/nothing"], "run directory '{tmp}/nothing' does not exist"),
    (["eval", "{tmp}"], "is not a mamlab run: config.json is missing"),
    (["eval", "{run}", "--steps", "1,x"], "steps must be comma-separated integers >= 0, got '1,x'"),
    (["eval", "{run}", "--shots", "0"], "shots must be an integer > 0, got 0"),
    (["eval", "{run}", "--tasks", "0"], "tasks must be an integer > 0, got 0"),
    (["eval", "{run}", "--lr", "-1"], "lr must be a number > 0, got -1"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_one_line_error_nothing_changed(argv: list[str], message: str, run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.toml").write_text("inner_lr = = 3\n")
    (tmp_path / "unknown.toml").write_text("inner_rate = 3\n")
    (tmp_path / "string.toml").write_text('first_order = "no"\n')
    fill = {"tmp": str(tmp_path), "run": str(run_dir)}
    argv = [a.format(**fill) for a in argv]
    message = message.format(**fill)
    before_run, before_tmp = snapshot(run_dir), snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(run_dir) == before_run and snapshot(tmp_path) == before_tmp


def test_real_process_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mamlab", "train", "sinusoid", "--inner-lr", "-1",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mamlab: error: inner_lr must be a number > 0, got -1.0"
    assert not (tmp_path / "x").exists()


def test_more_bad_input_python_api_and_files(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             omniglot_unsafe_zip: Path) -> None:
    import torch
    import torch.nn.functional as F

    from mamlab import MAML, MamlabError, TaskBatch
    from mamlab.models import MLP
    from mamlab.tasks.omniglot import safe_extract

    before = snapshot(run_dir)
    x32, x64 = torch.zeros(2, 3, 1), torch.zeros(2, 3, 1, dtype=torch.float64)
    cases = [
        (lambda: MAML(MLP(1, 1), F.mse_loss, 0.1).meta_loss(TaskBatch(x64, x64, x64, x64)),
         "support_x has dtype float64 but the model's parameters are float32"),
        (lambda: MAML(MLP(1, 1), F.mse_loss, 0.1).adapt(x32, torch.zeros(2, 4, 1)),
         "support_x (2, 3, 1) and support_y (2, 4, 1) must share"),
        (lambda: TaskBatch(x32, x32, torch.zeros(2, 3, 2), x32), "example shape"),
        (lambda: safe_extract(omniglot_unsafe_zip, tmp_path / "extract"), "../evil.png"),
    ]
    for call, message in cases:
        with pytest.raises(MamlabError, match=None) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "extract" / "evil.png").exists() and not (tmp_path / "evil.png").exists()

    # a file where the output's parent should be
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "sinusoid", "--out", str(blocker / "run"), *SMALL]) == 2
    assert "is not writable" in capsys.readouterr().err
    # a corrupted checkpoint: resume refuses with one line naming the file, nothing changes
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    for p in broken.glob("checkpoints/iter_*/weights.safetensors"):
        p.write_bytes(p.read_bytes()[:100])
    (broken / "model.safetensors").unlink()
    snap = snapshot(broken)
    assert main(["train", "--resume", str(broken), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "weights.safetensors" in err and err.count("\n") == 1
    assert snapshot(broken) == snap
    assert main(["eval", str(broken)]) == 2
    assert "weights.safetensors" in capsys.readouterr().err
    # a zip that is not an Omniglot archive
    data = tmp_path / "data"
    data.mkdir()
    import zipfile

    with zipfile.ZipFile(data / "images_background_small1.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with zipfile.ZipFile(data / "images_background_small2.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with zipfile.ZipFile(data / "all_runs.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    assert main(["train", "omniglot", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "images_background_small1.zip" in err and err.count("\n") == 1
    assert snapshot(run_dir) == before


@pytest.fixture
def omniglot_unsafe_zip(tmp_path: Path) -> Path:
    import zipfile

    path = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images_background/Greek/character01/ok.png", b"x")
        z.writestr("../evil.png", b"x")
    return path


def test_analyze_cli(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    assert main(["analyze", str(run_dir), "--out", str(out), "--tasks", "6", "--steps", "2",
                 "--studies", "adaptation,shots", "--no-progress"]) == 0
    assert (out / "index.html").exists() and json.loads((out / "results.json").read_text())["summary"]
    before = snapshot(out)
    assert main(["analyze", str(run_dir), "--out", str(out), "--tasks", "6"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert snapshot(out) == before and not (tmp_path / "r2").exists()


def test_a_full_disk_is_not_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit status 3 and one line when a checkpoint cannot be written; the last good one stays."""
    import errno

    from mamlab import checkpoint

    real = checkpoint._write_fsynced
    calls = {"n": 0}

    def fills_up(path, data):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (3 files) fits, the next does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoint, "_write_fsynced", fills_up)
    run = tmp_path / "run"
    code = main(["train", "sinusoid", "--out", str(run), *SMALL, "--checkpoint-every", "5"])
    err = capsys.readouterr().err
    assert code == 3 and "No space left on device" in err and "previous checkpoint is intact" in err, err
    assert err.count("\n") == 1
    assert checkpoint.load_checkpoint(run).iteration == 0


def test_default_threads_hold_up_on_a_shared_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from mamlab.cli import default_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert default_threads("sinusoid") == 1 and default_threads("omniglot") == 2  # idle: both cores
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert default_threads("omniglot") == 1  # another job holds a core: one thread
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert default_threads("omniglot") == 1 and default_threads(None) == 1
