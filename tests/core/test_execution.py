"""The execution engine: which path runs which model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mamlab import MAML, MamlabError
from mamlab.core.execution import default_execution, vmap_unsafe
from mamlab.tasks import Sinusoid


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 1] -> [N, 1], each x a length-1 sequence
        out, _ = self.lstm(x.unsqueeze(1))
        return self.head(out[:, -1])


@pytest.mark.parametrize("make, why", [(WithDropout, "dropout in training mode"), (Recurrent, "nn.LSTM")])
def test_auto_runs_models_vmap_cannot_on_the_loop(make, why) -> None:
    model = make()
    assert vmap_unsafe(model) == why and default_execution(model, "cuda") == "loop"
    batch = Sinusoid().sample(3, 4, 4, torch.Generator().manual_seed(0))
    MAML(model, F.mse_loss, 0.01).meta_loss(batch).backward()  # auto: trains, no torch error
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(MamlabError, match=f"execution 'vmap' cannot run this model \\({why}\\); allowed"):
        MAML(model, F.mse_loss, 0.01, execution="vmap")


def test_dropout_in_eval_mode_is_fine_for_vmap() -> None:
    model = WithDropout().eval()
    assert vmap_unsafe(model) is None and default_execution(model, "cuda") == "vmap"


def test_peak_saved_bytes_sees_a_graph_grow_and_go() -> None:
    from mamlab.core.memory import peak_saved_bytes

    x = torch.randn(1000, requires_grad=True)

    def two_saved() -> None:
        y = (x * x).sin()  # saves x (twice, for the product) and x*x
        y.sum().backward()

    assert peak_saved_bytes(two_saved) >= 2 * 1000 * 4
    assert peak_saved_bytes(lambda: None) == 0


def test_tune_times_only_the_paths_the_model_can_run() -> None:
    model = WithDropout()
    batch = Sinusoid().sample(3, 4, 4, torch.Generator().manual_seed(0))
    times = MAML(model, F.mse_loss, 0.01).tune(batch, repeats=1)
    assert set(times) == {"loop"}
