"""Layer representations of a network under given parameters, captured with forward hooks.

The model is run functionally (``torch.func.functional_call``) with one task's parameters, e.g.
the meta-learned θ or a task's adapted θ'_i from ``MAML.adapt``; a forward hook on each layer
module (Linear, Conv, activation, ...) records its output. Comparing the representations under
θ and θ' layer by layer (``mamlab.analysis.similarity``) is Raghu et al.'s test of rapid learning
vs feature reuse.

Reference: A. Raghu, M. Raghu, S. Bengio, O. Vinyals. Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML. ICLR 2020.

Example:
    >>> reps = capture_representations(model, parameters_of(model), x)      # θ
    >>> after = capture_representations(model, task_slice(adapted, 0), x)   # θ'_0
    >>> {k: linear_cka(reps[k], after[k]) for k in reps}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mamlab.core.params import buffers_of, forward
from mamlab.errors import MamlabError

__all__ = ["LAYER_TYPES", "representation_layers", "parametrized_layers", "head_parameter_names",
           "layer_label", "capture_representations", "relative_parameter_change"]

#: Module types whose outputs count as a layer's representation.
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.modules.conv._ConvNd, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid,
    nn.SiLU, nn.Softplus,
)


def representation_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Linear/Conv/activation modules by qualified name, in registration order."""
    if not isinstance(model, nn.Module):
        raise MamlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if name and isinstance(m, LAYER_TYPES)}


def parametrized_layers(model: nn.Module) -> dict[str, list[str]]:
    """Each module that owns trainable parameters directly → the full names of those parameters."""
    out: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, t in m.named_parameters(recurse=False) if t.requires_grad]
        if own:
            out[name] = own
    return out


def head_parameter_names(model: nn.Module) -> list[str]:
    """The last parametrized layer's parameters (weight and bias): the head that ANIL adapts."""
    layers = parametrized_layers(model)
    if not layers:
        raise MamlabError(f"{type(model).__name__} has no trainable parameters; it has no head")
    return list(layers.values())[-1]


def layer_label(model: nn.Module, name: str) -> str:
    """A readable layer name: the module's qualified name and type, e.g. ``"2 Linear"``."""
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise MamlabError(f"{type(model).__name__} has no module {name!r}")
    return f"{name or 'model'} {type(module).__name__}"


def capture_representations(model: nn.Module, params: Mapping[str, torch.Tensor] | None, x: torch.Tensor,
                            layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Each layer's output for inputs ``x`` under ``params`` (one task's, no task dimension).

    Args:
        model: the network; its own parameters fill in any not given in ``params``.
        params: a parameter dict (θ, a task's θ', or a part of it such as ANIL's head); ``None``
            for the model's own parameters.
        x: the inputs ``[n, ...]``.
        layers: module names to capture (default: ``representation_layers(model)``).

    Returns:
        Module name → detached output ``[n, ...]``, in the model's module order.
    """
    available = representation_layers(model)
    names = list(available) if layers is None else list(layers)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or not n]
    if unknown:
        raise MamlabError(f"layers {unknown!r} are not modules of {type(model).__name__}; "
                          f"allowed: {', '.join(available)}")
    own = dict(model.named_parameters())
    for k, p in (params or {}).items():
        if k in own and p.shape != own[k].shape:
            raise MamlabError(f"params[{k!r}] has shape {tuple(p.shape)}, the model's has "
                              f"{tuple(own[k].shape)}; pass one task's parameters (no task dimension)")
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            captured[name] = output.detach()
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            if params is None:
                model(x)
            else:
                forward(model, {k: p.detach() for k, p in params.items()}, x, buffers_of(model))
    finally:
        for h in handles:
            h.remove()
    return {n: captured[n] for n in names if n in captured}


def relative_parameter_change(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                              groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """‖θ' − θ‖ / ‖θ‖ per group of parameters (e.g. per layer: its weight and bias together).

    Args:
        before: θ, name → tensor.
        after: θ' for one task; parameters missing from it (not adapted) count as unchanged.
        groups: group name → parameter names.

    Returns:
        Group name → relative L2 change (0 for a group none of whose parameters was adapted).
    """
    out: dict[str, float] = {}
    for group, names in groups.items():
        missing = [n for n in names if n not in before]
        if missing:
            raise MamlabError(f"parameters {missing!r} of group {group!r} are not in θ; "
                              f"allowed: {', '.join(before)}")
        diff = sum(float(((after[n].double() - before[n].double()) ** 2).sum())
                   for n in names if n in after)
        norm = sum(float((before[n].double() ** 2).sum()) for n in names)
        out[group] = (diff ** 0.5) / (norm ** 0.5) if norm > 0 else float("nan")
    return out

