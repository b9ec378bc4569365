"""Any model means any model: outputs that are not one tensor, forwards that need more than the input,
and second-order meta-gradients through kernels (attention) whose backward has no derivative."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mamlab import MAML, MamlabError, TaskBatch


def _batch(dtype: torch.dtype = torch.float32, tasks: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(*(torch.randn(tasks, 5, 1, generator=g, dtype=dtype) for _ in range(4)))


class Pair(nn.Module):
    """Returns (prediction, features), as many vision backbones do."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(1, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return self.head(h), h


class Keyed(Pair):
    """Returns a dict, as Hugging Face-style models do."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        pred, h = super().forward(x)
        return {"logits": pred, "hidden_states": h}


class FirstOfPair(nn.Module):
    """The one-line fix the error message names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


@pytest.mark.parametrize("execution", ["vmap", "loop"])
@pytest.mark.parametrize("model, shown", [(Pair, "a tuple of 2 (Tensor["), (Keyed, "a dict with keys logits, "
                                                                                   "hidden_states")])
def test_a_model_that_returns_more_than_one_tensor_is_a_one_line_error(model, shown, execution) -> None:
    maml = MAML(model(), F.mse_loss, inner_lr=0.1, execution=execution)
    for call in (lambda: maml.meta_loss(_batch()), lambda: maml.adapt(_batch().support_x, _batch().support_y)):
        with pytest.raises(MamlabError) as e:
            call()
        text = str(e.value)
        assert "\n" not in text and text.startswith(f"{model.__name__}.forward returned {shown}")
        assert "wrap it in an nn.Module whose forward(x) returns one tensor" in text


def test_the_wrapped_model_trains_as_the_plain_one() -> None:
    torch.manual_seed(0)
    pair = Pair()
    wrapped = MAML(FirstOfPair(pair), F.mse_loss, inner_lr=0.1)
    wrapped.meta_loss(_batch()).backward()
    plain = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    plain.load_state_dict({"0.weight": pair.body.weight, "0.bias": pair.body.bias,
                           "2.weight": pair.head.weight, "2.bias": pair.head.bias})
    reference = MAML(plain, F.mse_loss, inner_lr=0.1)
    reference.meta_loss(_batch()).backward()
    torch.testing.assert_close(pair.head.weight.grad, plain[2].weight.grad)
    torch.testing.assert_close(pair.body.weight.grad, plain[0].weight.grad)


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * mask


class KeywordOnly(Masked):
    def forward(self, x: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.lin(x) * mask


class Defaulted(Masked):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.lin(x)


@pytest.mark.parametrize("model", [Masked, KeywordOnly])
def test_a_forward_that_needs_more_than_the_input_is_refused_at_construction(model) -> None:
    with pytest.raises(MamlabError) as e:
        MAML(model(), F.mse_loss, inner_lr=0.1)
    assert str(e.value).startswith(f"{model.__name__}.forward requires (x, mask), but mamlab calls forward(x) "
                                   "with the input alone: give the other arguments defaults, or wrap")


def test_a_forward_whose_other_arguments_have_defaults_is_fine() -> None:
    MAML(Defaulted(), F.mse_loss, inner_lr=0.1).meta_loss(_batch()).backward()


# ---------------------------------------------------------------------------------- second order


class Attention(nn.Module):
    """nn.MultiheadAttention over a task's examples: on the CPU its fused kernel has no double backward."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(1, width), nn.Linear(width, 1)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))[None]
        return self.out(self.attn(h, h, h, need_weights=False)[0][0])


@pytest.mark.parametrize("execution", ["vmap", "loop"])
def test_second_order_through_fused_attention_names_the_fix(execution) -> None:
    maml = MAML(Attention(), F.mse_loss, inner_lr=0.1, execution=execution)
    with pytest.raises(MamlabError) as e:
        maml.meta_loss(_batch()).backward()
    text = str(e.value)
    assert "\n" not in text and text.startswith("second-order meta-gradients differentiate Attention's backward")
    assert "first_order=True" in text and "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)" in text
    # both fixes work
    MAML(Attention(), F.mse_loss, inner_lr=0.1, first_order=True, execution=execution).meta_loss(
        _batch()).backward()
    with sdpa_kernel(SDPBackend.MATH):
        maml.meta_loss(_batch()).backward()


def _objective(model: nn.Module, theta: dict[str, torch.Tensor], batch: TaskBatch, lr: float) -> torch.Tensor:
    """MAML's objective with one inner step, task by task (a plain loop, no mamlab)."""
    losses = []
    for i in range(batch.num_tasks):
        theta_i = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        support = F.mse_loss(functional_call(model, theta_i, (batch.support_x[i],)), batch.support_y[i])
        grads = torch.autograd.grad(support, list(theta_i.values()))
        adapted = {k: theta[k] - lr * g for k, g in zip(theta_i, grads, strict=True)}
        losses.append(F.mse_loss(functional_call(model, adapted, (batch.query_x[i],)), batch.query_y[i]))
    return torch.stack(losses).mean()


def test_second_order_through_math_attention_matches_finite_differences() -> None:
    torch.manual_seed(0)
    model = Attention().double()
    batch, lr = _batch(torch.float64), 0.3
    maml = MAML(model, F.mse_loss, inner_lr=lr, execution="loop")
    with sdpa_kernel(SDPBackend.MATH):
        maml.meta_loss(batch).backward()
        theta = {k: p.detach().clone() for k, p in model.named_parameters()}
        g = torch.Generator().manual_seed(1)
        for _ in range(3):  # directional derivatives along random directions
            v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in theta.items()}
            eps = 1e-6
            plus = _objective(model, {k: theta[k] + eps * v[k] for k in theta}, batch, lr)
            minus = _objective(model, {k: theta[k] - eps * v[k] for k in theta}, batch, lr)
            numeric = float((plus - minus) / (2 * eps))
            analytic = sum(float((p.grad * v[k]).sum()) for k, p in model.named_parameters())
            assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    # the first-order gradient differs: the second-order terms are really there
    first = MAML(model, F.mse_loss, inner_lr=lr, first_order=True, execution="loop")
    second = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    first.meta_loss(batch).backward()
    assert not torch.allclose(model.attn.in_proj_weight.grad, second["attn.in_proj_weight"])


class _NotTwice(torch.autograd.Function):
    """x³ with a backward that cannot itself be differentiated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        return grad * 3 * x ** 2


class Cubed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NotTwice.apply(self.lin(x))


@pytest.mark.parametrize("recompute", [False, True])
def test_a_once_differentiable_backward_names_the_fix(recompute: bool) -> None:
    # with recompute the second-order inner gradients exist only in backward: checked there
    maml = MAML(Cubed(), F.mse_loss, inner_lr=0.01, execution="loop", recompute=recompute)
    with pytest.raises(MamlabError, match="^second-order meta-gradients differentiate Cubed's backward pass.*"
                                          "once_differentiable.*first_order=True"):
        maml.meta_loss(_batch()).backward()
    MAML(Cubed(), F.mse_loss, inner_lr=0.01, execution="loop", first_order=True).meta_loss(_batch()).backward()


def test_the_pretrain_baseline_refuses_a_tuple_output_too() -> None:
    from mamlab.algorithms import build_algorithm

    pretrain = build_algorithm("pretrain", Pair(), F.mse_loss, {"inner_lr": 0.1})
    with pytest.raises(MamlabError, match=r"^Pair.forward returned a tuple of 2 \(Tensor\["):
        pretrain.meta_loss(_batch())
