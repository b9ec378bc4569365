import pytest
import torch

from mamlab import MamlabError
from mamlab.batched import batched_forward, plan_for
from mamlab.models import MLP, Conv4


def test_mlp_shapes() -> None:
    assert MLP(1, 1, hidden=(40, 40))(torch.zeros(7, 1)).shape == (7, 1)
    assert len(list(MLP(3, 1, hidden=(), bias=False).parameters())) == 1


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_conv4_shapes_and_batch_statistics(downsample: str) -> None:
    model = Conv4(5, downsample=downsample)
    x = torch.randn(10, 1, 28, 28)
    assert model(x).shape == (10, 5)
    assert model(x[:, 0]).shape == (10, 5)
    # BatchNorm uses the batch's own statistics in train and eval mode alike
    out_train = model(x)
    model.eval()
    torch.testing.assert_close(model(x), out_train)
    assert not list(model.buffers())


def test_conv4_bad_arguments() -> None:
    with pytest.raises(MamlabError, match="downsample"):
        Conv4(5, downsample="avg")
    with pytest.raises(MamlabError, match="ways must be an integer > 0, got 0"):
        Conv4(0)


def test_batched_forward_equals_per_task_forward() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                                torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU()),
                                torch.nn.Linear(4, 2, bias=False))
    plan = plan_for(model)
    assert plan is not None
    params = {k: torch.randn(6, *p.shape) for k, p in model.named_parameters()}
    params["0.bias"] = model[0].bias  # a shared (unbatched) parameter
    x = torch.randn(6, 9, 3)
    out = batched_forward(plan, params, x)
    for i in range(6):
        p = {k: (v[i] if v.dim() > model.get_parameter(k).dim() else v) for k, v in params.items()}
        torch.testing.assert_close(out[i], torch.func.functional_call(model, p, (x[i],)))


def test_plan_refuses_other_models() -> None:
    assert plan_for(Conv4(5)) is None
    assert plan_for(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))) is None
    assert plan_for(torch.nn.Sequential(torch.nn.ReLU())) is None
