"""The CPU conv path (``execution="conv"``) against the per-task loop path, in float64.

The loop path runs the model's own modules (``functional_call``) in NCHW memory with ReLU before
max-pooling; the conv path runs ``mamlab.core.conv`` in channels-last memory with pooling first.
Images are binary, like Omniglot's, so max-pooling windows hold ties, and BatchNorm's weights are
drawn around zero, so some are negative: the cases where reordering pooling and ReLU could go
wrong. A conv bias before BatchNorm has an exact gradient of zero (batch statistics remove any
constant), so both paths give it rounding noise: gradients are compared to 1e-10 relative to the
whole gradient's norm. With ``task_chunk`` above one the conv path runs the chunk's tasks together
(``conv_forward_tasks``: grouped convolutions, one-byte max-pooling, the first layer in slices of
images); 5 tasks in chunks of 3 make the chunks uneven, and ``task_chunk=5`` is the CUDA default
(all tasks together) forced on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mamlab.core.conv as conv_module
from mamlab import ANIL, MAML, MamlabError, MAMLPlusPlus, TaskBatch
from mamlab.core.conv import LAYOUTS, _TiledMaxPool, conv_forward, conv_forward_tasks, conv_plan_for
from mamlab.core.execution import default_execution
from mamlab.core.memory import peak_saved_bytes
from mamlab.models import MLP, Conv4

pytestmark = pytest.mark.usefixtures("float64")  # every test here compares in float64 (tests/conftest.py)


def conv4(downsample: str = "pool", seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    model = Conv4(3, hidden=6, image_size=16, downsample=downsample)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # affine, some weights negative
                m.weight.normal_(0.2, 1.0)
                m.bias.normal_(0.0, 0.5)
    return model


def binary_batch(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 3, seed: int = 1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = (torch.rand(tasks, ways * shots, 1, 16, 16, generator=g) > 0.6).double()
    qx = (torch.rand(tasks, ways * queries, 1, 16, 16, generator=g) > 0.6).double()
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(sx, sy, qx, qy)


def assert_grads_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    scale = torch.cat([w.flatten() for w in want]).norm().item()
    assert scale > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * scale)


def meta_grads(algo: MAML | MAMLPlusPlus, batch: TaskBatch) -> list[torch.Tensor]:
    algo.zero_grad(set_to_none=True)
    algo.meta_loss(batch).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in algo.meta_parameters()]


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_conv_forward_equals_the_modules_forward_values_and_gradients(downsample: str) -> None:
    model = conv4(downsample)
    plan = conv_plan_for(model)
    assert plan is not None
    x = binary_batch().query_x[0]
    params = dict(model.named_parameters())
    got, want = conv_forward(plan, params, x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_forward(plan, params, x[:, 0]), want, rtol=1e-12, atol=1e-12)  # [N, H, W]
    target = torch.randn(want.shape)
    assert_grads_equal(list(torch.autograd.grad((got * target).sum(), list(params.values()))),
                       list(torch.autograd.grad((want * target).sum(), list(params.values()))))


def test_a_plain_sequential_conv_net_runs_the_same() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, affine=False,
                                                                                    track_running_stats=False),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 4, 3, stride=2), nn.Tanh(),
                          nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    plan = conv_plan_for(model)
    assert plan is not None and default_execution(model) == "conv"
    x = torch.randn(7, 2, 20, 20)
    params = dict(model.named_parameters())
    params["0.weight"] = params["0.weight"] * 1.5  # substituted, not the module's own
    want = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(conv_forward(plan, params, x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_forward(plan, {}, x), model(x), rtol=1e-12, atol=1e-12)  # the model's own


@pytest.mark.parametrize("downsample", ["pool", "stride"])
@pytest.mark.parametrize("steps, first_order", [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("task_chunk", [None, 3, 5])  # None: one task at a time (the CPU default)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous_format"])
def test_meta_gradient_and_adapted_parameters_equal_the_loop_path(downsample: str, steps: int, first_order: bool,
                                                                   task_chunk: int | None, layout: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LAYOUTS, "cpu", getattr(torch, layout))
    model = conv4(downsample)
    batch = binary_batch(tasks=5)  # chunks of 3 and 2 tasks, or all 5 together (the CUDA default)
    conv = MAML(model, F.cross_entropy, 0.3, steps, first_order=first_order, execution="conv",
                task_chunk=task_chunk)
    loop = MAML(model, F.cross_entropy, 0.3, steps, first_order=first_order, execution="loop")
    assert_grads_equal(meta_grads(conv, batch), meta_grads(loop, batch))
    got, want = conv.adapt(batch.support_x, batch.support_y), loop.adapt(batch.support_x, batch.support_y)
    assert_grads_equal(list(got.values()), list(want.values()))
    torch.testing.assert_close(conv.predict(got, batch.query_x), loop.predict(want, batch.query_x),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("task_chunk", [None, 3])
@pytest.mark.parametrize("options", [{"recompute": True, "inner_steps": 2},
                                     {"inner_params": ["head.weight", "head.bias"]},  # ANIL
                                     {"inner_params": ["features.0.weight", "features.4.bias", "head.bias"]}])
def test_recompute_and_partial_adaptation_equal_the_loop_path(options: dict, task_chunk: int | None) -> None:
    model = conv4("stride")
    batch = binary_batch(tasks=5)
    conv = MAML(model, F.cross_entropy, 0.3, execution="conv", task_chunk=task_chunk, **options)
    loop = MAML(model, F.cross_entropy, 0.3, execution="loop", **options)
    assert_grads_equal(meta_grads(conv, batch), meta_grads(loop, batch))
    got, want = conv.adapt(batch.support_x, batch.support_y), loop.adapt(batch.support_x, batch.support_y)
    assert_grads_equal(list(got.values()), list(want.values()))


def test_anil_equals_the_loop_path_with_tasks_together() -> None:
    batch = binary_batch(tasks=5)
    grads = {}
    for execution, chunk in (("conv", 4), ("loop", None)):  # chunks of 4 tasks and 1 task
        algo = ANIL(conv4(seed=5), F.cross_entropy, 0.3, 2, execution=execution, task_chunk=chunk)
        grads[execution] = meta_grads(algo, batch)
    assert_grads_equal(grads["conv"], grads["loop"])


def test_conv_forward_tasks_equals_each_tasks_forward_with_task_batched_and_shared_parameters() -> None:
    model = conv4()
    plan = conv_plan_for(model)
    tasks = 4
    x = binary_batch(tasks=tasks).query_x
    g = torch.Generator().manual_seed(7)
    own = dict(model.named_parameters())
    batched = {k: (p.detach().expand(tasks, *p.shape) + 0.3 * torch.randn(tasks, *p.shape, generator=g))
               .requires_grad_(True) for k, p in own.items() if k.startswith(("features.0.", "features.5.", "head.b"))}
    params = {**own, **batched}
    got = conv_forward_tasks(plan, params, x)
    want = torch.stack([torch.func.functional_call(model, {**own, **{k: p[i] for k, p in batched.items()}}, (x[i],))
                        for i in range(tasks)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_forward_tasks(plan, params, x[:, :, 0]), want, rtol=1e-12, atol=1e-12)
    target = torch.randn(want.shape, generator=g)
    inputs = list(params.values())
    assert_grads_equal(list(torch.autograd.grad((got * target).sum(), inputs)),
                       list(torch.autograd.grad((want * target).sum(), inputs)))


def test_the_conv_path_runs_one_task_at_a_time_on_cpu_and_all_tasks_together_on_cuda() -> None:
    engine = MAML(Conv4(5), F.cross_entropy, 0.1, execution="conv").engine
    assert engine.chunks(3, "conv") == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert engine.chunks(3, "conv", "cuda") == [slice(0, 3)]
    assert engine.chunks(3, "loop", "cuda") == [slice(0, 1), slice(1, 2), slice(2, 3)]
    engine = MAML(Conv4(5), F.cross_entropy, 0.1, execution="conv", task_chunk=2).engine
    assert engine.chunks(5, "conv") == engine.chunks(5, "conv", "cuda") == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_the_folded_first_layer_keeps_its_conv_bias_in_the_graph_with_gradient_zero() -> None:
    model = conv4()
    batch = binary_batch(tasks=2)
    loss = MAML(model, F.cross_entropy, 0.3, execution="conv").query_losses(batch).mean()
    grads = dict(zip([k for k, _ in model.named_parameters()],
                     torch.autograd.grad(loss, list(model.parameters())), strict=True))  # no unused tensor
    assert torch.count_nonzero(grads["features.0.bias"]) == 0  # BatchNorm cancels it exactly
    assert torch.count_nonzero(grads["features.0.weight"]) > 0


@pytest.mark.parametrize("first_order_epochs, task_chunk", [(0, None), (1, None), (0, 3), (1, 3)])
def test_mamlpp_per_step_batchnorm_and_rates_equal_the_loop_path(first_order_epochs: int,
                                                                 task_chunk: int | None) -> None:
    batch = binary_batch(tasks=5)
    grads, preds = {}, {}
    for execution in ("conv", "loop"):
        model = conv4(seed=3)
        algo = MAMLPlusPlus(model, F.cross_entropy, 0.2, 2, msl_epochs=2, iterations_per_epoch=1,
                            first_order_epochs=first_order_epochs, execution=execution,
                            task_chunk=task_chunk if execution == "conv" else None)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():  # distinct rates and per-step BatchNorm, so a wrong step index shows
            for p in algo.lrs.values():
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            for p in algo.step_bn.values():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        algo.start_iteration(1, 10)  # epoch 0: both steps' query losses count (MSL)
        assert algo.first_order == bool(first_order_epochs) and len(algo.step_bn) == 8
        grads[execution] = meta_grads(algo, batch)
        adapted = algo.adapt(batch.support_x, batch.support_y, steps=3)  # past the trained steps
        preds[execution] = algo.predict(adapted, batch.query_x)
    assert_grads_equal(grads["conv"], grads["loop"])
    torch.testing.assert_close(preds["conv"], preds["loop"], rtol=1e-10, atol=1e-10)


def test_only_conv4_like_nets_have_a_plan() -> None:
    class Reordered(Conv4):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).flip(-1)

    tracking = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    dropout = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.1), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    no_flatten = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(6, 2))
    for model in (Reordered(3), tracking, dropout, no_flatten, MLP(1, 1)):
        assert conv_plan_for(model) is None
    assert default_execution(Reordered(3)) == "loop" and default_execution(MLP(1, 1)) == "batched"
    with pytest.raises(MamlabError, match=r"^execution 'conv' needs a Conv4-like net .* got Reordered; "
                                          r"allowed for this model: auto, vmap, loop$"):
        MAML(Reordered(3), F.cross_entropy, 0.1, execution="conv")


def test_auto_takes_the_conv_path_on_cpu_only() -> None:
    assert default_execution(Conv4(5)) == "conv"
    assert default_execution(Conv4(5), "cuda") == "vmap"
    assert MAML(Conv4(5), F.cross_entropy, 0.1).resolved_execution("cpu") == "conv"


def test_tune_times_the_conv_path() -> None:
    model = conv4()
    times = MAML(model, F.cross_entropy, 0.3).tune(binary_batch(tasks=2), repeats=1)
    assert set(times) == {"vmap", "loop", "conv"}
    assert all(p.grad is None for p in model.parameters())


def test_images_without_a_batch_dimension_are_a_one_line_error() -> None:
    model = conv4()
    with pytest.raises(MamlabError, match=r"^execution 'conv' needs each task's images as \[N, C, H, W\], "
                                          r"got \(16, 16\); use execution 'loop' for this input$"):
        conv_forward(conv_plan_for(model), {}, torch.zeros(16, 16))


@pytest.mark.parametrize("kernel, size", [((2, 2), (7, 9)), ((2, 3), (8, 9)), ((3, 3), (9, 9))])
def test_tiled_max_pool_equals_max_pool2d_to_second_order(kernel: tuple[int, int], size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(8)
    h = torch.randint(0, 3, (3, 4, *size), generator=g).double().requires_grad_(True)  # ties in most windows
    h_cl = h.contiguous(memory_format=torch.channels_last)
    got, want = _TiledMaxPool.apply(h_cl, kernel), F.max_pool2d(h, kernel)
    assert torch.equal(got, want)
    v = torch.randn(want.shape, generator=g, requires_grad=True)
    (dg,), (dw,) = (torch.autograd.grad((o * v).sum(), h, create_graph=True) for o in (got, want))
    torch.testing.assert_close(dg, dw, rtol=0, atol=0)  # the same (first) maximal element gets the gradient
    u = torch.randn(h.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad((dg * u).sum(), v)[0], torch.autograd.grad((dw * u).sum(), v)[0],
                               rtol=0, atol=0)


def test_tiled_max_pool_keeps_one_byte_per_output_for_backward() -> None:
    h = torch.randn(5, 8, 28, 28, requires_grad=True)
    plain = peak_saved_bytes(lambda: F.max_pool2d(h, 2))
    tiled = peak_saved_bytes(lambda: _TiledMaxPool.apply(h, (2, 2)))
    assert plain == h.numel() * 8 + h.numel() // 4 * 8  # its input (float64) and an int64 index per output
    assert tiled == h.numel() // 4


def test_a_chunk_of_tasks_holds_less_than_a_task_at_a_time_per_task() -> None:
    batch = binary_batch(tasks=4)
    saved = {}
    for chunk in (1, 4):
        algo = MAML(conv4(), F.cross_entropy, 0.3, execution="conv", task_chunk=chunk)
        saved[chunk] = peak_saved_bytes(lambda algo=algo: algo.meta_loss(batch).backward())
    assert saved[4] < 4 * saved[1] * 0.7


@pytest.mark.parametrize("images_per_slice", [1, 2])  # 3 and 9 images per task: slices of 2 are uneven
def test_the_first_layer_in_slices_of_images_equals_the_loop_path(monkeypatch: pytest.MonkeyPatch,
                                                                  images_per_slice: int) -> None:
    model = conv4()
    batch = binary_batch(tasks=5)
    # one image's folded conv output: 5 tasks x 6 channels x 16 x 16 float64 numbers
    monkeypatch.setattr(conv_module, "SLICE_BYTES", images_per_slice * 5 * 6 * 16 * 16 * 8)
    grads = {}
    for execution in ("conv", "loop"):
        algo = MAML(model, F.cross_entropy, 0.3, 2, execution=execution, task_chunk=5)
        grads[execution] = meta_grads(algo, batch)
    assert_grads_equal(grads["conv"], grads["loop"])


class ConvOutputSizes(torch.overrides.TorchFunctionMode):
    """Records the bytes of every ``F.conv2d`` output computed while active."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.conv2d:
            self.sizes.append(out.numel() * out.element_size())
        return out


def test_slices_of_images_keep_the_full_size_first_map_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    model = conv4()
    x = binary_batch(tasks=4).query_x
    full_map = x.shape[1] * 4 * 6 * 16 * 16 * 8  # the first conv's output, all tasks and images
    monkeypatch.setattr(conv_module, "SLICE_BYTES", full_map // 3)
    with torch.no_grad(), ConvOutputSizes() as record:
        conv_forward_tasks(conv_plan_for(model), dict(model.named_parameters()), x)
    assert len(record.sizes) == 3 + 3  # the first conv in three slices, then the three others
    assert max(record.sizes[:3]) <= full_map // 3


def test_tiled_max_pool_sends_the_gradient_where_max_pool2d_does_in_windows_holding_nan() -> None:
    h = torch.tensor([[[[1.0, float("nan"), 5.0, 2.0], [float("nan"), 0.0, 5.0, 5.0]]]], requires_grad=True)
    got, want = _TiledMaxPool.apply(h, (2, 2)), F.max_pool2d(h, 2)
    torch.testing.assert_close(got, want, equal_nan=True)
    v = torch.tensor([[[[2.0, 3.0]]]])
    torch.testing.assert_close(torch.autograd.grad((got * v).sum(), h)[0], torch.autograd.grad((want * v).sum(), h)[0])
