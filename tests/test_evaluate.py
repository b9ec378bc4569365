import pytest
import torch
import torch.nn.functional as F

from mamlab import MAML, MamlabError
from mamlab.config import resolve_config
from mamlab.evaluate import eval_episodes, evaluate_model, parse_steps, per_task_scores
from mamlab.models import MLP
from mamlab.tasks import Sinusoid


def test_evaluation_episodes_are_the_same_for_every_model_and_call() -> None:
    a = list(eval_episodes(Sinusoid(), 7, 5, 3, seed=4, chunk=3))
    b = list(eval_episodes(Sinusoid(), 7, 5, 3, seed=4, chunk=3))
    assert [x.num_tasks for x in a] == [3, 3, 1]
    assert all(torch.equal(x.support_x, y.support_x) and torch.equal(x.query_y, y.query_y) for x, y in zip(a, b, strict=True))
    whole = next(eval_episodes(Sinusoid(), 7, 5, 3, seed=4))
    assert torch.equal(torch.cat([x.support_x for x in a]), whole.support_x)  # chunking changes nothing
    c = next(eval_episodes(Sinusoid(), 7, 5, 3, seed=5))
    assert not torch.equal(whole.support_x, c.support_x)


def test_two_models_are_scored_on_the_same_tasks_pairwise() -> None:
    config = resolve_config("sinusoid", None, {"hidden": [8]})
    torch.manual_seed(0)
    m1, m2 = MLP(1, 1, (8,)), MLP(1, 1, (8,))
    r1 = evaluate_model(m1, config, shots=5, steps=[0, 2], num_tasks=30, seed=1)
    r2 = evaluate_model(m1, config, shots=5, steps=[0, 2], num_tasks=30, seed=1, chunk=7)
    r3 = evaluate_model(m2, config, shots=5, steps=[0, 2], num_tasks=30, seed=1)
    torch.testing.assert_close(r1.losses[2], r2.losses[2])
    assert r1.losses[0].shape == r3.losses[0].shape == (30,)
    row = r1.summary()[1]
    assert row["steps"] == 2 and row["loss_ci95"] > 0 and "loss_median" in row


def test_scores_after_k_steps_equal_adapting_k_steps_at_once() -> None:
    config = resolve_config("sinusoid", None, {"hidden": [8]})
    model = MLP(1, 1, (8,))
    batch = Sinusoid().sample(4, 5, 5, torch.Generator().manual_seed(0))
    maml = MAML(model, F.mse_loss, 0.01)
    losses, _ = per_task_scores(maml, config, batch, [1, 3], 0.02)
    params = maml.adapt(batch.support_x, batch.support_y, steps=3, lr=0.02)
    direct = torch.stack([F.mse_loss(p, y) for p, y in zip(maml.predict(params, batch.query_x), batch.query_y, strict=True)])
    torch.testing.assert_close(losses[3].float(), direct)


def test_parse_steps() -> None:
    assert parse_steps("10,0, 5,5") == [0, 5, 10]
    with pytest.raises(MamlabError, match="steps must be comma-separated integers >= 0, got '-1'"):
        parse_steps("-1")


def test_evaluation_survives_diverged_tasks(capsys) -> None:
    """A step size that blows some tasks up: the table still comes, with medians and the count."""
    import torch as _torch

    from mamlab.cli import _table
    from mamlab.evaluate import EvalResult

    losses = _torch.tensor([0.1, 0.2, float("inf"), 0.3, float("nan"), 0.4])
    r = EvalResult(5, 10, [1], 0.5, 6, 0, losses={1: losses})
    (row,) = r.summary()
    assert row["loss_diverged"] == 2 and row["loss"] == pytest.approx(0.25)
    assert row["loss_median"] == pytest.approx(0.3) and row["loss_median_high"] == float("inf")
    assert "diverged" in _table([row])
