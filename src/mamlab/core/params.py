"""Parameters as dicts of tensors, a functional forward pass, and one inner SGD step.

These pure functions are the whole of MAML's inner loop; ``mamlab.algorithms.maml`` only
composes them. A parameter dict maps ``model.named_parameters()`` names to tensors, optionally
with a leading task dimension ``[T, ...]`` ("batched" parameters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "Params",
    "parameters_of",
    "buffers_of",
    "forward",
    "sgd_step",
    "expand_to_tasks",
    "task_slice",
    "stack_params",
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
