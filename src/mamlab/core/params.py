"""Parameters as dicts of tensors, a functional forward pass, and one inner SGD step.

These pure functions are the whole of MAML's inner loop; ``mamlab.algorithms.maml`` only
composes them. A parameter dict maps ``model.named_parameters()`` names to tensors, optionally
with a leading task dimension ``[T, ...]`` ("batched" parameters).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mamlab.errors import MamlabError

__all__ = [
    "Params",
    "parameters_of",
    "buffers_of",
    "forward",
    "sgd_step",
    "expand_to_tasks",
    "task_slice",
    "stack_params",
    "check_forward_signature",
    "check_output",
]

Params = dict[str, torch.Tensor]


def parameters_of(model: nn.Module, names: Iterable[str] | None = None) -> Params:
    """The model's trainable parameters (or those named in ``names``) as an ordered dict."""
    all_params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if names is None:
        return all_params
    return {k: all_params[k] for k in names}


def buffers_of(model: nn.Module) -> Params:
    """The model's buffers (BatchNorm running statistics and the like) as a dict."""
    return dict(model.named_buffers())


def forward(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
            buffers: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """f_params(x): run ``model`` with ``params`` substituted for (some of) its parameters."""
    state: dict[str, torch.Tensor] = dict(buffers) if buffers is not None else {}
    state.update(params)
    return functional_call(model, state, (x,), strict=False)


def sgd_step(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
             lr: float) -> Params:
    """θ' = θ − α ∇θ L: one plain gradient step on every parameter in ``params``."""
    if not isinstance(grads, Mapping):
        grads = dict(zip(params.keys(), grads, strict=True))
    return {k: p - lr * grads[k] for k, p in params.items()}


def expand_to_tasks(params: Mapping[str, torch.Tensor], num_tasks: int) -> Params:
    """Give every parameter a leading task dimension of size ``num_tasks`` (a view, no copy)."""
    return {k: p.unsqueeze(0).expand(num_tasks, *p.shape) for k, p in params.items()}


def task_slice(params: Mapping[str, torch.Tensor], i: int) -> Params:
    """Task ``i``'s parameters from a batched parameter dict."""
    return {k: p[i] for k, p in params.items()}


def stack_params(per_task: list[Mapping[str, torch.Tensor]]) -> Params:
    """Stack a list of per-task parameter dicts into one batched dict ``[T, ...]``."""
    return {k: torch.stack([p[k] for p in per_task]) for k in per_task[0]}


_WRAP = ("wrap it in an nn.Module whose forward(x) returns one tensor, the prediction the loss takes "
         "(e.g. model(x)[0] or model(x).logits)")


def check_forward_signature(model: nn.Module) -> None:
    """One-line error unless ``model.forward`` can be called with the input alone, as mamlab calls it.

    Args:
        model: the network; ``forward(x)`` must need no other argument (others need defaults).

    Raises:
        MamlabError: naming the model class, the arguments ``forward`` requires, and the fix.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward Python cannot inspect: leave it to the first call
        return
    empty, kind = inspect.Parameter.empty, inspect.Parameter
    positional = [q for q in params if q.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
    required = [q.name for q in positional if q.default is empty]
    keywords = [q.name for q in params if q.kind == kind.KEYWORD_ONLY and q.default is empty]
    takes_input = bool(positional) or any(q.kind == kind.VAR_POSITIONAL for q in params)
    required += keywords
    if len(required) > 1 or keywords or not takes_input:
        raise MamlabError(
            f"{type(model).__name__}.forward requires ({', '.join(required) or 'no input'}), but mamlab "
            "calls forward(x) with the input alone: give the other arguments defaults, or wrap the model in "
            "an nn.Module whose forward(x) supplies them"
        )


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"Tensor{list(out.shape)}"
    if isinstance(out, (tuple, list)):
        inner = ", ".join(_describe(o) for o in out[:3]) + (", ..." if len(out) > 3 else "")
        return f"a {type(out).__name__} of {len(out)} ({inner})"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {', '.join(map(str, list(out)[:4]))}"
    return f"a {type(out).__name__}"


def check_output(model: nn.Module, out: Any) -> None:
    """One-line error unless ``out``, what ``model`` returned, is one tensor (the prediction).

    A tuple, a list, a dict or a Hugging Face-style output object is refused rather than guessed
    at: which of its parts is the prediction is the model's business (``(logits, features)`` and
    ``(features, logits)`` are both common), and the fix is one line in a wrapper.

    Raises:
        MamlabError: naming the model class, what it returned and the fix.
    """
    if not isinstance(out, torch.Tensor):
        raise MamlabError(f"{type(model).__name__}.forward returned {_describe(out)}; mamlab needs one "
                          f"tensor: {_WRAP}")
