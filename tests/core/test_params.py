import torch
from torch import nn

from mamlab.core.params import (
    buffers_of,
    expand_to_tasks,
    forward,
    parameters_of,
    sgd_step,
    stack_params,
    task_slice,
)


def test_forward_substitutes_parameters_without_touching_the_model() -> None:
    model = nn.Linear(3, 2)
    params = {k: torch.zeros_like(p) for k, p in parameters_of(model).items()}
    params["bias"] = torch.ones(2)
    x = torch.randn(4, 3)
    torch.testing.assert_close(forward(model, params, x), torch.ones(4, 2))
    assert model.bias.abs().sum() > 0 and not torch.equal(model(x), torch.ones(4, 2))


def test_sgd_step_is_the_update_rule() -> None:
    params = {"w": torch.tensor([1.0, 2.0])}
    grads = {"w": torch.tensor([10.0, -10.0])}
    torch.testing.assert_close(sgd_step(params, grads, 0.1)["w"], torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(sgd_step(params, [grads["w"]], 0.1)["w"], torch.tensor([0.0, 3.0]))


def test_expand_slice_stack_round_trip() -> None:
    params = {"w": torch.randn(2, 3), "b": torch.randn(2)}
    batched = expand_to_tasks(params, 4)
    assert batched["w"].shape == (4, 2, 3) and batched["w"].data_ptr() == params["w"].data_ptr()
    per_task = [task_slice(batched, i) for i in range(4)]
    restacked = stack_params(per_task)
    assert all(torch.equal(restacked[k], batched[k]) for k in params)


def test_parameters_and_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)
    assert list(parameters_of(model)) == ["0.weight", "1.weight", "1.bias"]
    assert list(parameters_of(model, ["1.bias"])) == ["1.bias"]
    assert set(buffers_of(model)) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


def test_a_task_batch_needs_a_task() -> None:
    import pytest
    import torch

    from mamlab import MamlabError, TaskBatch

    with pytest.raises(MamlabError, match="TaskBatch needs at least one task, got 0"):
        TaskBatch(torch.zeros(0, 3, 1), torch.zeros(0, 3, 1), torch.zeros(0, 2, 1), torch.zeros(0, 2, 1))
