"""Training runs: outputs, exact resume after SIGKILL and SIGTERM, numerical faults, run directories."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mamlab.checkpoint import latest_checkpoint, list_checkpoints, load_model
from mamlab.config import resolve_config
from mamlab.errors import MamlabError
from mamlab.runlog import read_metrics
from mamlab.train import TrainingDiverged, load_run, train

SMALL = {"iterations": 30, "meta_batch": 4, "shots": 5, "queries": 5, "hidden": [8, 8], "val_every": 10,
         "val_tasks": 8, "checkpoint_every": 10}
CLI_SMALL = ["--meta-batch", "4", "--shots", "5", "--queries", "5", "--hidden", "16,16", "--val-every", "50",
             "--val-tasks", "8", "--no-progress"]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its SHA-256."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_train_writes_a_self_describing_run(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, SMALL)
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    d = tmp_path / "run"
    assert json.loads((d / "config.json").read_text())["run"]["iterations"] == 30
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["torch_version"] == torch.__version__ and "mamlab_version" in meta
    metrics = read_metrics(d)
    assert [m["iteration"] for m in metrics] == list(range(1, 31))
    assert all("val_loss" in m for m in metrics if m["iteration"] % 10 == 0)
    assert [p.name for p in list_checkpoints(d)] == ["iter_000000", "iter_000010", "iter_000020", "iter_000030"]
    assert any((d / "tensorboard").iterdir())
    loaded = load_run(d)
    for a, b in zip(loaded.model.parameters(), run.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # an earlier checkpoint loads too, for analysis over training
    early = load_run(d, checkpoint=list_checkpoints(d)[1])
    assert early.iteration == 10


def test_meta_training_reduces_the_loss(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, {**SMALL, "iterations": 300, "meta_batch": 10, "meta_lr": 0.01,
                                                "hidden": [40, 40], "val_every": 300})
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    metrics = read_metrics(tmp_path / "run")
    first = sum(m["meta_loss"] for m in metrics[:30]) / 30
    last = sum(m["meta_loss"] for m in metrics[-30:]) / 30
    assert last < 0.6 * first


def test_same_seed_same_run_bitwise(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, SMALL)
    a = train(config, tmp_path / "a", progress=False, echo=lambda s: None)
    b = train(config, tmp_path / "b", progress=False, echo=lambda s: None)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mamlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, beyond: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list_checkpoints(run)) > beyond:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_a_kill_is_bitwise_identical(tmp_path: Path, sig: signal.Signals) -> None:
    args = ["train", "sinusoid", "--iterations", "400", "--checkpoint-every", "40", *CLI_SMALL]
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    victim = _cli(*args, "--out", str(tmp_path / "victim"))
    _wait_for_checkpoint(tmp_path / "victim", victim, beyond=2)
    victim.send_signal(sig)
    out, err = victim.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert victim.returncode == 130, err
        assert "continue with: mamlab train --resume" in err and "Traceback" not in err
    else:
        assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim" / "model.safetensors").exists()
    resumed = _cli("train", "--resume", str(tmp_path / "victim"), "--no-progress")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in out
    ref.communicate(timeout=300)
    assert ref.returncode == 0
    a = load_model(tmp_path / "ref" / "model.safetensors")
    b = load_model(tmp_path / "victim" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    iterations = [m["iteration"] for m in read_metrics(tmp_path / "victim")]
    assert iterations == list(range(1, 401))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, {**SMALL, "inner_lr": 1e30})
    with pytest.raises(TrainingDiverged, match="non-finite meta-loss at iteration 1 .*inner_lr 1e\\+30"):
        train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    before = snapshot(tmp_path / "run" / "checkpoints")
    assert "iter_000000/weights.safetensors" in before
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_skip_nonfinite_counts_skips(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, {**SMALL, "inner_lr": 1e30, "skip_nonfinite": True,
                                                "iterations": 5})
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    assert read_metrics(tmp_path / "run")[-1]["skipped"] == 5


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, {**SMALL, "iterations": 5})
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    before = snapshot(tmp_path / "run")
    with pytest.raises(MamlabError, match="already holds a run; use --resume"):
        train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    assert snapshot(tmp_path / "run") == before
    train(resolve_config("sinusoid", None, {**SMALL, "iterations": 6}), tmp_path / "run", force=True,
          progress=False, echo=lambda s: None)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["iterations"] == 6


def test_resume_can_extend_a_finished_run(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, {**SMALL, "iterations": 20})
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    full = train(resolve_config("sinusoid", None, {**SMALL, "iterations": 30}), tmp_path / "full",
                 progress=False, echo=lambda s: None)
    extended = train(None, tmp_path / "run", resume=True, iterations=30, progress=False, echo=lambda s: None)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["iterations"] == 30
    for p, q in zip(full.model.parameters(), extended.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_cosine_schedule_sets_and_logs_beta_and_resumes_exactly(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, {**SMALL, "lr_schedule": "cosine", "meta_lr": 0.01})
    full = train(config, tmp_path / "full", progress=False, echo=lambda s: None)
    logged = [m["meta_lr"] for m in read_metrics(tmp_path / "full")]
    assert logged[0] == 0.01 and logged[15] == pytest.approx(0.005) and logged == sorted(logged, reverse=True)
    # a crash after iteration 10: only the checkpoints up to 10 survive; the resumed run matches
    train(config, tmp_path / "cut", progress=False, echo=lambda s: None)
    for name in ("iter_000020", "iter_000030", "latest"):
        target = tmp_path / "cut" / "checkpoints" / name
        if target.is_dir():
            for f in target.iterdir():
                f.unlink()
            target.rmdir()
        else:
            target.unlink()
    (tmp_path / "cut" / "model.safetensors").unlink()
    resumed = train(None, tmp_path / "cut", resume=True, progress=False, echo=lambda s: None)
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [m["meta_lr"] for m in read_metrics(tmp_path / "cut")] == logged


@pytest.mark.parametrize("task", ["linear-regression", "linear-classification"])
def test_linear_tasks_train_and_baseline(tmp_path: Path, task: str) -> None:
    for method in ("maml", "pretrain"):
        config = resolve_config(task, None, {**SMALL, "hidden": [], "method": method})
        run = train(config, tmp_path / method, progress=False, echo=lambda s: None)
        assert run.config.method == method


def test_resume_may_change_the_device_and_precision_but_not_the_run(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, {**SMALL, "iterations": 10})
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    run = train(None, tmp_path / "run", resume=True, iterations=20, changes={"device": "cpu", "precision": "bf16"},
                progress=False, echo=lambda s: None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert (saved["iterations"], saved["device"], saved["precision"]) == (20, "cpu", "bf16")
    assert run.iteration == 20 and all(torch.isfinite(p).all() for p in run.algorithm.parameters())
    before = snapshot(tmp_path / "run")
    with pytest.raises(MamlabError, match="meta_lr cannot change when resuming; options that can: iterations"):
        train(None, tmp_path / "run", resume=True, changes={"meta_lr": 0.1}, progress=False, echo=lambda s: None)
    assert snapshot(tmp_path / "run") == before


def test_a_run_under_bf16_autocast_trains_with_float32_parameters(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, {**SMALL, "iterations": 10, "precision": "bf16"})
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in run.algorithm.parameters())
    losses = [m["meta_loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)


def test_plain_sgd_as_the_outer_optimizer_steps_by_the_meta_gradient(tmp_path: Path) -> None:
    """One iteration with meta_optimizer sgd: θ1 = θ0 − β·∇ (for Reptile, θ0 + β(φ̄ − θ0))."""
    options = {**SMALL, "iterations": 1, "meta_lr": 0.5, "meta_optimizer": "sgd"}
    config = resolve_config("sinusoid", None, options, algorithm="reptile")
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    from mamlab.checkpoint import load_checkpoint
    from mamlab.experiments import build_family
    from mamlab.train import TRAIN_SEED_OFFSET, build_run_algorithm

    torch.manual_seed(config.seed)
    fresh = build_run_algorithm(config)
    theta0 = [p.detach().clone() for p in fresh.parameters()]
    assert [p.tolist() for p in theta0] == [t.tolist() for t in load_checkpoint(
        tmp_path / "run" / "checkpoints" / "iter_000000").model_state.values()]
    batch = build_family(config, "train").sample(config.meta_batch, config.shots, config.queries,
                                                 torch.Generator().manual_seed(TRAIN_SEED_OFFSET + config.seed))
    fresh.meta_loss(batch).backward()
    for p0, p, trained in zip(theta0, fresh.parameters(), run.algorithm.parameters(), strict=True):
        torch.testing.assert_close(trained.detach(), p0 - 0.5 * p.grad, rtol=1e-5, atol=1e-6)


def test_metrics_log_the_iteration_time_and_the_meta_gradient_norm(tmp_path: Path) -> None:
    """Every line has ``seconds`` and ``grad_norm`` (the L2 norm of the meta-gradient the optimizer steps by);
    TensorBoard gets them and the run's flattened config (HParams and Text tabs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from mamlab.experiments import build_family
    from mamlab.train import TRAIN_SEED_OFFSET, build_run_algorithm

    config = resolve_config("sinusoid", None, {**SMALL, "iterations": 3})
    train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    metrics = read_metrics(tmp_path / "run")
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert all(m["seconds"] > 0 and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in metrics)
    torch.manual_seed(config.seed)
    fresh = build_run_algorithm(config)
    batch = build_family(config, "train").sample(config.meta_batch, config.shots, config.queries,
                                                 torch.Generator().manual_seed(TRAIN_SEED_OFFSET + config.seed))
    fresh.meta_loss(batch).backward()
    expected = math.sqrt(sum(float(p.grad.double().square().sum()) for p in fresh.parameters()))
    assert metrics[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert {"seconds", "grad_norm", "meta_loss"} <= set(acc.Tags()["scalars"])
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["run/meta_lr"].number_value == config.meta_lr
    assert start.hparams["algorithm_options/inner_lr"].number_value == 0.01
    assert start.hparams["task"].string_value == "sinusoid"
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| run/meta_batch | 4 |" in text and "| task_options/hidden | [8, 8] |" in text


def test_one_writer_per_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A second writer gets a one-line error naming the process; the OS frees the lock when it dies."""
    from mamlab.cli import main

    run = tmp_path / "run"
    writer = _cli("train", "sinusoid", "--iterations", "1000000", "--checkpoint-every", "20", *CLI_SMALL,
                  "--out", str(run))
    try:
        _wait_for_checkpoint(run, writer, beyond=1)
        for argv in (["train", "--resume", str(run)],
                     ["train", "sinusoid", "--out", str(run), "--force", *CLI_SMALL]):
            with pytest.raises(SystemExit) as e:
                sys.exit(main(argv))
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert f"is being written by process {writer.pid};" in err and err.count("\n") == 1, err
        assert writer.poll() is None  # the writer goes on
    finally:
        writer.kill()
        writer.communicate(timeout=60)
    # SIGKILL released the lock: the run resumes
    assert main(["train", "--resume", str(run), "--iterations", str(load_run(run).iteration + 5),
                 "--no-progress"]) == 0


def test_a_killed_extension_is_evaluated_at_its_newest_checkpoint(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """Extending a finished run removes its out-of-date final model; eval then scores the newest checkpoint."""
    from mamlab.cli import main

    run = tmp_path / "run"
    assert main(["train", "sinusoid", "--iterations", "20", "--checkpoint-every", "20", *CLI_SMALL,
                 "--out", str(run)]) == 0
    assert (run / "model.safetensors").is_file()
    extension = _cli("train", "--resume", str(run), "--iterations", "1000000", "--checkpoint-every", "20")
    try:
        _wait_for_checkpoint(run, extension, beyond=3)  # iter 0, 20 and two more
    finally:
        extension.kill()
        extension.communicate(timeout=60)
    assert not (run / "model.safetensors").exists()
    loaded = load_run(run)
    # the newest checkpoint is the one the pointer commits to (a kill may land between a checkpoint's
    # rename and the pointer's update: that checkpoint was never committed)
    newest = int(latest_checkpoint(run).name.split("_")[1])
    assert loaded.iteration == newest >= 40
    assert main(["eval", str(run), "--tasks", "5"]) == 0
    assert f"(iteration {newest})" in capsys.readouterr().out


def test_non_finite_data_is_not_blamed_on_the_learning_rates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mamlab.tasks import Sinusoid

    real = Sinusoid.sample

    def with_nan(self, *args, **kwargs):
        batch = real(self, *args, **kwargs)
        batch.query_y[0, 0] = float("nan")
        return batch

    monkeypatch.setattr(Sinusoid, "sample", with_nan)
    config = resolve_config("sinusoid", None, {**SMALL, "iterations": 3})
    with pytest.raises(TrainingDiverged, match="the meta-batch itself holds non-finite query_y: the data, "
                                               "not the learning rates") as e:
        train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    assert "learning rate (" not in str(e.value)


def test_cuda_graph_on_the_cpu_is_refused_before_anything_is_written(tmp_path):
    config = resolve_config("sinusoid", None, {**SMALL, "cuda_graph": True, "device": "cpu"})
    with pytest.raises(MamlabError, match="CUDA graphs need a CUDA device, got cpu"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    recompute = resolve_config("sinusoid", None, {**SMALL, "cuda_graph": True, "recompute": True})
    assert recompute.cuda_graph and recompute.recompute  # both are options; together refused on a GPU


def test_a_graphed_meta_gradient_trains_the_same_run(tmp_path, monkeypatch):
    """The training loop with the meta-gradient from a (CPU stand-in for a) CUDA graph: the same model."""
    import mamlab.train
    from eager_graph import EagerGraph

    plain = train(resolve_config("sinusoid", None, {**SMALL, "iterations": 12}), tmp_path / "plain", progress=False)
    calls = []

    class Counted(EagerGraph):
        def __call__(self, batch):
            calls.append(batch.num_tasks)
            return super().__call__(batch)

    monkeypatch.setattr(mamlab.train, "GraphedMetaGradient", Counted)
    graphed = train(resolve_config("sinusoid", None, {**SMALL, "iterations": 12, "cuda_graph": True}),
                    tmp_path / "graphed", progress=False)
    for a, b in zip(plain.algorithm.parameters(), graphed.algorithm.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [r["meta_loss"] for r in read_metrics(tmp_path / "plain")] == \
        [r["meta_loss"] for r in read_metrics(tmp_path / "graphed")]
    assert calls == [4] * 12


def test_tensorboard_gets_a_thinned_curve_and_metrics_jsonl_every_iteration(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import mamlab.train

    monkeypatch.setattr(mamlab.train, "TENSORBOARD_POINTS", 5)  # 30 iterations: every 6th, as 70,000 would
    train(resolve_config("sinusoid", None, SMALL), tmp_path / "run", progress=False)  # validation every 10
    assert [m["iteration"] for m in read_metrics(tmp_path / "run")] == list(range(1, 31))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("meta_loss")] == [6, 10, 12, 18, 20, 24, 30]
    assert [e.step for e in acc.Scalars("val_loss")] == [10, 20, 30]


def test_finite_gradients_whose_norm_overflows_are_finite() -> None:
    from torch import nn

    from mamlab.train import _finite_grads

    def norm(net: nn.Module) -> float:  # the global norm the training loop logs
        return float(torch.stack([p.grad.norm() for p in net.parameters()]).norm())

    net = nn.Linear(2, 1)
    net.weight.grad = torch.full((1, 2), 1e30)  # finite, but the float32 norm overflows to inf
    net.bias.grad = torch.zeros(1)
    assert norm(net) == float("inf") and _finite_grads(net, norm(net))
    net.bias.grad = torch.tensor([float("nan")])
    assert not _finite_grads(net, norm(net))
    net.bias.grad = torch.tensor([float("inf")])
    assert not _finite_grads(net, norm(net))
