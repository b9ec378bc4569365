"""MAML++: each trick against an independent computation written here, then end to end through the registry.

* the multi-step loss weights against hand-computed values and the released formula, re-written;
* LSLR (an MLP) and per-step BatchNorm (a tiny conv+BN net) meta-gradients against per-task
  loops with ``torch.autograd.grad``, first and second order, the order chosen by the schedule;
* ``adapt``/``predict`` against the same loop, continuing with ``start=`` and past the trained steps;
* train → checkpoint → resume (bitwise) → ``load_run`` → ``evaluate_model``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from references import ConvBN, convbn_by_hand, image_batch, mlp_forward

from mamlab import MamlabError, MAMLPlusPlus, build_algorithm
from mamlab.algorithms.mamlpp import AdaptedParams, msl_weights
from mamlab.checkpoint import load_checkpoint
from mamlab.config import resolve_config
from mamlab.evaluate import evaluate_model, per_task_scores
from mamlab.models import MLP
from mamlab.tasks import Sinusoid
from mamlab.train import load_run, train

pytestmark = pytest.mark.usefixtures("float64")


# ---------------------------------------------------------------- independent references
def released_weights(n: int, epoch: int, epochs: int) -> list[float]:
    """``get_per_step_loss_importance_vector`` of the released code, re-written from its description."""
    if epoch >= epochs:  # the training loop then takes only the final step's loss
        return [0.0] * (n - 1) + [1.0]
    w = [1.0 / n] * n
    rate = 1.0 / n / epochs
    low = 0.03 / n
    for i in range(n - 1):
        w[i] = max(w[i] - epoch * rate, low)
    w[-1] = min(w[-1] + epoch * (n - 1) * rate, 1.0 - (n - 1) * low)
    return w




convbn_forward = convbn_by_hand  # p = conv/head weights, bn = [w1, b1, w2, b2] of one step


INNER = ["c1.weight", "c1.bias", "c2.weight", "c2.bias", "head.weight", "head.bias"]
NORM = ["b1.weight", "b1.bias", "b2.weight", "b2.bias"]


def perturb(algo: MAMLPlusPlus, seed: int) -> None:
    """Make every learned rate and per-step BatchNorm entry distinct, so a wrong index shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in algo.lrs.values():
            p.mul_(0.5 + torch.rand(p.shape, generator=g))
        for p in algo.step_bn.values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- MSL
def test_msl_weights_equal_hand_computed_values() -> None:
    n, e = 5, 10  # decay 1/(5·10) = 0.02 per epoch, floor 0.03/5 = 0.006, final at most 1 − 4·0.006 = 0.976
    hand = {0: [0.2] * 5, 1: [0.18] * 4 + [0.28], 3: [0.14] * 4 + [0.44], 9: [0.02] * 4 + [0.92],
            10: [0.0] * 4 + [1.0], 25: [0.0] * 4 + [1.0]}
    for epoch, want in hand.items():
        got = msl_weights(n, epoch, e)
        assert got == pytest.approx(want, abs=1e-15)
        assert got == pytest.approx(released_weights(n, epoch, e), abs=1e-15)
        assert sum(got) == pytest.approx(1.0, abs=1e-15)
    # the floor and the cap: E = 40, epoch 39: 0.2 − 39/200 = 0.005 < 0.006; 0.2 + 39·4/200 = 0.98 > 0.976
    assert msl_weights(5, 39, 40) == pytest.approx([0.006] * 4 + [0.976], abs=1e-15)
    for epoch in range(45):
        assert msl_weights(5, epoch, 40) == pytest.approx(released_weights(5, epoch, 40), abs=1e-15)
    assert msl_weights(1, 0, 10) == [1.0]


def test_the_schedule_follows_the_training_iteration() -> None:
    algo = MAMLPlusPlus(MLP(1, 1, hidden=(4,)), F.mse_loss, 0.1, 5, msl_epochs=10, iterations_per_epoch=3,
                        first_order_epochs=2)
    assert algo.epoch == 0 and algo.first_order  # before any start_iteration: epoch 0
    for iteration, epoch in [(1, 0), (3, 0), (4, 1), (6, 1), (7, 2), (30, 9), (31, 10), (99, 32)]:
        algo.start_iteration(iteration, 100)
        assert algo.epoch == epoch
        assert algo.step_weights(5) == pytest.approx(released_weights(5, epoch, 10), abs=1e-15)
        assert algo.first_order == (epoch < 2)  # derivative-order annealing: second order from iteration 7
    no_msl = MAMLPlusPlus(MLP(1, 1, hidden=(4,)), F.mse_loss, 0.1, 3, msl=False, first_order_epochs=0)
    assert no_msl.step_weights(3) == [0.0, 0.0, 1.0] and not no_msl.first_order


def test_an_msl_schedule_longer_than_training_is_an_error() -> None:
    algo = MAMLPlusPlus(MLP(1, 1, hidden=(4,)), F.mse_loss, 0.1, 5, msl_epochs=10, iterations_per_epoch=3)
    with pytest.raises(MamlabError, match=r"msl_epochs 10 x iterations_per_epoch 3 = 30 iterations, more "
                                          r"than the run's 29"):
        algo.start_iteration(1, 29)
    algo.start_iteration(1, 30)
    MAMLPlusPlus(MLP(1, 1, hidden=(4,)), F.mse_loss, 0.1, 5, msl=False).start_iteration(1, 29)
    MAMLPlusPlus(MLP(1, 1, hidden=(4,)), F.mse_loss, 0.1, 1).start_iteration(1, 29)  # one step: no schedule


# ---------------------------------------------------------------- LSLR + MSL (MLP)
@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
@pytest.mark.parametrize("iteration", [2, 3])  # epoch 1: first order; epoch 2: second order
def test_lslr_meta_gradient_equals_a_per_task_loop(execution: str, iteration: int) -> None:
    torch.manual_seed(0)
    n = 3
    model = MLP(1, 1, hidden=(8, 8))
    b = Sinusoid().sample(3, 5, 6, torch.Generator().manual_seed(1)).to(dtype=torch.float64)
    algo = MAMLPlusPlus(model, F.mse_loss, 0.05, n, msl_epochs=4, iterations_per_epoch=1, first_order_epochs=2,
                        execution=execution)
    perturb(algo, 1)
    algo.start_iteration(iteration, 100)
    first_order = iteration == 2
    assert algo.first_order == first_order
    algo.meta_loss(b).backward()
    names = [k for k, _ in model.named_parameters()]
    got = [p.grad.clone() for p in model.parameters()] + [algo.lrs[k.replace(".", "-")].grad.clone() for k in names]

    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    lrs = [algo.lrs[k.replace(".", "-")].detach().clone().requires_grad_(True) for k in names]
    w = released_weights(n, iteration - 1, 4)
    total = 0.0
    for i in range(b.num_tasks):
        p = theta
        for k in range(n):
            loss = F.mse_loss(mlp_forward(p, b.support_x[i]), b.support_y[i])
            g = torch.autograd.grad(loss, p, create_graph=not first_order)
            p = [q - a[k] * gq for q, a, gq in zip(p, lrs, g, strict=True)]
            total = total + w[k] * F.mse_loss(mlp_forward(p, b.query_x[i]), b.query_y[i])
    want = torch.autograd.grad(total / b.num_tasks, theta + lrs)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- per-step BatchNorm (+ LSLR, MSL)
@pytest.mark.parametrize("execution", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
def test_per_step_batchnorm_meta_gradient_equals_a_per_task_loop(execution: str, first_order: bool) -> None:
    torch.manual_seed(3)
    n = 3
    model = ConvBN()
    b = image_batch(seed=4)
    algo = MAMLPlusPlus(model, F.cross_entropy, 0.2, n, first_order_epochs=1 if first_order else 0,
                        msl_epochs=5, iterations_per_epoch=1, execution=execution)
    assert algo.inner_params == INNER and set(algo.step_bn) == {k.replace(".", "-") for k in NORM}
    assert algo.step_bn["b1-weight"].shape == (n, 4)
    perturb(algo, 2)
    algo.start_iteration(2 if not first_order else 1, 10)  # epoch 1 (second order) or 0 (first order)
    epoch = algo.epoch
    algo.meta_loss(b).backward()
    params = dict(model.named_parameters())
    got = ([params[k].grad.clone() for k in INNER] + [algo.lrs[k.replace(".", "-")].grad.clone() for k in INNER]
           + [algo.step_bn[k.replace(".", "-")].grad.clone() for k in NORM])
    for k in NORM:  # the model's own BatchNorm parameters are replaced by the per-step ones
        assert torch.count_nonzero(params[k].grad) == 0

    theta = [params[k].detach().clone().requires_grad_(True) for k in INNER]
    lrs = [algo.lrs[k.replace(".", "-")].detach().clone().requires_grad_(True) for k in INNER]
    bns = [algo.step_bn[k.replace(".", "-")].detach().clone().requires_grad_(True) for k in NORM]
    w = released_weights(n, epoch, 5)
    total = 0.0
    for i in range(b.num_tasks):
        p = theta
        for k in range(n):
            step_bn = [t[k] for t in bns]  # the support pass and the query after step k use step k's
            loss = F.cross_entropy(convbn_forward(p, step_bn, b.support_x[i]), b.support_y[i])
            g = torch.autograd.grad(loss, p, create_graph=not first_order)
            p = [q - a[k] * gq for q, a, gq in zip(p, lrs, g, strict=True)]
            total = total + w[k] * F.cross_entropy(convbn_forward(p, step_bn, b.query_x[i]), b.query_y[i])
    want = torch.autograd.grad(total / b.num_tasks, theta + lrs + bns)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("execution", ["vmap", "loop"])
def test_adapt_continues_and_goes_past_the_trained_steps_like_a_loop(execution: str) -> None:
    torch.manual_seed(5)
    n = 2
    model = ConvBN()
    b = image_batch(seed=6)
    algo = MAMLPlusPlus(model, F.cross_entropy, 0.2, n, execution=execution)
    perturb(algo, 3)
    params = dict(model.named_parameters())
    lrs = [algo.lrs[k.replace(".", "-")].detach() for k in INNER]
    bns = [algo.step_bn[k.replace(".", "-")].detach() for k in NORM]

    def by_hand(steps: int) -> torch.Tensor:
        out = []
        for i in range(b.num_tasks):
            p = [params[k].detach().clone().requires_grad_(True) for k in INNER]
            for k in range(steps):  # past the trained steps: the last step's rates and BatchNorm
                j = min(k, n - 1)
                loss = F.cross_entropy(convbn_forward(p, [t[j] for t in bns], b.support_x[i]), b.support_y[i])
                g = torch.autograd.grad(loss, p)
                p = [(q - a[j] * gq).detach().requires_grad_(True) for q, a, gq in zip(p, lrs, g, strict=True)]
            last = min(max(steps - 1, 0), n - 1)  # predict: the BatchNorm of the last step taken
            out.append(convbn_forward(p, [t[last] for t in bns], b.query_x[i]).detach())
        return torch.stack(out)

    state, done = None, 0
    for steps in [0, 1, 2, 4]:
        once = algo.adapt(b.support_x, b.support_y, steps=steps)
        state = algo.adapt(b.support_x, b.support_y, steps=steps - done, start=state)
        done = steps
        assert isinstance(state, AdaptedParams) and state.steps == once.steps == steps
        want = by_hand(steps)
        torch.testing.assert_close(algo.predict(once, b.query_x), want, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(algo.predict(state, b.query_x), want, rtol=1e-9, atol=1e-11)
    with pytest.raises(MamlabError, match="start must be what MAMLPlusPlus.adapt returned"):
        algo.adapt(b.support_x, b.support_y, steps=1, start=dict(state))
    with pytest.raises(MamlabError, match="adapted must be what MAMLPlusPlus.adapt returned"):
        algo.predict(dict(state), b.query_x)


def test_per_task_scores_in_pieces_equal_one_adapt_call() -> None:
    torch.manual_seed(0)
    config = resolve_config("sinusoid", None, {"hidden": [8], "inner_steps": 2}, algorithm="mamlpp")
    algo = build_algorithm("mamlpp", MLP(1, 1, hidden=(8,)), F.mse_loss, config.algorithm_options)
    perturb(algo, 4)
    b = Sinusoid().sample(4, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    losses, _ = per_task_scores(algo, config, b, [0, 1, 2, 3, 5])
    for s, got in losses.items():
        pred = algo.predict(algo.adapt(b.support_x, b.support_y, steps=s), b.query_x)
        want = ((pred - b.query_y) ** 2).mean(dim=(1, 2))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(losses[3], losses[5])


def test_running_statistics_are_kept_per_step() -> None:
    torch.manual_seed(1)
    model = ConvBN(track=True)
    b = image_batch(seed=1)
    algo = MAMLPlusPlus(model, F.cross_entropy, 0.2, 2)
    assert algo.resolved_execution() == "loop"
    own = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    stats = dict(algo.step_bn_stats.named_buffers())
    assert set(stats) == {f"{m}-{s}" for m in ("b1", "b2") for s in ("running_mean", "running_var",
                                                                     "num_batches_tracked")}
    before = {k: v.clone() for k, v in stats.items()}
    algo.meta_loss(b).backward()
    for k, v in own.items():  # the model's running statistics are not touched...
        assert torch.equal(model.state_dict()[k], v)
    for k in ("b1-running_mean", "b2-running_var"):  # ... each step's are, each differently
        row0, row1 = stats[k]
        assert not torch.equal(row0, before[k][0]) and not torch.equal(row1, before[k][1])
        assert not torch.equal(row0, row1)
    # in eval mode, predict normalizes with the last step's running statistics and BatchNorm
    model.eval()
    perturb(algo, 5)
    with torch.no_grad():
        stats["b1-running_mean"].normal_()
        stats["b2-running_var"].uniform_(0.5, 2.0)
    adapted = algo.adapt(b.support_x, b.support_y, steps=1)
    state = {**{k: v[0] for k, v in adapted.items()},
             **{k: algo.step_bn[k.replace(".", "-")][0].detach() for k in NORM},
             **{k: stats[k.replace(".", "-")][0] for k in ("b1.running_mean", "b1.running_var",
                                                            "b2.running_mean", "b2.running_var")}}
    want = torch.func.functional_call(model, state, (b.query_x[0],))
    torch.testing.assert_close(algo.predict(adapted, b.query_x)[0], want, rtol=1e-10, atol=1e-12)


def test_switches_off_give_maml() -> None:
    from mamlab import MAML

    torch.manual_seed(2)
    model = ConvBN()
    b = image_batch(seed=2)
    plain = MAMLPlusPlus(model, F.cross_entropy, 0.1, 2, lslr=False, msl=False, per_step_bn=False,
                         first_order_epochs=0)
    assert not list(plain.lrs) and not list(plain.step_bn) and plain.inner_params is None
    g1 = torch.autograd.grad(plain.query_losses(b).mean(), list(model.parameters()))
    g2 = torch.autograd.grad(MAML(model, F.cross_entropy, 0.1, 2).query_losses(b).mean(), list(model.parameters()))
    for x, y in zip(g1, g2, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    plain.adapt(b.support_x, b.support_y, start=dict(plain.adapt(b.support_x, b.support_y)))  # steps not needed


def test_options_are_checked() -> None:
    model = MLP(1, 1, hidden=(4,))
    with pytest.raises(MamlabError, match="first_order_epochs must be an integer >= 0, got -1"):
        build_algorithm("mamlpp", model, F.mse_loss, {"first_order_epochs": -1})
    with pytest.raises(MamlabError, match="msl_epochs must be an integer > 0, got 0"):
        build_algorithm("mamlpp", model, F.mse_loss, {"msl_epochs": 0})
    algo = build_algorithm("mamlpp", model, F.mse_loss, {"inner_steps": 3})
    assert algo.options() == {"inner_lr": 0.01, "inner_steps": 3, "lslr": True, "msl": True, "msl_epochs": 10,
                              "iterations_per_epoch": 500, "per_step_bn": True, "first_order_epochs": 50}


# ---------------------------------------------------------------- end to end
SMALL = {"iterations": 20, "meta_batch": 4, "shots": 5, "queries": 5, "hidden": [8], "val_every": 10,
         "checkpoint_every": 10, "val_tasks": 5, "inner_lr": 0.02, "inner_steps": 2, "msl_epochs": 3,
         "iterations_per_epoch": 2, "first_order_epochs": 4}


def test_trained_saved_resumed_and_evaluated(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)  # runs are float32
    torch.set_num_threads(1)
    config = resolve_config("sinusoid", None, SMALL, algorithm="mamlpp")
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None)
    algo = run.algorithm
    assert isinstance(algo, MAMLPlusPlus) and algo.epoch == 9 and not algo.first_order
    lrs = {k: p.detach().clone() for k, p in algo.lrs.items()}
    assert all(not torch.allclose(v, torch.full_like(v, 0.02)) for v in lrs.values())  # LSLR learned
    loaded = load_run(tmp_path / "run")
    for k, v in lrs.items():
        assert torch.equal(loaded.algorithm.lrs[k], v)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "iter_000010")
    assert set(ckpt.extra["algorithm_state"]) == {f"lrs.{k}" for k in lrs}
    half = resolve_config("sinusoid", None, {**SMALL, "iterations": 10}, algorithm="mamlpp")
    train(half, tmp_path / "half", progress=False, echo=lambda s: None)
    resumed = train(None, tmp_path / "half", resume=True, iterations=20, progress=False, echo=lambda s: None)
    for a, c in zip(resumed.algorithm.state_dict().values(), algo.state_dict().values(), strict=True):
        assert torch.equal(a, c)
    learned = evaluate_model(loaded.algorithm, loaded.config, steps=(1, 2, 3), num_tasks=10)
    fixed = evaluate_model(loaded.algorithm, loaded.config, steps=(1, 2, 3), num_tasks=10, lr=0.02)
    assert not torch.equal(learned.losses[2], fixed.losses[2])
    with pytest.raises(MamlabError, match="multi-step loss lasts msl_epochs 10 x iterations_per_epoch 500"):
        train(resolve_config("sinusoid", None, {**SMALL, "msl_epochs": 10, "iterations_per_epoch": 500},
                             algorithm="mamlpp"), tmp_path / "long", progress=False, echo=lambda s: None)
