"""A fast batched forward for MLPs: every task's weights in one ``baddbmm`` per layer.

``torch.func.vmap`` over ``functional_call`` works for any model but pays a fixed dispatch and
re-parametrization cost per call that dominates small networks like the sinusoid MLP. For a
``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations this module computes
the same function directly on task-batched parameters ``[T, out, in]``, which
``benchmarks/speed.py`` measures at about twice the speed of vmap. Any other model returns
``None`` from ``plan_for`` and MAML falls back to vmap or the loop.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["ELEMENTWISE", "plan_for", "batched_forward"]

#: Modules that act on each element independently, so a task dimension passes straight through.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity,
)

Plan = list[tuple[str, nn.Module]]


def plan_for(model: nn.Module) -> Plan | None:
    """The layers of ``model`` as ``(parameter prefix, module)`` if it is a Linear/activation chain."""
    plan: Plan = []

    def visit(module: nn.Module, prefix: str) -> bool:
        if type(module) is nn.Sequential or (isinstance(module, nn.Sequential)
                                            and type(module).forward is nn.Sequential.forward):
            return all(visit(child, f"{prefix}{name}.") for name, child in module.named_children())
        if type(module) is nn.Linear:
            plan.append((prefix, module))
            return True
        if type(module) in ELEMENTWISE:
            plan.append((prefix, module))
            return True
        return False

    if not visit(model, "") or not any(isinstance(m, nn.Linear) for _, m in plan):
        return None
    if list(model.buffers()):
        return None
    return plan


def batched_forward(plan: Plan, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f_{θ_i}(x_i) for all tasks i: ``x`` is ``[T, N, ..., in]``; a parameter with one more
    dimension than its module's own is per task (``[T, ...]``), otherwise shared by all tasks."""
    num_tasks = x.shape[0]
    middle = x.shape[1:-1]
    h = x.reshape(num_tasks, -1, x.shape[-1])
    for prefix, module in plan:
        if not isinstance(module, nn.Linear):
            h = module(h)
            continue
        weight = params[prefix + "weight"]
        bias = params.get(prefix + "bias")
        if weight.dim() == 3:
            if bias is None:
                h = torch.bmm(h, weight.transpose(1, 2))
            else:
                bias = bias.unsqueeze(-2) if bias.dim() == 2 else bias
                h = torch.baddbmm(bias, h, weight.transpose(1, 2))
        else:
            h = torch.matmul(h, weight.t())
            if bias is not None:
                h = h + (bias.unsqueeze(-2) if bias.dim() == 2 else bias)
    return h.reshape(num_tasks, *middle, h.shape[-1])
