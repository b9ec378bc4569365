"""ANIL (Raghu et al. 2020): MAML that adapts only the network's head in the inner loop.

    head'_i = head − α ∇_head L_{T_i}(f_{body, head}; D_i^train)      (``inner_steps`` times)
    meta-loss = (1/T) Σ_i L_{T_i}(f_{body, head'_i}; D_i^test)

The body is shared by every task and trained by the outer loop only, so the inner loop is far
cheaper than MAML's on the same network (``benchmarks/speed.py`` measures it).

Reference: A. Raghu, M. Raghu, S. Bengio, O. Vinyals. Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML. ICLR 2020.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mamlab.algorithms.maml import MAML
from mamlab.core.losses import LossFn
from mamlab.errors import MamlabError

__all__ = ["ANIL", "head_parameters"]


def head_parameters(model: nn.Module) -> list[str]:
    """The trainable parameters of the last module that has any: the network's output layer."""
    last: list[str] = []
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, p in module.named_parameters(recurse=False)
               if p.requires_grad]
        if own:
            last = own
    if not last:
        raise MamlabError(f"{type(model).__name__} has no trainable parameters to use as the head")
    return last


class ANIL(MAML):
    """MAML with only the head adapted per task.

    Args:
        model, loss_fn, inner_lr, inner_steps, first_order, execution, task_chunk, recompute: as for
            ``MAML``.
        head: names of the head's parameters (default ``head_parameters(model)``: the last layer).
    """

    name = "anil"

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float, inner_steps: int = 1,
                 first_order: bool = False, head: Sequence[str] | None = None, execution: str = "auto",
                 task_chunk: int | None = None, recompute: bool = False) -> None:
        head = list(head) if head else head_parameters(model)
        super().__init__(model, loss_fn, inner_lr, inner_steps, first_order, execution=execution,
                         inner_params=head, task_chunk=task_chunk, recompute=recompute)

    def options(self) -> dict[str, object]:
        """inner_lr, inner_steps, first_order and the head's parameter names."""
        out = super().options()
        out["head"] = out.pop("inner_params")
        return out
