"""Meta-SGD (Li et al. 2017): MAML whose inner step size is learned, one per parameter element.

For each task T_i of a meta-batch::

    θ'_i = θ − α ⊙ ∇θ L_{T_i}(f_θ; D_i^train)          (``inner_steps`` times, the same α)
    meta-loss = (1/T) Σ_i L_{T_i}(f_{θ'_i}; D_i^test)

α has the shape of θ and is meta-learned with θ by the outer loop (``inner_lrs``, an
``nn.ParameterList`` of the algorithm, so the optimizer, checkpoints and evaluation see it). It is
not constrained: an element may grow, shrink or change sign, which is how Meta-SGD learns the
update's direction as well as its size. Li et al. initialize α at random in a small positive range
and adapt in one step; here every element starts at ``inner_lr`` (as learn2learn's ``MetaSGD``
does), and ``inner_steps > 1`` reuses the same α at every step (also as learn2learn does).
α is learned for ``inner_steps`` steps: adapting for many more can diverge, since nothing makes a
learned (possibly negative) α a stable step for repeated use (``benchmarks/compare_sinusoid.py``
measures it: trained for one step on 5-shot sinusoids, 182 of 600 test tasks diverge at 10 steps).

Second order differentiates through the inner steps: ∂L/∂θ carries (I − diag(α) ∇²L_support) and
∂L/∂α = −∇L_support(θ) ⊙ ∇L_query(θ'). First order (``first_order=True``) holds the inner gradients
∇L_support constant, which drops only the Hessian terms: θ gets ∇L_query(θ') as in FOMAML, and α
still gets −∇L_support(θ) ⊙ ∇L_query(θ') (summed over steps), because the step θ − α ⊙ g stays
differentiable in α. This is what learn2learn's ``MetaSGD(first_order=True)`` computes; Li et al.
define no first-order variant.

Reference: Z. Li, F. Zhou, F. Chen, H. Li. Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning. arXiv:1707.09835, 2017.

Example:
    >>> model = mamlab.models.MLP(1, 1, hidden=(40, 40))
    >>> metasgd = MetaSGD(model, torch.nn.functional.mse_loss, inner_lr=0.01)
    >>> opt = torch.optim.Adam(metasgd.parameters(), lr=1e-3)   # θ and α
    >>> metasgd.meta_loss(mamlab.tasks.Sinusoid().sample(25, 10, 10)).backward()
    >>> opt.step()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mamlab.algorithms.base import InnerLoopAlgorithm
from mamlab.core.losses import LossFn
from mamlab.core.params import Params
from mamlab.errors import MamlabError, check_positive

__all__ = ["MetaSGD"]


class MetaSGD(InnerLoopAlgorithm):
    """Meta-SGD around any ``torch.nn.Module``: θ and a per-element step size α learned together.

    Args:
        model: the network f_θ; its trainable parameters are θ.
        loss_fn: ``loss_fn(prediction, target)`` → one task's mean loss.
        inner_lr: the initial value of every element of α (> 0).
        inner_steps: inner steps per task (>= 1); each uses the same α.
        first_order: hold the inner gradients constant (no Hessian terms); α is still learned.
        execution, task_chunk: as for ``MAML``.
        inner_params: names of the parameters adapted per task (default: all trainable ones);
            α exists for these only.

    Attributes:
        inner_lrs: α, one tensor per adapted parameter, in ``model.parameters()`` order, each
            shaped like its parameter.
        initial_lr: ``inner_lr`` as given (the registry option); the step sizes used are ``inner_lrs``.
    """

    name = "metasgd"

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, execution: str = "auto", task_chunk: int | None = None,
                 inner_params: Sequence[str] | None = None) -> None:
        check_positive("inner_lr", inner_lr)
        super().__init__(model, loss_fn, inner_steps=inner_steps, first_order=first_order,
                         inner_params=inner_params, execution=execution, task_chunk=task_chunk)
        self.initial_lr = float(inner_lr)
        adapted = set(self.split_parameters()[0])
        named = [(k, p) for k, p in model.named_parameters() if k in adapted]
        self.lr_names = [k for k, _ in named]
        self.inner_lrs = nn.ParameterList(
            [nn.Parameter(torch.full_like(p.detach(), self.initial_lr)) for _, p in named]
        )

    @property
    def step_sizes(self) -> dict[str, torch.Tensor]:
        """α by parameter name (the ``inner_lrs`` themselves, not copies)."""
        return dict(zip(self.lr_names, self.inner_lrs, strict=True))

    def inner_update(self, params: Params, grads: Params, step: int, lr: float | None = None) -> Params:
        """θ' = θ − α ⊙ ∇θ L_support(θ); α broadcasts over a leading task dimension."""
        if lr is not None:
            raise self._no_single_lr(lr)
        alpha = self.step_sizes
        return {k: p - alpha[k] * grads[k] for k, p in params.items()}

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None,
              start: Mapping[str, torch.Tensor] | None = None, lr: float | None = None) -> Params:
        """Adapt θ to each task's support set with the learned α (see ``InnerLoopAlgorithm.adapt``).

        ``lr`` is refused: replacing the learned per-element step sizes by one number would
        silently evaluate a different learner under Meta-SGD's name.
        """
        if lr is not None:
            raise self._no_single_lr(lr)
        return super().adapt(support_x, support_y, steps, start)

    def options(self) -> dict[str, object]:
        """inner_lr (α's initial value), inner_steps, first_order (and inner_params when not all)."""
        out: dict[str, object] = {"inner_lr": self.initial_lr, "inner_steps": self.inner_steps,
                                  "first_order": self.first_order}
        if self.inner_params is not None:
            out["inner_params"] = list(self.inner_params)
        return out

    @staticmethod
    def _no_single_lr(lr: float) -> MamlabError:
        return MamlabError(
            f"Meta-SGD adapts with its learned per-parameter step sizes (inner_lrs), so lr={lr!r} cannot "
            "replace them; leave lr unset, or adapt the network with MAML(model, loss_fn, inner_lr=...)"
        )
