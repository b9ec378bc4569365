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


# ---------------------------------------------------------------------- task hardness (Collins et al. 2020)
def _old_linear_regression_sample(num_tasks, dim, mean, std, noise, shots, queries, g):
    """The family's sampling before the hardness options existed, written out."""
    w = mean + std * torch.randn(num_tasks, dim, generator=g)
    x = torch.randn(num_tasks, shots + queries, dim, generator=g)
    y = torch.einsum("tnd,td->tn", x, w).unsqueeze(-1)
    if noise > 0:
        y = y + noise * torch.randn(y.shape, generator=g)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_default_hardness_draws_bitwise_the_tasks_drawn_before(noise) -> None:
    from mamlab.config import resolve_config
    from mamlab.experiments import build_family

    old = _old_linear_regression_sample(7, 4, 0.5, 1.5, noise, 5, 6, torch.Generator().manual_seed(3))
    new = LinearRegression(4, 0.5, 1.5, noise).sample(7, 5, 6, torch.Generator().manual_seed(3))
    cfg = resolve_config("linear-regression", None, {"dim": 4, "weight_mean": 0.5, "weight_std": 1.5,
                                                     "noise": noise})
    spec = build_family(cfg).sample(7, 5, 6, torch.Generator().manual_seed(3))
    for a, b, c in zip(old, (new.support_x, new.support_y, new.query_x, new.query_y),
                       (spec.support_x, spec.support_y, spec.query_x, spec.query_y), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    # classification (no hardness options) draws what it drew before too
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 2, generator=g)
    x = torch.randn(3, 9, 2, generator=g)
    cls = LinearClassification(dim=2).sample(3, 4, 5, torch.Generator().manual_seed(4))
    assert torch.equal(cls.support_x, x[:, :4]) and torch.equal(cls.query_y[..., 0],
                                                                 (torch.einsum("tnd,td->tn", x, w) > 0).float()[:, 4:])


def test_hard_tasks_have_small_input_scale_and_offset_weights() -> None:
    fam = LinearRegression(dim=3, weight_mean=1.0, weight_std=0.5, hard_fraction=0.3, hard_scale=0.04,
                           hard_offset=2.0)
    tasks = fam.sample_tasks(20000, torch.Generator().manual_seed(0))
    hard = tasks["input_scale"] < 1
    assert set(tasks["input_scale"].unique().tolist()) == pytest.approx([0.2, 1.0])
    assert abs(hard.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20000)
    w = tasks["weight"]
    for group, centre in ((hard, 3.0), (~hard, 1.0)):
        n = int(group.sum())
        assert torch.all((w[group].mean(0) - centre).abs() < 4 * 0.5 / math.sqrt(n))
        assert torch.all((w[group].std(0) - 0.5).abs() < 0.03)
    b = fam.batch({k: v[:2000] for k, v in tasks.items()}, 20, 5, torch.Generator().manual_seed(1))
    h = hard[:2000]
    assert abs(b.support_x[h].std().item() - 0.2) < 0.005 and abs(b.support_x[~h].std().item() - 1.0) < 0.02
    torch.testing.assert_close(b.query_y[..., 0], torch.einsum("tnd,td->tn", b.query_x, w[:2000]))
    plain = fam.batch({"weight": w[:3]}, 4, 4, torch.Generator().manual_seed(1))  # no scale given: easy inputs
    assert plain.support_x.shape == (3, 4, 3)


@pytest.mark.parametrize("call, match", [
    (lambda: LinearRegression(hard_fraction=1.5), "hard_fraction must be a number in \\[0, 1\\], got 1.5"),
    (lambda: LinearRegression(hard_scale=0.0), "hard_scale must be a number > 0, got 0.0"),
    (lambda: LinearRegression(hard_offset=float("nan")), "hard_offset must be a finite number, got nan"),
])
def test_bad_hardness_arguments(call, match: str) -> None:
    with pytest.raises(MamlabError, match=match):
        call()


def test_hardness_options_are_validated_in_a_config() -> None:
    from mamlab.config import resolve_config

    with pytest.raises(MamlabError, match="hard_fraction must be in \\[0, 1\\], got 2.0"):
        resolve_config("linear-regression", None, {"hard_fraction": 2.0})
    with pytest.raises(MamlabError, match="hard_scale must be a number > 0"):
        resolve_config("linear-regression", None, {"hard_scale": -1.0})
