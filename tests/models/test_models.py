import pytest
import torch

from mamlab import MamlabError
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
