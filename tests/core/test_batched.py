import torch

from mamlab.core.batched import batched_forward, plan_for
from mamlab.models import Conv4


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
