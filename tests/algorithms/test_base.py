"""An algorithm with learned meta-state is trained, saved, resumed and evaluated with that state.

``LearnedStep`` (written here, registered for the test only) learns its inner step size, a meta-
parameter outside the model. Its meta-gradient is checked against a hand-written loop, then it goes
through ``train``, checkpoints, resume, ``load_run`` and ``evaluate_model`` like any algorithm.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mamlab.algorithms import ALGORITHMS, AlgorithmSpec, InnerLoopAlgorithm
from mamlab.algorithms.registry import INNER_LR, INNER_STEPS
from mamlab.checkpoint import load_checkpoint
from mamlab.config import resolve_config
from mamlab.evaluate import evaluate_model
from mamlab.models import MLP
from mamlab.tasks import Sinusoid
from mamlab.train import load_run, train


class LearnedStep(InnerLoopAlgorithm):
    """θ' = θ − exp(s) ∇L_support(θ), with s learned by the outer loop."""

    name = "learned-step"

    def __init__(self, model, loss_fn, inner_lr=0.01, inner_steps=1, execution="auto", task_chunk=None):
        super().__init__(model, loss_fn, inner_steps=inner_steps, execution=execution, task_chunk=task_chunk)
        self.log_step = nn.Parameter(torch.tensor(math.log(inner_lr)))

    def inner_update(self, params, grads, step, lr=None):
        a = self.log_step.exp() if lr is None else lr
        return {k: p - a * grads[k] for k, p in params.items()}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "learned-step",
                        AlgorithmSpec("learned-step", LearnedStep, (INNER_LR, INNER_STEPS), "a test algorithm"))


def test_meta_gradient_reaches_the_learned_step_size() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = MLP(1, 1, hidden=(6,))
        algo = LearnedStep(model, F.mse_loss, inner_lr=0.05, inner_steps=2)
        b = Sinusoid().sample(3, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
        algo.meta_loss(b).backward()
        grads = {n: p.grad.clone() for n, p in algo.named_parameters()}
        assert set(grads) == {"log_step"} | {f"model.{n}" for n, _ in model.named_parameters()}
        got = [grads[f"model.{n}"] for n, _ in model.named_parameters()] + [grads["log_step"]]
        # by hand: a per-task loop with torch.autograd.grad
        theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        s = torch.tensor(math.log(0.05), requires_grad=True)
        names = [n for n, _ in model.named_parameters()]
        total = 0.0
        for i in range(b.num_tasks):
            ps = theta
            for _ in range(2):
                loss = F.mse_loss(torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (b.support_x[i],)),
                                  b.support_y[i])
                gs = torch.autograd.grad(loss, ps, create_graph=True)
                ps = [p - s.exp() * g for p, g in zip(ps, gs, strict=True)]
            q = F.mse_loss(torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (b.query_x[i],)), b.query_y[i])
            total = total + q / b.num_tasks
        want = torch.autograd.grad(total, [*theta, s])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


SMALL = {"iterations": 20, "meta_batch": 4, "shots": 5, "queries": 5, "hidden": [8], "val_every": 10,
         "checkpoint_every": 10, "val_tasks": 5, "inner_lr": 0.02}


def test_learned_state_is_trained_saved_resumed_and_evaluated(registered, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = resolve_config("sinusoid", None, SMALL, algorithm="learned-step")
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    trained = float(run.algorithm.log_step.detach())
    assert trained != pytest.approx(math.log(0.02), abs=1e-6)  # the outer loop moved it
    assert (tmp_path / "run" / "algorithm.safetensors").is_file()
    # the final files and every checkpoint carry it
    loaded = load_run(tmp_path / "run")
    assert float(loaded.algorithm.log_step.detach()) == trained
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "iter_000010")
    assert set(ckpt.extra["algorithm_state"]) == {"log_step"}
    early = load_run(tmp_path / "run", checkpoint=ckpt.path)
    assert float(early.algorithm.log_step.detach()) == float(ckpt.extra["algorithm_state"]["log_step"])
    # resuming restores it: an interrupted run ends bitwise where the uninterrupted one did
    half = resolve_config("sinusoid", None, {**SMALL, "iterations": 10}, algorithm="learned-step")
    train(half, tmp_path / "half", progress=False, echo=lambda s: None)
    resumed = train(None, tmp_path / "half", resume=True, iterations=20, progress=False, echo=lambda s: None)
    assert float(resumed.algorithm.log_step.detach()) == trained
    for a, b in zip(resumed.algorithm.parameters(), run.algorithm.parameters(), strict=True):
        assert torch.equal(a, b)
    # evaluation adapts with the learned step size, not the configured one
    learned = evaluate_model(loaded.algorithm, loaded.config, steps=(1,), num_tasks=10)
    fixed = evaluate_model(loaded.algorithm, loaded.config, steps=(1,), num_tasks=10, lr=0.02)
    assert not torch.equal(learned.losses[1], fixed.losses[1])
    by_model = evaluate_model(loaded.model, loaded.config, steps=(1,), num_tasks=10)  # a bare network
    assert not torch.equal(learned.losses[1], by_model.losses[1])  # ... is adapted with the initial step
