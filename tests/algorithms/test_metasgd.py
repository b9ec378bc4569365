"""Meta-SGD: the gradients of θ and of every learned step size against a hand-written per-task loop,
and the step sizes trained, checkpointed, resumed, loaded and used at evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from references import mlp_forward

from mamlab import MAML, MamlabError, MetaSGD, build_algorithm
from mamlab.checkpoint import load_checkpoint
from mamlab.config import resolve_config
from mamlab.evaluate import evaluate_model
from mamlab.models import MLP
from mamlab.tasks import Sinusoid
from mamlab.train import load_run, train

float64 = pytest.mark.usefixtures("float64")



def loop_grads(theta: list[torch.Tensor], alpha: list[torch.Tensor], batch, steps: int,
               first_order: bool) -> list[torch.Tensor]:
    """∇ of (1/T) Σ_i L_query(θ'_i) w.r.t. θ and α, θ' by ``steps`` of θ − α ⊙ ∇L_support, task by task."""
    theta = [t.detach().clone().requires_grad_(True) for t in theta]
    alpha = [a.detach().clone().requires_grad_(True) for a in alpha]
    total = 0.0
    for i in range(batch.num_tasks):
        p = list(theta)
        for _ in range(steps):
            loss = F.mse_loss(mlp_forward(p, batch.support_x[i]), batch.support_y[i])
            g = torch.autograd.grad(loss, p, create_graph=not first_order)
            p = [q - a * gq for q, a, gq in zip(p, alpha, g, strict=True)]
        total = total + F.mse_loss(mlp_forward(p, batch.query_x[i]), batch.query_y[i]) / batch.num_tasks
    return list(torch.autograd.grad(total, [*theta, *alpha]))


def random_step_sizes(algo: MetaSGD, seed: int) -> None:
    """Set every α element to its own value (some negative), so a mix-up of elements would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in algo.inner_lrs:
            a.copy_(torch.empty(a.shape).uniform_(-0.02, 0.1, generator=g))


# ---------------------------------------------------------------- the update rule
@float64
def test_one_step_size_per_parameter_element() -> None:
    model = MLP(1, 1, hidden=(8, 4))
    algo = MetaSGD(model, F.mse_loss, inner_lr=0.03)
    assert isinstance(algo.inner_lrs, torch.nn.ParameterList)
    assert [a.shape for a in algo.inner_lrs] == [p.shape for p in model.parameters()]
    assert all(torch.all(a == 0.03) and a.dtype == torch.float64 for a in algo.inner_lrs)
    assert algo.lr_names == [k for k, _ in model.named_parameters()]
    assert {f"inner_lrs.{i}" for i in range(6)} <= set(algo.state_dict())
    assert {id(a) for a in algo.inner_lrs} <= {id(p) for p in algo.meta_parameters()}
    assert algo.options() == {"inner_lr": 0.03, "inner_steps": 1, "first_order": False}
    assert not hasattr(algo, "inner_lr")  # it has no single step size
    with pytest.raises(MamlabError, match="inner_lr must be a number > 0, got 0"):
        MetaSGD(model, F.mse_loss, inner_lr=0)


@float64
@pytest.mark.parametrize("execution", ["batched", "batched-chunks", "vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_gradients_of_theta_and_step_sizes_equal_a_per_task_loop(execution: str, first_order: bool,
                                                                  steps: int) -> None:
    torch.manual_seed(steps)
    model = MLP(1, 1, hidden=(8, 8))
    batch = Sinusoid().sample(3, 5, 6, torch.Generator().manual_seed(1)).to(dtype=torch.float64)
    chunk = 2 if execution == "batched-chunks" else None  # chunks of 2 tasks and of 1 (no task dimension)
    algo = MetaSGD(model, F.mse_loss, inner_lr=0.05, inner_steps=steps, first_order=first_order,
                   execution=execution.removesuffix("-chunks"), task_chunk=chunk)
    random_step_sizes(algo, seed=steps)
    algo.meta_loss(batch).backward()
    got = [p.grad for p in model.parameters()] + [a.grad for a in algo.inner_lrs]
    want = loop_grads(list(model.parameters()), list(algo.inner_lrs), batch, steps, first_order)
    assert all(w.abs().sum() > 0 for w in want[len(got) // 2:])  # every step size gets a gradient
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@float64
def test_first_order_step_size_gradient_is_minus_support_grad_times_query_grad() -> None:
    """One first-order step: ∂L/∂α = −(1/T) Σ_i ∇L_s,i(θ) ⊙ ∇L_q,i(θ'_i) and ∂L/∂θ = (1/T) Σ_i ∇L_q,i(θ'_i)."""
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(6,))
    batch = Sinusoid().sample(4, 5, 5, torch.Generator().manual_seed(3)).to(dtype=torch.float64)
    algo = MetaSGD(model, F.mse_loss, inner_lr=0.05, first_order=True)
    random_step_sizes(algo, seed=4)
    algo.meta_loss(batch).backward()
    theta = [p.detach() for p in model.parameters()]
    alpha = [a.detach() for a in algo.inner_lrs]
    want_theta = [torch.zeros_like(t) for t in theta]
    want_alpha = [torch.zeros_like(t) for t in theta]
    for i in range(batch.num_tasks):
        p = [t.clone().requires_grad_(True) for t in theta]
        gs = torch.autograd.grad(F.mse_loss(mlp_forward(p, batch.support_x[i]), batch.support_y[i]), p)
        q = [(t - a * g).requires_grad_(True) for t, a, g in zip(theta, alpha, gs, strict=True)]
        gq = torch.autograd.grad(F.mse_loss(mlp_forward(q, batch.query_x[i]), batch.query_y[i]), q)
        for k in range(len(theta)):
            want_theta[k] += gq[k] / batch.num_tasks
            want_alpha[k] -= gs[k] * gq[k] / batch.num_tasks
    for g, w in zip([p.grad for p in model.parameters()] + [a.grad for a in algo.inner_lrs],
                    want_theta + want_alpha, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@float64
@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
def test_adapt_takes_steps_with_the_learned_step_sizes(execution: str) -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8,))
    batch = Sinusoid().sample(3, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    algo = MetaSGD(model, F.mse_loss, inner_lr=0.05, inner_steps=2, execution=execution)
    random_step_sizes(algo, seed=1)
    adapted = algo.adapt(batch.support_x, batch.support_y)
    alpha = [a.detach() for a in algo.inner_lrs]
    for i in range(batch.num_tasks):
        p = [t.detach() for t in model.parameters()]
        for _ in range(2):
            p = [t.requires_grad_(True) for t in p]
            g = torch.autograd.grad(F.mse_loss(mlp_forward(p, batch.support_x[i]), batch.support_y[i]), p)
            p = [(t - a * gt).detach() for t, a, gt in zip(p, alpha, g, strict=True)]
        for (k, _), want in zip(model.named_parameters(), p, strict=True):
            torch.testing.assert_close(adapted[k][i], want, rtol=1e-12, atol=1e-14)
        assert not adapted[k].requires_grad
    # an explicit step size is refused, in one line
    with pytest.raises(MamlabError, match=r"learned per-parameter step sizes \(inner_lrs\), so lr=0.02"):
        algo.adapt(batch.support_x, batch.support_y, lr=0.02)


@float64
def test_inner_params_get_step_sizes_and_the_others_none() -> None:
    model = MLP(1, 1, hidden=(8,))
    algo = MetaSGD(model, F.mse_loss, inner_params=["2.bias", "2.weight"])
    assert algo.lr_names == ["2.weight", "2.bias"] and len(algo.inner_lrs) == 2
    batch = Sinusoid().sample(2, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    assert set(algo.adapt(batch.support_x, batch.support_y)) == {"2.weight", "2.bias"}
    algo.meta_loss(batch).backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in algo.inner_lrs)


# ---------------------------------------------------------------- end to end through the registry
SMALL = {"iterations": 20, "meta_batch": 4, "shots": 5, "queries": 5, "hidden": [8], "val_every": 10,
         "checkpoint_every": 10, "val_tasks": 5, "inner_lr": 0.02, "meta_lr": 0.01}


def test_step_sizes_are_trained_saved_resumed_loaded_and_evaluated(tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, SMALL, algorithm="metasgd")
    assert isinstance(build_algorithm("metasgd", MLP(1, 1, hidden=(4,)), F.mse_loss), MetaSGD)
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    trained = [a.detach().clone() for a in run.algorithm.inner_lrs]
    assert all((a - 0.02).abs().max() > 1e-3 for a in trained)  # the outer loop moved every one
    assert (tmp_path / "run" / "algorithm.safetensors").is_file()
    # the final files and every checkpoint carry them
    loaded = load_run(tmp_path / "run")
    assert isinstance(loaded.algorithm, MetaSGD)
    for a, b in zip(loaded.algorithm.inner_lrs, trained, strict=True):
        assert torch.equal(a.detach(), b)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "iter_000010")
    assert set(ckpt.extra["algorithm_state"]) == {f"inner_lrs.{i}" for i in range(4)}
    early = load_run(tmp_path / "run", checkpoint=ckpt.path)
    for i, a in enumerate(early.algorithm.inner_lrs):
        assert torch.equal(a.detach(), ckpt.extra["algorithm_state"][f"inner_lrs.{i}"].to(a.dtype))
    # resuming restores them: an interrupted run ends where the uninterrupted one did
    half = resolve_config("sinusoid", None, {**SMALL, "iterations": 10}, algorithm="metasgd")
    train(half, tmp_path / "half", progress=False, echo=lambda s: None)
    resumed = train(None, tmp_path / "half", resume=True, iterations=20, progress=False, echo=lambda s: None)
    for a, b in zip(resumed.algorithm.parameters(), run.algorithm.parameters(), strict=True):
        assert torch.equal(a, b)
    # evaluation adapts with the learned step sizes: not as MAML at inner_lr on the same network
    learned = evaluate_model(loaded.algorithm, loaded.config, steps=(1, 2), num_tasks=10)
    in_memory = evaluate_model(run.algorithm, run.config, steps=(1, 2), num_tasks=10)
    maml = MAML(loaded.model, F.mse_loss, inner_lr=0.02)
    fixed = evaluate_model(maml, loaded.config, steps=(1, 2), num_tasks=10)
    for s in (1, 2):
        assert torch.equal(learned.losses[s], in_memory.losses[s])
        assert not torch.allclose(learned.losses[s], fixed.losses[s])
    # ... and the learned losses are those of θ − α ⊙ ∇L_support, written out here
    batch = Sinusoid().sample(1, 5, 5, torch.Generator().manual_seed(0))  # any task
    theta = [p.detach().requires_grad_(True) for p in loaded.model.parameters()]
    g = torch.autograd.grad(F.mse_loss(mlp_forward(theta, batch.support_x[0]), batch.support_y[0]), theta)
    p = [t.detach() - a.detach() * gt for t, a, gt in zip(theta, loaded.algorithm.inner_lrs, g, strict=True)]
    pred = loaded.algorithm.predict(loaded.algorithm.adapt(batch.support_x, batch.support_y, steps=1),
                                    batch.query_x)
    torch.testing.assert_close(pred[0], mlp_forward(p, batch.query_x[0]), rtol=1e-5, atol=1e-6)
    with pytest.raises(MamlabError, match="Meta-SGD adapts with its learned per-parameter step sizes"):
        evaluate_model(loaded.algorithm, loaded.config, steps=(1,), num_tasks=10, lr=0.02)
