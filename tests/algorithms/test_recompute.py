"""recompute=True: second-order MAML whose inner steps are recomputed in backward, against a hand loop.

The meta-gradient must equal the stored-graph path and an independent per-task loop (float64, relative
1e-10) on every execution path and with BatchNorm, and its saved-graph memory must stay flat in the
number of inner steps (measured by ``saved_tensors_hooks``, as in ``test_imaml.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mamlab import MAML, MamlabError, TaskBatch, build_algorithm
from mamlab.config import resolve_config
from mamlab.core.memory import peak_saved_bytes
from mamlab.evaluate import evaluate_model
from mamlab.models import MLP
from mamlab.tasks import Sinusoid
from mamlab.train import load_run, train

pytestmark = pytest.mark.usefixtures("float64")


def meta_grad(algo: MAML, batch: TaskBatch) -> torch.Tensor:
    algo.model.zero_grad()
    algo.meta_loss(batch).backward()
    return torch.cat([p.grad.flatten() for p in algo.model.parameters()])


def hand_maml_grad(model: nn.Module, batch: TaskBatch, lr: float, steps: int, loss_fn=F.mse_loss,
                   inner: list[str] | None = None) -> torch.Tensor:
    """Second-order MAML by hand: one task at a time, autograd.grad with create_graph through every step."""
    names = [n for n, _ in model.named_parameters()]
    inner = names if inner is None else inner
    theta = list(model.parameters())
    total = [torch.zeros_like(t) for t in theta]
    for i in range(batch.num_tasks):
        params = dict(zip(names, theta, strict=True))
        for _ in range(steps):
            loss = loss_fn(functional_call(model, params, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, [params[k] for k in inner], create_graph=True)
            params = {**params, **{k: params[k] - lr * g for k, g in zip(inner, grads, strict=True)}}
        query = loss_fn(functional_call(model, params, (batch.query_x[i],)), batch.query_y[i])
        for acc, g in zip(total, torch.autograd.grad(query, theta), strict=True):
            acc += g / batch.num_tasks
    return torch.cat([t.flatten() for t in total])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def sinusoid(tasks: int = 4) -> TaskBatch:
    return Sinusoid().sample(tasks, 10, 10, torch.Generator().manual_seed(0)).to(dtype=torch.float64)


# ---------------------------------------------------------------- 1. the meta-gradient is unchanged
@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize(("execution", "chunk"), [("batched", None), ("vmap", 2), ("loop", None)])
def test_mlp_meta_gradient_equals_plain_path_and_hand_loop(steps: int, execution: str, chunk: int | None) -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(40, 40))
    batch = sinusoid()
    expected = hand_maml_grad(model, batch, 0.01, steps)
    plain = meta_grad(MAML(model, F.mse_loss, 0.01, steps, execution=execution, task_chunk=chunk), batch)
    recomputed = meta_grad(MAML(model, F.mse_loss, 0.01, steps, execution=execution, task_chunk=chunk,
                                recompute=True), batch)
    assert rel(plain, expected) <= 1e-10
    assert rel(recomputed, plain) <= 1e-10
    # the second-order terms are there: first order is measurably different
    first = meta_grad(MAML(model, F.mse_loss, 0.01, steps, first_order=True, execution=execution), batch)
    assert rel(first, expected) > 1e-6


def conv_bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                         nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def image_batch(tasks: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    return TaskBatch(torch.randn(tasks, 6, 1, 8, 8, generator=g), torch.randint(0, 3, (tasks, 6), generator=g),
                     torch.randn(tasks, 6, 1, 8, 8, generator=g), torch.randint(0, 3, (tasks, 6), generator=g))


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_conv_batchnorm_meta_gradient_equals_plain_path_and_hand_loop(steps: int) -> None:
    torch.manual_seed(0)
    model = conv_bn_net()
    batch = image_batch()
    expected = hand_maml_grad(model, batch, 0.1, steps, F.cross_entropy)
    plain = meta_grad(MAML(model, F.cross_entropy, 0.1, steps, execution="loop"), batch)
    recomputed = meta_grad(MAML(model, F.cross_entropy, 0.1, steps, execution="loop", recompute=True), batch)
    assert rel(plain, expected) <= 1e-10
    assert rel(recomputed, plain) <= 1e-10


def test_anil_through_the_registry() -> None:
    """ANIL's head-only inner loop: the body's gradient comes back through the recomputed steps too."""
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(40, 40))
    batch = sinusoid()
    algo = build_algorithm("anil", model, F.mse_loss, {"inner_lr": 0.01, "inner_steps": 7, "recompute": True},
                           execution="loop")
    assert algo.recompute and algo.options()["recompute"] is True
    head = list(algo.inner_params)
    expected = hand_maml_grad(model, batch, 0.01, 7, inner=head)
    assert rel(meta_grad(algo, batch), expected) <= 1e-10


def test_dropout_recomputes_the_same_masks() -> None:
    """The random state is restored for the recomputation: dropout draws the masks of the forward pass."""
    model = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    batch = sinusoid(2)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        nn.init.normal_(model[0].weight)  # same θ each time, then the same random stream
        torch.manual_seed(5)
        grads.append(meta_grad(MAML(model, F.mse_loss, 0.01, 6, execution="loop", recompute=recompute), batch))
        after = torch.rand(())  # the stream continues where the plain path leaves it
        grads.append(after)
    assert rel(grads[2], grads[0]) <= 1e-10
    assert grads[1] == grads[3]


def test_batchnorm_with_running_statistics_is_refused() -> None:
    model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    algo = MAML(model, F.mse_loss, 0.01, 3, execution="loop", recompute=True)
    with pytest.raises(MamlabError, match="running statistics"):
        algo.meta_loss(sinusoid(2))


# ---------------------------------------------------------------- 2. memory


def peak_saved(steps: int, execution: str, recompute: bool) -> int:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(40, 40))
    algo = MAML(model, F.mse_loss, 0.01, steps, execution=execution, recompute=recompute)
    batch = sinusoid()
    return peak_saved_bytes(lambda: algo.meta_loss(batch).backward())


@pytest.mark.parametrize("execution", ["batched", "loop"])
def test_peak_graph_memory_of_20_steps_is_at_most_3x_one_step(execution: str) -> None:
    one, twenty = peak_saved(1, execution, True), peak_saved(20, execution, True)
    assert 0 < twenty <= 3 * one
    # without recompute the graph of every step is kept: ~14x
    assert peak_saved(20, execution, False) > 10 * peak_saved(1, execution, False)


# ---------------------------------------------------------------- 3. end to end
SMALL = {"iterations": 20, "meta_batch": 4, "shots": 5, "queries": 5, "hidden": [8], "val_every": 10,
         "checkpoint_every": 10, "val_tasks": 5, "inner_lr": 0.02, "inner_steps": 4, "recompute": True}


def test_train_with_recompute_equals_train_without(tmp_path: Path) -> None:
    runs = {}
    for recompute in (True, False):
        config = resolve_config("sinusoid", None, {**SMALL, "recompute": recompute}, algorithm="maml")
        runs[recompute] = train(config, tmp_path / str(recompute), progress=False, echo=lambda s: None)
    for a, b in zip(runs[True].algorithm.parameters(), runs[False].algorithm.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    loaded = load_run(tmp_path / "True")
    assert loaded.algorithm.recompute and loaded.algorithm.options()["recompute"] is True
    result = evaluate_model(loaded.algorithm, loaded.config, steps=(0, 4), num_tasks=10)
    assert all(torch.isfinite(result.losses[s]).all() for s in (0, 4))
