import math

import pytest
import torch

from mamlab import MamlabError, TaskBatch
from mamlab.tasks import LinearClassification, LinearRegression, Sinusoid


def test_sinusoid_shapes_ranges_and_function() -> None:
    fam = Sinusoid()
    tasks = fam.sample_tasks(2000, torch.Generator().manual_seed(0))
    assert 0.1 <= tasks["amplitude"].min() and tasks["amplitude"].max() <= 5.0
    assert 0.0 <= tasks["phase"].min() and tasks["phase"].max() <= math.pi
    batch = fam.batch(tasks, 10, 7, torch.Generator().manual_seed(1))
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (2000, 10, 1) and batch.query_y.shape == (2000, 7, 1)
    assert batch.support_x.abs().max() <= 5.0
    expected = tasks["amplitude"].view(-1, 1, 1) * torch.sin(batch.support_x - tasks["phase"].view(-1, 1, 1))
    torch.testing.assert_close(batch.support_y, expected)


def test_sinusoid_custom_ranges_for_distribution_shift() -> None:
    fam = Sinusoid(amplitude=(5.0, 6.0), phase=(4.0, 4.5), x_range=(5.0, 7.0))
    tasks = fam.sample_tasks(500, torch.Generator().manual_seed(0))
    assert tasks["amplitude"].min() >= 5.0 and tasks["phase"].max() <= 4.5
    assert fam.inputs(3, 50, torch.Generator().manual_seed(0)).min() >= 5.0


@pytest.mark.parametrize("family", [Sinusoid(), LinearRegression(dim=3), LinearClassification(dim=3)])
def test_sampling_is_seeded_and_reproducible(family) -> None:
    a = family.sample(4, 5, 6, torch.Generator().manual_seed(7))
    b = family.sample(4, 5, 6, torch.Generator().manual_seed(7))
    c = family.sample(4, 5, 6, torch.Generator().manual_seed(8))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.support_x, c.support_x)


def test_linear_regression_targets_are_linear_in_inputs() -> None:
    fam = LinearRegression(dim=4, weight_mean=1.0, weight_std=0.5)
    tasks = fam.sample_tasks(3, torch.Generator().manual_seed(0))
    b = fam.batch(tasks, 6, 6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.support_y[..., 0], torch.einsum("tnd,td->tn", b.support_x, tasks["weight"]))


def test_linear_classification_labels() -> None:
    fam = LinearClassification(dim=2)
    tasks = fam.sample_tasks(3, torch.Generator().manual_seed(0))
    b = fam.batch(tasks, 50, 5, torch.Generator().manual_seed(0))
    assert set(b.support_y.unique().tolist()) <= {0.0, 1.0}
    logits = torch.einsum("tnd,td->tn", b.support_x, tasks["weight"])
    assert torch.equal(b.support_y[..., 0], (logits > 0).float())
    noisy = LinearClassification(dim=2, temperature=1.0).batch(tasks, 400, 5, torch.Generator().manual_seed(0))
    agree = (noisy.support_y[..., 0] == (torch.einsum("tnd,td->tn", noisy.support_x, tasks["weight"]) > 0)).float()
    assert 0.55 < agree.mean() < 0.99


@pytest.mark.parametrize("call, match", [
    (lambda: Sinusoid().sample(2, 0, 5), "shots must be an integer > 0, got 0"),
    (lambda: Sinusoid().sample(0, 5, 5), "num_tasks must be an integer > 0, got 0"),
    (lambda: Sinusoid(amplitude=(5.0, 1.0)), "amplitude must be a finite \\(low, high\\) pair"),
    (lambda: LinearRegression(dim=0), "dim must be an integer > 0, got 0"),
    (lambda: LinearRegression(noise=-1.0), "noise must be a number >= 0, got -1.0"),
])
def test_bad_task_arguments(call, match: str) -> None:
    with pytest.raises(MamlabError, match=match):
        call()
