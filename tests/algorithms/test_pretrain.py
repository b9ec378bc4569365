"""The pretrain baseline: the pooled supervised loss, fine-tuned by SGD exactly like MAML at test time."""

import torch
import torch.nn.functional as F

from mamlab import MAML, Pretrain
from mamlab.models import MLP
from mamlab.tasks import Sinusoid


def test_meta_loss_is_the_pooled_supervised_loss() -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8,))
    b = Sinusoid().sample(3, 4, 6, torch.Generator().manual_seed(1))
    pre = Pretrain(model, F.mse_loss, inner_lr=0.01)
    x = torch.cat([b.support_x, b.query_x], 1).reshape(-1, 1)
    y = torch.cat([b.support_y, b.query_y], 1).reshape(-1, 1)
    torch.testing.assert_close(pre.meta_loss(b), F.mse_loss(model(x), y))


def test_fine_tuning_is_sgd_like_maml() -> None:
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8,))
    b = Sinusoid().sample(3, 4, 6, torch.Generator().manual_seed(1))
    pre, maml = Pretrain(model, F.mse_loss, inner_lr=0.02, inner_steps=3), MAML(model, F.mse_loss, 0.02, 3)
    a, c = pre.adapt(b.support_x, b.support_y), maml.adapt(b.support_x, b.support_y)
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=0)
