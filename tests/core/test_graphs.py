"""CUDA-graph capture of the meta-step (``mamlab.core.graphs``), checked on the CPU.

A graph can only hold a step that never waits on the host. Two independent checks, for every
registered algorithm on every execution path: a dispatch mode records each operation that
synchronises with the host on a GPU (``.item()``, ``if tensor``, a tensor made from Python data,
data-dependent shapes), and the step runs end to end on the ``meta`` device, which has no data,
so any of them (or a stray CPU tensor) fails there. The wrapper's own logic (copying batches into
the captured inputs, setting ``.grad``, capturing anew when the rule changes, undoing the warm-up)
is checked with the capture replaced by an eager re-run that writes into the recorded tensors, in
float64 against ``meta_loss(batch).backward()``. The capture itself runs on a GPU only
(``benchmarks/device_check.py``).
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from eager_graph import EagerGraph
from mamlab import MamlabError, TaskBatch, build_algorithm
from mamlab.algorithms.registry import ALGORITHMS
from mamlab.core.graphs import GraphedMetaGradient, check_capturable
from mamlab.models import MLP, Conv4
from mamlab.tasks import Sinusoid

#: aten operations that wait on the host when their tensors are on a GPU.
_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "lift_fresh", "equal", "masked_select",
             "_unique2", "unique_dim", "unique_consecutive", "item"}
_SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.__bool__}


class HostSyncs(TorchDispatchMode):
    """Records the operations that would synchronise with the host on a GPU, with where they ran."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        name = func.overloadpacket.__name__
        boolean_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if name in _SYNC_OPS or boolean_index:
            self.found.append(f"{name} at {traceback.format_stack(limit=8)[0].strip()}")
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    """Records Python-level reads of tensor data (``tolist``, ``numpy``, ``item``, ``bool``)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        if func in _SYNC_METHODS:
            self.found.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_detectors_see_host_synchronisations():
    x = torch.ones(3)
    syncs, reads = HostSyncs(), HostReads()
    with syncs, reads:
        x.sum().item()
        torch.tensor(1.5)
        bool(x.sum() > 0)
        x[x > 0]
        x.tolist()
    assert len(syncs.found) >= 4 and "tolist" in reads.found


def _sinusoid(tasks: int = 4, seed: int = 0, device: str = "cpu") -> TaskBatch:
    return Sinusoid().sample(tasks, 5, 5, torch.Generator().manual_seed(seed)).to(
        device=device, dtype=torch.get_default_dtype())


def _images(tasks: int = 2, seed: int = 0, device: str = "cpu") -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(tasks, 1)
    x = torch.bernoulli(torch.full((tasks, 3, 1, 16, 16), 0.3), generator=g)
    qx = torch.bernoulli(torch.full((tasks, 3, 1, 16, 16), 0.3), generator=g)
    return TaskBatch(x, labels, qx, labels).to(device=device, dtype=torch.get_default_dtype())


#: (model, execution path); "conv:2" is the conv path with chunks of two tasks (grouped convolutions,
#: as it runs on CUDA by default)
CASES = [("mlp", "batched"), ("mlp", "vmap"), ("mlp", "loop"), ("conv4", "vmap"), ("conv4", "conv"),
         ("conv4", "conv:2"), ("conv4", "loop")]


def _algorithm(name: str, model: str, execution: str, device: str = "cpu"):
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=(8, 8)) if model == "mlp" else Conv4(3, hidden=4, image_size=16)
    loss = F.mse_loss if model == "mlp" else F.cross_entropy
    execution, _, chunk = execution.partition(":")
    algorithm = build_algorithm(name, net.to(device), loss, {"inner_steps": 2}, execution=execution,
                                task_chunk=int(chunk) if chunk else None)
    algorithm.start_iteration(1, 10**6)
    return algorithm


@pytest.mark.parametrize("model,execution", CASES)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_meta_step_leaves_the_host_alone(name, model, execution):
    """After the first call (its one-time checks), a meta-step never waits on the host."""
    algorithm = _algorithm(name, model, execution)
    batch = _sinusoid() if model == "mlp" else _images()
    algorithm.meta_loss(batch).backward()
    syncs, reads = HostSyncs(), HostReads()
    with syncs, reads:
        algorithm.meta_loss(batch).backward()
    assert not syncs.found and not reads.found, (syncs.found, reads.found)
    # and on the meta device (no data: any read of a value, or a tensor on another device, fails)
    meta = _algorithm(name, model, execution, device="meta")
    meta_batch = _sinusoid(device="meta") if model == "mlp" else _images(device="meta")
    meta.meta_loss(meta_batch).backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in meta.meta_parameters()
               if p.requires_grad and p.grad is not None)


@pytest.mark.parametrize("name,options", [
    ("reptile", {"inner_optimizer": "adam", "inner_batch": 3, "train_on": "support"}),
    ("mamlpp", {"msl": False, "lslr": False, "per_step_bn": False, "first_order_epochs": 0}),
    ("imaml", {"cg_steps": 3, "lam": 0.5}),
    ("maml", {"first_order": True, "inner_steps": 3}),
    ("maml", {"recompute": True, "inner_steps": 3}),
])
def test_meta_steps_with_other_options_leave_the_host_alone(name, options):
    torch.manual_seed(0)
    algorithm = build_algorithm(name, MLP(1, 1, hidden=(8, 8)), F.mse_loss, {"inner_steps": 2, **options})
    algorithm.start_iteration(1, 10**6)
    batch = _sinusoid()
    algorithm.meta_loss(batch).backward()
    syncs, reads = HostSyncs(), HostReads()
    with syncs, reads:
        algorithm.meta_loss(batch).backward()
    assert not syncs.found and not reads.found, (syncs.found, reads.found)


# ---------------------------------------------------------------------------------------- the wrapper
def _eager(algorithm, batch: TaskBatch) -> tuple[float, list[torch.Tensor]]:
    algorithm.zero_grad(set_to_none=True)
    loss = algorithm.meta_loss(batch)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in algorithm.meta_parameters()]


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("name", ["maml", "mamlpp", "metasgd", "imaml"])
def test_replays_give_the_eager_meta_gradient(float64, name):
    algorithm = _algorithm(name, "mlp", "auto")
    reference = copy.deepcopy(algorithm)
    graphed = EagerGraph(algorithm, warmup=2)
    for seed in range(3):
        batch = _sinusoid(seed=seed)
        loss = graphed(batch)
        want_loss, want = _eager(reference, batch)
        assert float(loss) == pytest.approx(want_loss, rel=1e-12)
        assert _close([p.grad for p in algorithm.meta_parameters()], want)
    assert graphed.captures == 1


def test_a_changed_rule_is_captured_anew(float64):
    algorithm = _algorithm("mamlpp", "mlp", "auto")
    algorithm.iterations_per_epoch = 2
    reference = copy.deepcopy(algorithm)
    graphed = EagerGraph(algorithm)
    captures = []
    for it in range(1, 6):  # epochs 0, 0, 1, 1, 2: new multi-step weights each epoch
        for a in (algorithm, reference):
            a.start_iteration(it, 10**6)
        batch = _sinusoid(seed=it)
        graphed(batch)
        assert _close([p.grad for p in algorithm.meta_parameters()], _eager(reference, batch)[1])
        captures.append(graphed.captures)
    assert captures == [1, 1, 2, 2, 3]
    maml = _algorithm("maml", "mlp", "auto")
    graphed = EagerGraph(maml)
    graphed(_sinusoid())
    maml.inner_lr = 0.5  # a Python number the graph read
    graphed(_sinusoid())
    maml.eval()
    graphed(_sinusoid())
    assert graphed.captures == 3


def test_the_warm_up_leaves_no_trace(float64):
    """Running statistics move once per call, as eagerly (the warm-up's updates are undone)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    algorithm = build_algorithm("fomaml", net, F.mse_loss, {"inner_steps": 1}, execution="loop")
    reference = copy.deepcopy(algorithm)
    graphed = EagerGraph(algorithm, warmup=3)
    for seed in range(2):
        batch = _sinusoid(seed=seed)
        graphed(batch)
        _eager(reference, batch)
    assert torch.equal(net[1].running_mean, reference.model[1].running_mean)
    assert torch.equal(net[1].num_batches_tracked, reference.model[1].num_batches_tracked)


def test_a_batch_of_another_shape_is_refused(float64):
    graphed = EagerGraph(_algorithm("maml", "mlp", "auto"))
    graphed(_sinusoid(tasks=4))
    with pytest.raises(MamlabError, match=r"batch\.support_x is \(3, 5, 1\).*captured one \(4, 5, 1\)"):
        graphed(_sinusoid(tasks=3))
    with pytest.raises(MamlabError, match="expected a mamlab.TaskBatch"):
        graphed((1, 2))


def test_what_cannot_be_captured_is_a_one_line_error():
    algorithm = _algorithm("maml", "mlp", "auto")
    with pytest.raises(MamlabError, match="CUDA graphs need a CUDA device, got cpu"):
        GraphedMetaGradient(algorithm)
    recompute = build_algorithm("maml", MLP(1, 1, hidden=(4,)), F.mse_loss, {"recompute": True})
    with pytest.raises(MamlabError, match="cannot capture recompute=True"):
        check_capturable(recompute, "cuda")
