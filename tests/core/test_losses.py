import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from mamlab.core.losses import per_task_loss


@pytest.mark.parametrize("loss_fn, pred_shape, make_target", [
    (F.mse_loss, (4, 6, 2), lambda g: torch.randn(4, 6, 2, generator=g, dtype=torch.float64)),
    (F.cross_entropy, (4, 6, 5), lambda g: torch.randint(0, 5, (4, 6), generator=g)),
    (F.binary_cross_entropy_with_logits, (4, 6, 1),
     lambda g: torch.randint(0, 2, (4, 6, 1), generator=g).double()),
    (F.l1_loss, (4, 6, 1), lambda g: torch.randn(4, 6, 1, generator=g, dtype=torch.float64)),
])
def test_per_task_loss_equals_loss_of_each_task(loss_fn, pred_shape, make_target) -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(*pred_shape, generator=g, dtype=torch.float64, requires_grad=True)
    target = make_target(g)
    got = per_task_loss(loss_fn)(pred, target)
    expected = torch.stack([loss_fn(pred[i], target[i]) for i in range(pred.shape[0])])
    torch.testing.assert_close(got, expected)
    ga, = torch.autograd.grad(got.sum(), pred)
    gb, = torch.autograd.grad(vmap(loss_fn)(pred, target).sum(), pred)
    torch.testing.assert_close(ga, gb)
