"""Reptile: ``.grad`` = θ − φ̄ against a hand-written per-task loop (SGD, Adam), and end to end."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mamlab import MamlabError, Reptile, build_algorithm
from mamlab.config import resolve_config
from mamlab.evaluate import evaluate_model
from mamlab.models import MLP
from mamlab.tasks import Sinusoid
from mamlab.train import load_run, train

pytestmark = pytest.mark.usefixtures("float64")

LR, STEPS = 0.03, 3


def batch(n: int = 5):
    return Sinusoid().sample(n, 4, 6, torch.Generator().manual_seed(2)).to(dtype=torch.float64)


def net(ws, x):
    """The 1-8-8-1 ReLU MLP, written out."""
    w0, b0, w1, b1, w2, b2 = ws
    return torch.relu(torch.relu(x @ w0.t() + b0) @ w1.t() + b1) @ w2.t() + b2


def train_task(theta, x, y, steps, optimizer, lr=LR, batch_size=None):
    """φ: ``steps`` steps of plain SGD or a hand-written Adam (betas 0, 0.999; eps 1e-8) from θ."""
    ws = [t.detach().clone() for t in theta]
    m = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    for k in range(steps):
        if batch_size is None:
            xb, yb = x, y
        else:
            idx = [(k * batch_size + j) % x.shape[0] for j in range(batch_size)]
            xb, yb = x[idx], y[idx]
        ws = [w.requires_grad_(True) for w in ws]
        gs = torch.autograd.grad(F.mse_loss(net(ws, xb), yb), ws)
        with torch.no_grad():
            if optimizer == "sgd":
                ws = [w - lr * g for w, g in zip(ws, gs, strict=True)]
            else:
                t = k + 1
                new = []
                for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
                    m[i] = 0.0 * m[i] + 1.0 * g
                    v[i] = 0.999 * v[i] + 0.001 * g * g
                    mhat, vhat = m[i] / (1 - 0.0 ** t), v[i] / (1 - 0.999 ** t)
                    new.append(w - lr * mhat / (vhat.sqrt() + 1e-8))
                ws = new
    return [w.detach() for w in ws]


def reference(model, b, optimizer, train_on="support+query", batch_size=None):
    """θ − φ̄ and the mean query loss of φ_i, one task at a time."""
    theta = [p.detach() for p in model.parameters()]
    phis, loss = [], 0.0
    for i in range(b.num_tasks):
        if train_on == "support":
            x, y = b.support_x[i], b.support_y[i]
        else:
            x, y = torch.cat([b.support_x[i], b.query_x[i]]), torch.cat([b.support_y[i], b.query_y[i]])
        phi = train_task(theta, x, y, STEPS, optimizer, batch_size=batch_size)
        phis.append(phi)
        loss += float(F.mse_loss(net(phi, b.query_x[i]), b.query_y[i])) / b.num_tasks
    mean = [torch.stack(ps).mean(0) for ps in zip(*phis, strict=True)]
    return [t - p for t, p in zip(theta, mean, strict=True)], loss, phis


@pytest.mark.parametrize("task_chunk", [None, 2])
@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_grad_is_theta_minus_the_mean_trained_weights(optimizer: str, execution: str, task_chunk) -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8, 8))
    b = batch()
    algo = Reptile(model, F.mse_loss, LR, STEPS, inner_optimizer=optimizer, execution=execution,
                   task_chunk=task_chunk)
    loss = algo.meta_loss(b)
    loss.backward()
    want, want_loss, _ = reference(model, b, optimizer)
    for p, r in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-10)


@pytest.mark.parametrize("execution", ["batched", "loop"])
def test_train_on_support_and_inner_minibatches(execution: str) -> None:
    torch.manual_seed(1)
    model = MLP(1, 1, hidden=(8, 8))
    b = batch(3)
    for train_on, size in [("support", None), ("support+query", 4), ("support", 3)]:
        model.zero_grad()
        algo = Reptile(model, F.mse_loss, LR, STEPS, train_on=train_on, inner_batch=size, execution=execution)
        algo.meta_loss(b).backward()
        want, _, _ = reference(model, b, "sgd", train_on, size)
        for p, r in zip(model.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)


def test_adam_is_torch_adam_with_a_fresh_state_per_task() -> None:
    torch.manual_seed(2)
    model = MLP(1, 1, hidden=(8, 8))
    b = batch(3)
    algo = Reptile(model, F.mse_loss, LR, STEPS, inner_optimizer="adam", train_on="support")
    adapted = algo.adapt(b.support_x, b.support_y)
    for i in range(b.num_tasks):
        copy = MLP(1, 1, hidden=(8, 8))
        copy.load_state_dict(model.state_dict())
        opt = torch.optim.Adam(copy.parameters(), lr=LR, betas=(0.0, 0.999), eps=1e-8)
        for _ in range(STEPS):
            opt.zero_grad()
            F.mse_loss(copy(b.support_x[i]), b.support_y[i]).backward()
            opt.step()
        for k, p in copy.named_parameters():
            torch.testing.assert_close(adapted[k][i], p.detach(), rtol=1e-10, atol=1e-12)


def test_one_outer_sgd_step_is_reptiles_interpolation() -> None:
    torch.manual_seed(3)
    model = MLP(1, 1, hidden=(8, 8))
    b = batch()
    eps = 0.1
    algo = Reptile(model, F.mse_loss, LR, STEPS)
    theta = [p.detach().clone() for p in model.parameters()]
    _, _, phis = reference(model, b, "sgd")
    opt = torch.optim.SGD(algo.parameters(), lr=eps)
    opt.zero_grad()
    algo.meta_loss(b).backward()
    opt.step()
    for i, p in enumerate(model.parameters()):
        phibar = torch.stack([phi[i] for phi in phis]).mean(0)
        torch.testing.assert_close(p.detach(), theta[i] + eps * (phibar - theta[i]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_adapt_trains_on_the_support_set_and_continues(optimizer: str, execution: str) -> None:
    torch.manual_seed(4)
    model = MLP(1, 1, hidden=(8, 8))
    b = batch(3)
    algo = Reptile(model, F.mse_loss, LR, STEPS, inner_optimizer=optimizer, inner_batch=3, execution=execution)
    theta = [p.detach() for p in model.parameters()]
    full = algo.adapt(b.support_x, b.support_y, steps=5)
    names = [k for k, _ in model.named_parameters()]
    for i in range(b.num_tasks):
        phi = train_task(theta, b.support_x[i], b.support_y[i], 5, optimizer, batch_size=3)
        for k, w in zip(names, phi, strict=True):
            torch.testing.assert_close(full[k][i], w, rtol=1e-10, atol=1e-12)
    # 0, then 2, then 3 more steps continue the same optimizer run (step count and Adam state)
    part = algo.adapt(b.support_x, b.support_y, steps=0)
    part = algo.adapt(b.support_x, b.support_y, steps=2, start=part)
    part = algo.adapt(b.support_x, b.support_y, steps=3, start=part)
    for k in names:
        torch.testing.assert_close(part[k], full[k], rtol=1e-12, atol=1e-14)
    pred = algo.predict(full, b.query_x)
    want = torch.stack([net([full[k][i] for k in names], b.query_x[i]) for i in range(b.num_tasks)])
    torch.testing.assert_close(pred, want)


def test_bad_input_is_one_line() -> None:
    model = MLP(1, 1, hidden=(4,))
    with pytest.raises(MamlabError, match=r"^unknown inner_optimizer 'rmsprop'; allowed: sgd, adam$"):
        Reptile(model, F.mse_loss, 0.01, inner_optimizer="rmsprop")
    with pytest.raises(MamlabError, match=r"unknown inner_optimizer 'rmsprop'; allowed: sgd, adam$"):
        build_algorithm("reptile", model, F.mse_loss, {"inner_optimizer": "rmsprop"})
    with pytest.raises(MamlabError, match=r"unknown train_on 'query'; allowed: support\+query, support$"):
        build_algorithm("reptile", model, F.mse_loss, {"train_on": "query"})
    with pytest.raises(MamlabError, match="inner_batch must be an integer > 0, got 0"):
        build_algorithm("reptile", model, F.mse_loss, {"inner_batch": 0})


SMALL = {"iterations": 20, "meta_batch": 4, "shots": 5, "queries": 5, "hidden": [8], "val_every": 10,
         "checkpoint_every": 10, "val_tasks": 5, "inner_lr": 0.02, "inner_steps": 3}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_load_and_evaluate(optimizer: str, tmp_path: Path) -> None:
    config = resolve_config("sinusoid", None, {**SMALL, "inner_optimizer": optimizer}, algorithm="reptile")
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    assert isinstance(run.algorithm, Reptile) and run.algorithm.inner_optimizer == optimizer
    loaded = load_run(tmp_path / "run")
    assert isinstance(loaded.algorithm, Reptile) and loaded.algorithm.options() == run.algorithm.options()
    for a, c in zip(loaded.algorithm.parameters(), run.algorithm.parameters(), strict=True):
        assert torch.equal(a, c)
    result = evaluate_model(loaded.algorithm, loaded.config, steps=(0, 1, 8), num_tasks=10)
    assert all(torch.isfinite(result.losses[s]).all() for s in (0, 1, 8))
    # evaluation adapts with the run's inner optimizer: the same as adapting by hand
    b = Sinusoid().sample(3, 5, 5, torch.Generator().manual_seed(0)).to(dtype=next(loaded.model.parameters()).dtype)
    a = loaded.algorithm.adapt(b.support_x, b.support_y, steps=2)
    c = run.algorithm.adapt(b.support_x, b.support_y, steps=2)
    for k in a:
        assert torch.equal(a[k], c[k])
