"""The registry and the contract every registered algorithm keeps."""

import pytest
import torch
import torch.nn.functional as F

from mamlab import MAML, MamlabError, MetaAlgorithm, build_algorithm
from mamlab.algorithms import ALGORITHMS, algorithm_spec
from mamlab.models import MLP
from mamlab.tasks import Sinusoid

pytestmark = pytest.mark.usefixtures("float64")


def batch(n: int = 4):
    return Sinusoid().sample(n, 5, 5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)


def test_the_issue_names_are_registered() -> None:
    assert {"maml", "fomaml", "anil", "pretrain"} <= set(ALGORITHMS)
    for name, spec in ALGORITHMS.items():
        assert spec.name == name and spec.summary and len({o.name for o in spec.options}) == len(spec.options)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
def test_every_algorithm_keeps_the_contract(name: str, execution: str) -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8,))
    algo = build_algorithm(name, model, F.mse_loss, {"inner_steps": 2}, execution=execution)
    assert isinstance(algo, MetaAlgorithm) and isinstance(algo, torch.nn.Module)
    assert algo.model is model
    # parameters(), state_dict() see the model (and any meta-state)
    assert {id(p) for p in model.parameters()} <= {id(p) for p in algo.parameters()}
    assert all(k.startswith("model.") for k in model.state_dict() for k in [f"model.{k}"])
    assert {f"model.{k}" for k in model.state_dict()} <= set(algo.state_dict())
    b = batch()
    loss = algo.meta_loss(b)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in algo.parameters())
    adapted = algo.adapt(b.support_x, b.support_y)
    assert all(p.shape[0] == b.num_tasks for p in adapted.values())
    pred = algo.predict(adapted, b.query_x)
    assert pred.shape == b.query_y.shape
    # .to() moves everything the algorithm owns
    algo32 = algo.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in algo32.parameters())


def test_fomaml_is_first_order_maml() -> None:
    torch.manual_seed(1)
    model = MLP(1, 1, hidden=(8, 8))
    b = batch()
    fo = build_algorithm("fomaml", model, F.mse_loss, {"inner_lr": 0.05, "inner_steps": 2})
    ref = MAML(model, F.mse_loss, 0.05, 2, first_order=True)
    g1 = torch.autograd.grad(fo.query_losses(b).mean(), list(model.parameters()))
    g2 = torch.autograd.grad(ref.query_losses(b).mean(), list(model.parameters()))
    for a, c in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_options_are_checked_strictly() -> None:
    model = MLP(1, 1, hidden=(4,))
    with pytest.raises(MamlabError, match="unknown algorithm 'reptyle'; allowed: maml"):
        build_algorithm("reptyle", model, F.mse_loss)
    with pytest.raises(MamlabError, match="option 'first_order' does not apply to algorithm 'pretrain'"):
        build_algorithm("pretrain", model, F.mse_loss, {"first_order": True})
    with pytest.raises(MamlabError, match="first_order must be true or false, got 'yes'"):
        build_algorithm("maml", model, F.mse_loss, {"first_order": "yes"})
    with pytest.raises(MamlabError, match="inner_lr must be a number > 0, got -1"):
        build_algorithm("maml", model, F.mse_loss, {"inner_lr": -1})
    assert algorithm_spec("anil").name == "anil"
