"""A forward for Conv4-like networks: channels-last, pooling before ReLU, a folded first BatchNorm.

The per-task loop runs a conv net as PyTorch's modules do, in NCHW memory. On the CPU that layout
is slow for everything but the convolutions: a profile of second-order MAML on Conv4 (5-way
1-shot, 15 queries; ``benchmarks/conv_cpu.py --profile loop``) spends more time in max-pooling,
BatchNorm, ReLU and zero-fills of the 64x28x28 maps than in the convolutions. ``conv_forward``
computes the same function with three changes, each exact in real arithmetic:

* channels-last memory (NHWC), where PyTorch's max-pooling and BatchNorm are many times faster on
  those maps (``benchmarks/conv_cpu.py --profile``), and oneDNN's convolutions need no reorders;
* ``MaxPool2d`` before a ``ReLU`` that precedes it. The two commute exactly, values and gradients
  alike: over a window whose maximum is positive both pick the same (first) maximal element, over
  one whose maximum is <= 0 both give a zero output and a zero gradient; ReLU then touches a
  quarter of the memory;
* a ``BatchNorm2d`` (batch statistics) right after a convolution whose patches are small (at most
  ``FOLD_MAX`` numbers, as Conv4's first layer, 1x3x3) is folded into it: its mean and variance
  are computed from the input patches' mean and covariance, so the 64x28x28 output is written
  once and never read back for statistics, nor kept for BatchNorm's backward.

``conv_plan_for`` recognises the networks it can run: a ``nn.Sequential`` of ``Conv2d``,
``BatchNorm2d`` without running statistics, elementwise activations and ``MaxPool2d``, then
``Flatten`` and a ``Linear`` head; or a model that declares ``features_head = ("features",
"head")`` (``mamlab.models.Conv4``), meaning its forward is ``head(features(x).flatten(1))``. Any
other model returns ``None`` and keeps the engine's other paths.

``conv_forward`` runs one task, as the loop path does (the engine's choice on the CPU, where it
measured fastest). ``conv_forward_tasks`` runs a chunk of tasks together (the engine's choice on
CUDA devices, or with ``task_chunk``), for less memory than vmap: the tasks are the groups of one
grouped convolution per layer (``[N, T*C, H, W]``, channels-last; each BatchNorm one
``batch_norm`` over T*C channels, where vmap's rule adds full-size products for each task's
weight and bias), with two more exact changes:

* max-pooling over windows that tile the map keeps, for backward, which element of each window is
  the maximum, one byte per output, where ``F.max_pool2d`` keeps its input and an int64 index per
  output (``_TiledMaxPool``);
* the folded first convolution and the max-pool after it run in slices of images
  (``SLICE_BYTES``), so its full-size output for all tasks is never whole in memory.

Second-order MAML, Conv4 5-way 1-shot 15 queries, 32 tasks, float32 (``python
benchmarks/conv_cpu.py --tasks 32 --variants loop,mamlab:conv,mamlab:conv:8,mamlab:conv:32,mamlab:vmap``
and ``--rss`` with the same variants): the 32 tasks together hold 658.5 MiB of saved tensors
(453.9 MiB of distinct storages) and grow peak RSS by 944.8 MiB, against vmap's 3436.3 MiB,
3229.9 MiB and 3587.6 MiB. Recomputing the later conv + BatchNorm layers in backward, instead of
keeping BatchNorm's input, measured more peak RSS (1122.5 against 946.9 MiB), so it is not done.
How fast the chunks run on a GPU is not yet measured; on the CPU they are slower than one task at
a time (README, Speed).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mamlab.core.batched import ELEMENTWISE
from mamlab.errors import MamlabError

__all__ = ["LAYOUTS", "ConvPlan", "conv_plan_for", "conv_forward", "conv_forward_tasks"]


#: The memory layout of the maps, by device type. Channels-last measured fastest on the CPU (README,
#: Speed); on CUDA it is not yet measured against NCHW (``benchmarks/speed.py --device cuda --impls
#: mamlab:conv,mamlab:conv-nchw`` compares them). Both compute the same numbers.
LAYOUTS: dict[str, torch.memory_format] = {"cpu": torch.channels_last, "cuda": torch.channels_last}


@dataclass(frozen=True)
class ConvPlan:
    """A recognised conv net: ``layers`` as ``(parameter prefix, module)``, then the linear ``head``.

    ``add_channel``: a 3-d input ``[N, H, W]`` gets a channel dimension (as ``Conv4.forward`` does).
    """

    layers: tuple[tuple[str, nn.Module], ...]
    head: tuple[str, nn.Linear]
    add_channel: bool


def _layer_ok(module: nn.Module) -> bool:
    if type(module) is nn.Conv2d:
        return module.padding_mode == "zeros"
    if type(module) is nn.BatchNorm2d:
        return not module.track_running_stats
    if type(module) is nn.MaxPool2d:
        return not module.return_indices
    return type(module) in ELEMENTWISE


def _plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _declares_features_head(model: nn.Module) -> bool:
    """Whether the class that declares ``features_head`` also defines the forward that is run."""
    for cls in type(model).__mro__:
        if "features_head" in vars(cls):
            own_forward = vars(cls).get("forward") is type(model).forward
            return own_forward and cls.features_head == ("features", "head")
    return False


def conv_plan_for(model: nn.Module) -> ConvPlan | None:
    """The plan ``conv_forward`` runs for ``model``, or ``None`` if it is not a Conv4-like net."""
    if _plain_sequential(model):
        children = list(model.named_children())
        if len(children) < 3 or type(children[-2][1]) is not nn.Flatten:
            return None
        if type(children[-1][1]) is not nn.Linear:
            return None
        flatten = children[-2][1]
        if (flatten.start_dim, flatten.end_dim) != (1, -1):
            return None
        body, (head_name, head) = children[:-2], children[-1]
        layers = tuple((f"{name}.", m) for name, m in body)
        add_channel = False
    elif _declares_features_head(model):
        features, head = getattr(model, "features", None), getattr(model, "head", None)
        if not _plain_sequential(features) or type(head) is not nn.Linear:
            return None
        if {name for name, _ in model.named_children()} != {"features", "head"}:
            return None
        layers = tuple((f"features.{name}.", m) for name, m in features.named_children())
        head_name, add_channel = "head", True
    else:
        return None
    if not all(_layer_ok(m) for _, m in layers) or not any(type(m) is nn.Conv2d for _, m in layers):
        return None
    return ConvPlan(layers, (f"{head_name}.", head), add_channel)


def conv_forward(plan: ConvPlan, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f_θ(x) for one task: ``params`` by the model's parameter names (no task dimension), ``x``
    ``[N, C, H, W]`` (or ``[N, H, W]`` where the plan adds the channel). A parameter missing from
    ``params`` is the module's own. Same values as the model's forward; the maps are channels-last."""
    if plan.add_channel and x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise MamlabError(f"execution 'conv' needs each task's images as [N, C, H, W], got {tuple(x.shape)}; "
                          "use execution 'loop' for this input")
    return _grouped_forward(plan, params, x.unsqueeze(0), 1, tiled_pool=False)[0]


def conv_forward_tasks(plan: ConvPlan, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f_{θ_i}(x_i) for every task i at once: ``x`` ``[T, N, C, H, W]`` (or ``[T, N, H, W]``), output
    ``[T, N, out]``.

    A tensor of ``params`` with one more dimension than the module's parameter is task-batched
    (``[T, ...]``); one with the same dimensions is shared by all tasks; a missing one is the
    module's own. The T tasks run as the groups of one grouped convolution per layer, with the task
    dimension folded into the channels (``[N, T*C, H, W]``, channels-last), so each BatchNorm is one
    ``batch_norm`` over T*C channels (per task and channel, as T separate BatchNorms would be).
    """
    if plan.add_channel and x.dim() == 4:
        x = x.unsqueeze(2)
    if x.dim() != 5:
        raise MamlabError(f"execution 'conv' needs each task's images as [N, C, H, W], "
                          f"got {tuple(x.shape[1:])}; use execution 'loop' for this input")
    return _grouped_forward(plan, params, x, x.shape[0], tiled_pool=True)


def _grouped_forward(plan: ConvPlan, params: Mapping[str, torch.Tensor], x: torch.Tensor, tasks: int,
                     tiled_pool: bool) -> torch.Tensor:
    """The forward of ``tasks`` tasks, images ``[T, N, C, H, W]``, in the grouped layout ``[N, T*C, H, W]``.

    ``tiled_pool``: max-pool with ``_TiledMaxPool`` where the windows tile the map (less memory, a
    little slower on the CPU), else ``F.max_pool2d``.
    """
    n = x.shape[1]
    # an explicit copy: ``.contiguous(memory_format=...)`` keeps a 1-channel tensor's NCHW strides (it
    # is both), and the NHWC strides are what make oneDNN produce channels-last outputs
    h = torch.empty((n, tasks * x.shape[2], *x.shape[3:]), dtype=x.dtype, device=x.device,
                    memory_format=LAYOUTS.get(x.device.type, torch.channels_last))
    h.copy_(x.transpose(0, 1).reshape(h.shape))
    layers = plan.layers
    i = 0
    while i < len(layers):
        prefix, m = layers[i]
        nxt = layers[i + 1][1] if i + 1 < len(layers) else None
        if type(m) is nn.Conv2d and type(nxt) is nn.BatchNorm2d and _foldable(m):
            bn_prefix = layers[i + 1][0]
            bn_weight, bn_bias = _get(params, bn_prefix, nxt, "weight"), _get(params, bn_prefix, nxt, "bias")
            weight, shift = _fold(h, tasks, m, _get(params, prefix, m, "weight"),  # type: ignore[arg-type]
                                  _get(params, prefix, m, "bias"), nxt, bn_weight, bn_bias)
            end = _per_image_end(layers, i + 2)
            h = _folded_block(h, m, weight, shift, tasks, layers[i + 2:end], tiled_pool)
            i = end
        elif type(m) is nn.Conv2d:
            h = F.conv2d(h, _per_group(_get(params, prefix, m, "weight"), m.weight, tasks),
                         _per_group(_get(params, prefix, m, "bias"), m.bias, tasks), m.stride, m.padding,
                         m.dilation, m.groups * tasks)
            i += 1
        elif type(m) is nn.BatchNorm2d:  # no running statistics (the plan's rule): batch statistics
            h = F.batch_norm(h, None, None, _per_group(_get(params, prefix, m, "weight"), m.weight, tasks),
                             _per_group(_get(params, prefix, m, "bias"), m.bias, tasks), training=True,
                             momentum=0.0, eps=m.eps)
            i += 1
        else:
            end = _per_image_end(layers, i)
            h = _per_image(layers[i:end], h, tiled_pool)
            i = end
    prefix, head = plan.head
    weight, bias = _get(params, prefix, head, "weight"), _get(params, prefix, head, "bias")
    feats = h.reshape(n, tasks, -1).transpose(0, 1)  # [T, N, C*H*W], each task's maps flattened as (C, H, W)
    if weight.dim() == 2:  # shared by the tasks
        return F.linear(feats, weight, bias.unsqueeze(-2) if bias is not None and bias.dim() == 2 else bias)
    out = feats @ weight.transpose(1, 2)
    return out if bias is None else out + (bias.unsqueeze(1) if bias.dim() == 2 else bias)


#: Run a folded convolution and the per-image layers after it in slices of images whose convolution
#: output holds at most this many bytes (for 32 Conv4 tasks together, 75 query images: slices of 10).
SLICE_BYTES = 2**26


def _per_image_end(layers: tuple[tuple[str, nn.Module], ...], start: int) -> int:
    """The index of the first conv or BatchNorm from ``start`` on (the layers before it act on each image
    on its own: activations, max-pooling), or the end."""
    end = start
    while end < len(layers) and type(layers[end][1]) not in (nn.Conv2d, nn.BatchNorm2d):
        end += 1
    return end


def _folded_block(h: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, shift: torch.Tensor, tasks: int,
                  after: Sequence[tuple[str, nn.Module]], tiled_pool: bool) -> torch.Tensor:
    """The folded convolution (``_fold``) of ``h``, then the per-image layers ``after`` it.

    With the normalization folded in, every image is on its own until the next conv or BatchNorm.
    Where a max-pool follows the convolution (or a ReLU and a max-pool: the pool runs first), the
    images run through the convolution and the pool in slices whose convolution output holds at most
    ``SLICE_BYTES``, so the full-size output (for 32 Conv4 tasks together, 75 images x 2048 channels
    x 28 x 28) is never whole in memory; the pooled slices are joined, and the rest runs on them.
    """
    def conv_(part: torch.Tensor) -> torch.Tensor:
        return F.conv2d(part, weight, shift, conv.stride, conv.padding, conv.dilation, tasks)

    relu_first = len(after) > 1 and type(after[0][1]) is nn.ReLU and type(after[1][1]) is nn.MaxPool2d
    pool = after[1 if relu_first else 0][1] if after else None
    if type(pool) is not nn.MaxPool2d:
        return _per_image(after, conv_(h), tiled_pool)
    out_bytes = weight.shape[0] * math.prod(_conv_out_size(h.shape[-2:], conv)) * h.element_size()
    rows = max(1, SLICE_BYTES // out_bytes)
    parts = [_pool(pool, conv_(h[s:s + rows]), tiled_pool) for s in range(0, h.shape[0], rows)]
    h = parts[0] if len(parts) == 1 else torch.cat(parts)
    if relu_first:
        h = F.relu(h)  # ReLU after max-pooling: the same values and gradients
    return _per_image(after[2 if relu_first else 1:], h, tiled_pool)


def _per_image(layers: Sequence[tuple[str, nn.Module]], h: torch.Tensor, tiled_pool: bool) -> torch.Tensor:
    """Activations and max-pooling, each image on its own; a ReLU before a max-pool runs after it."""
    i = 0
    while i < len(layers):
        m = layers[i][1]
        if type(m) is nn.ReLU and i + 1 < len(layers) and type(layers[i + 1][1]) is nn.MaxPool2d:
            h = F.relu(_pool(layers[i + 1][1], h, tiled_pool))  # pool first: the same values and gradients
            i += 1
        elif type(m) is nn.MaxPool2d:
            h = _pool(m, h, tiled_pool)
        else:
            h = m(h)
        i += 1
    return h


def _conv_out_size(size: torch.Size, conv: nn.Conv2d) -> tuple[int, int]:
    """The height and width of ``conv``'s output for an input of ``size`` (numeric padding)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                 for n, p, d, k, s in zip(size, _pair(conv.padding), _pair(conv.dilation),  # type: ignore[arg-type]
                                          conv.kernel_size, conv.stride, strict=True))


def _per_group(t: torch.Tensor | None, own: torch.Tensor | None, tasks: int) -> torch.Tensor | None:
    """A parameter as the grouped layout wants it: task-batched ``[T, C, ...]`` → ``[T*C, ...]``,
    shared ``[C, ...]`` → repeated for each task (left as it is for one task)."""
    if t is None or own is None:
        return t
    if t.dim() > own.dim():
        return t.flatten(0, 1)
    return t if tasks == 1 else t.repeat(tasks, *([1] * (t.dim() - 1)))


#: Fold BatchNorm into the convolution before it when one patch holds at most this many numbers
#: (in_channels x kernel area; Conv4's first layer: 1 x 3 x 3, RGB 3 x 3 x 3).
FOLD_MAX = 32


def _foldable(conv: nn.Conv2d) -> bool:
    kh, kw = conv.kernel_size
    return conv.groups == 1 and not isinstance(conv.padding, str) and conv.in_channels * kh * kw <= FOLD_MAX


def _fold(h: torch.Tensor, tasks: int, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None,
          bn: nn.BatchNorm2d, gamma: torch.Tensor | None,
          beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights ``[T*C, in, kh, kw]`` and bias ``[T*C]`` of the one (grouped) convolution of ``h``
    that is BatchNorm(conv(h)) with batch statistics.

    With p the input patches (one per output pixel, K = in_channels x kernel area numbers), μ their
    mean and Σ their covariance over the batch and positions, channel c of conv(h) has mean
    m_c = w_c·μ + b_c and variance w_cᵀ Σ w_c, so BatchNorm(conv(h)) = conv(h; w_c γ_c / σ_c) +
    β_c + γ_c (b_c − m_c) / σ_c with σ_c = sqrt(w_cᵀ Σ w_c + eps): the normalization needs no pass
    over the output map, nor its backward. Σ is K x K, cheap when K is small. The conv bias cancels
    (b_c − m_c does not depend on it); it stays in the graph with its exact gradient, zero. Each of
    the ``tasks`` groups of channels of ``h`` has its own μ, Σ, and (when they are task-batched) w, b.
    """
    cols = F.unfold(h, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [N, T*K, L]
    cols = cols.view(cols.shape[0], tasks, -1, cols.shape[2])  # [N, T, K, L]
    count = cols.shape[0] * cols.shape[3]
    mean = cols.mean((0, 3))  # [T, K]
    centred = cols - mean[:, :, None]
    cov = torch.einsum("ntkl,ntjl->tkj", centred, centred) / count  # [T, K, K]
    w = weight.reshape(*weight.shape[:-3], -1)  # [T, C, K] or, shared, [C, K]
    scale = torch.rsqrt(((w @ cov) * w).sum(-1) + bn.eps)  # [T, C]
    if gamma is not None:
        scale = scale * gamma
    centre = (w @ mean.unsqueeze(-1)).squeeze(-1)  # [T, C]
    shift = (bias - (centre + bias)) * scale if bias is not None else -centre * scale
    if beta is not None:
        shift = shift + beta
    return (w * scale.unsqueeze(-1)).reshape(-1, *conv.weight.shape[1:]), shift.flatten()


def _get(params: Mapping[str, torch.Tensor], prefix: str, m: nn.Module, name: str) -> torch.Tensor | None:
    return params[prefix + name] if prefix + name in params else getattr(m, name)


def _pool(m: nn.MaxPool2d, h: torch.Tensor, tiled: bool) -> torch.Tensor:
    """``m(h)``, by ``_TiledMaxPool`` if ``tiled`` and its windows tile the map."""
    kernel = _pair(m.kernel_size)
    stride = _pair(m.stride if m.stride else m.kernel_size)
    tiled = tiled and (kernel == stride and _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1)
             and kernel[0] * kernel[1] <= 256
             and (not m.ceil_mode or (h.shape[-2] % kernel[0] == 0 and h.shape[-1] % kernel[1] == 0)))
    if tiled:
        return _TiledMaxPool.apply(h, kernel)
    return F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[1])


class _TiledMaxPool(torch.autograd.Function):
    """Max-pooling over windows that tile the map (kernel = stride, no padding) that keeps, for backward,
    only which element of its window each maximum is: one byte per output element.

    ``F.max_pool2d`` keeps its whole input and an int64 index per output (for Conv4's first layer,
    the 64x28x28 maps and 8 bytes per pooled element), and returns those indices at full width.
    Here the forward pools without indices and finds, window position by window position (as
    strided views of the input), the first element equal to the maximum, which is the one
    ``F.max_pool2d`` picks (it takes the first maximum in row-major order, or, in a window holding
    NaN, the last NaN: that rule is kept too). The backward writes the gradient into those
    positions, one strided view at a time: the same gradient as ``F.max_pool2d``'s, and itself
    differentiable, as second-order MAML needs; no int64 index is ever built.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:  # noqa: D102
        out = F.max_pool2d(h, kernel, kernel)
        windows = _windows(h.shape, kernel, out.shape[-2:])
        position = torch.empty_like(out, dtype=torch.uint8).fill_(len(windows) - 1)
        for p in reversed(range(len(windows) - 1)):  # the first maximum wins
            position.masked_fill_(h[windows[p]] == out, p)
        for p, view in enumerate(windows):  # a NaN is the maximum (the last one wins), as in max_pool2d
            position.masked_fill_(torch.isnan(h[view]), p)
        ctx.kernel, ctx.shape = kernel, h.shape
        ctx.save_for_backward(position)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (position,) = ctx.saved_tensors
        nhwc = grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if nhwc else torch.contiguous_format
        grad_in = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=layout).zero_()
        for p, view in enumerate(_windows(ctx.shape, ctx.kernel, grad.shape[-2:])):
            grad_in[view] = torch.where(position == p, grad, 0.0)
        return grad_in, None


def _windows(shape: torch.Size, kernel: tuple[int, int], out_size: torch.Size) -> list[tuple[slice, ...]]:
    """For each position (row-major) within a pooling window, the strided view of the map at that
    position in every window: ``h[view]`` has the pooled output's shape."""
    (kh, kw), (oh, ow) = kernel, out_size
    lead = (slice(None),) * (len(shape) - 2)
    return [(*lead, slice(a, oh * kh, kh), slice(b, ow * kw, kw)) for a in range(kh) for b in range(kw)]
