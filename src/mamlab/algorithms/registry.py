"""The registry: an algorithm's name maps to its class and the options it takes.

Adding an algorithm is one new file in ``mamlab/algorithms/`` and one entry here; ``mamlab train
TASK --algorithm NAME`` then trains it, and ``eval``, ``analyze`` and ``demo`` use it as trained.
An algorithm's options are configuration keys (``inner_lr``) and command-line flags
(``--inner-lr``); tasks supply the papers' defaults for them (``mamlab.experiments``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from mamlab.algorithms.anil import ANIL
from mamlab.algorithms.base import MetaAlgorithm
from mamlab.algorithms.imaml import iMAML
from mamlab.algorithms.maml import MAML
from mamlab.algorithms.mamlpp import MAMLPlusPlus
from mamlab.algorithms.metasgd import MetaSGD
from mamlab.algorithms.pretrain import Pretrain
from mamlab.algorithms.reptile import INNER_OPTIMIZERS, TRAIN_ON, Reptile
from mamlab.core.losses import LossFn
from mamlab.errors import MamlabError
from mamlab.options import Option, check_options

__all__ = ["AlgorithmSpec", "ALGORITHMS", "register", "algorithm_spec", "build_algorithm",
           "INNER_LR", "INNER_STEPS", "FIRST_ORDER", "HEAD", "INNER_OPTIMIZER", "TRAIN_ON_OPTION",
           "INNER_BATCH"]

INNER_LR = Option("inner_lr", "float", 0.01, "α, the inner SGD step size", positive=True)
INNER_STEPS = Option("inner_steps", "int", 1, "inner gradient steps per task", positive=True)
FIRST_ORDER = Option("first_order", "bool", False, "drop second-order terms of the meta-gradient")
RECOMPUTE = Option("recompute", "bool", False, "second order: recompute each inner step's graph in backward "
                   "instead of storing it (graph memory ~flat in inner_steps, same meta-gradient)")
HEAD = Option("head", "strs", None, "parameter names adapted per task (default: the last layer's)",
              nullable=True)
LAM = Option("lam", "float", 2.0, "λ, iMAML's proximal regularisation strength", positive=True)
CG_STEPS = Option("cg_steps", "int", 5, "conjugate-gradient iterations per implicit meta-gradient",
                  positive=True)
LSLR = Option("lslr", "bool", True, "MAML++: learn an inner step size per layer and step")
MSL = Option("msl", "bool", True, "MAML++: multi-step loss (every step's query loss) for msl_epochs epochs")
MSL_EPOCHS = Option("msl_epochs", "int", 10, "MAML++: epochs the multi-step loss lasts", positive=True)
ITERATIONS_PER_EPOCH = Option("iterations_per_epoch", "int", 500,
                              "MAML++: training iterations per epoch of its schedules", positive=True)
PER_STEP_BN = Option("per_step_bn", "bool", True,
                     "MAML++: BatchNorm weights, biases (and statistics) per step")
FIRST_ORDER_EPOCHS = Option("first_order_epochs", "int", 50,
                            "MAML++: first-order meta-gradients for this many epochs, then second order",
                            positive="nonnegative")
INNER_OPTIMIZER = Option("inner_optimizer", "str", "sgd", "optimizer of each task's inner loop: sgd, or adam "
                         "(betas 0, 0.999, as in Nichol et al.'s code)", choices=INNER_OPTIMIZERS)
TRAIN_ON_OPTION = Option("train_on", "str", "support+query", "examples each task trains on in meta-training",
                         choices=TRAIN_ON)
INNER_BATCH = Option("inner_batch", "int", None, "examples per inner step (default: all)", positive=True,
                     nullable=True)


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered algorithm.

    Args:
        name: what ``--algorithm`` and ``config.json`` call it.
        build: ``build(model, loss_fn, execution=..., task_chunk=..., **options)`` → the algorithm.
        options: the keys it takes (checked strictly; anything else is an error).
        summary: one line for ``--help`` and the README.
        label: how reports and tables name it (default: ``name``).
    """

    name: str
    build: Callable[..., MetaAlgorithm]
    options: tuple[Option, ...]
    summary: str
    label: str = ""

    @property
    def title(self) -> str:
        """The label, or the name."""
        return self.label or self.name


ALGORITHMS: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add ``spec`` to the registry (its name must be new)."""
    if spec.name in ALGORITHMS:
        raise ValueError(f"algorithm {spec.name!r} is registered twice")
    ALGORITHMS[spec.name] = spec
    return spec


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The registered algorithm called ``name`` (one-line error naming the allowed ones)."""
    if name not in ALGORITHMS:
        raise MamlabError(f"unknown algorithm {name!r}; allowed: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def build_algorithm(name: str, model: nn.Module, loss_fn: LossFn, options: Mapping[str, Any] | None = None,
                    *, execution: str = "auto", task_chunk: int | None = None) -> MetaAlgorithm:
    """The algorithm ``name`` around ``model``, with ``options`` (defaults for the ones not given)."""
    spec = algorithm_spec(name)
    values = check_options(dict(options or {}), spec.options, f"algorithm {name!r}")
    return spec.build(model, loss_fn, execution=execution, task_chunk=task_chunk, **values)


def _fomaml(model: nn.Module, loss_fn: LossFn, **kw: Any) -> MAML:
    return MAML(model, loss_fn, first_order=True, **kw)


register(AlgorithmSpec("maml", MAML, (INNER_LR, INNER_STEPS, FIRST_ORDER, RECOMPUTE),
                       "MAML (Finn et al. 2017), second order unless first_order", "MAML"))
register(AlgorithmSpec("fomaml", _fomaml, (INNER_LR, INNER_STEPS),
                       "first-order MAML: the inner gradients are constants in the meta-gradient", "FOMAML"))
register(AlgorithmSpec("anil", ANIL, (INNER_LR, INNER_STEPS, FIRST_ORDER, HEAD, RECOMPUTE),
                       "ANIL (Raghu et al. 2020): only the head adapts in the inner loop", "ANIL"))
register(AlgorithmSpec("mamlpp", MAMLPlusPlus, (INNER_LR, INNER_STEPS, LSLR, MSL, MSL_EPOCHS,
                                                ITERATIONS_PER_EPOCH, PER_STEP_BN, FIRST_ORDER_EPOCHS),
                       "MAML++ (Antoniou et al. 2019): per-layer per-step learned step sizes, multi-step "
                       "loss, per-step BatchNorm, derivative-order annealing", "MAML++"))
register(AlgorithmSpec("pretrain", Pretrain, (INNER_LR, INNER_STEPS),
                       "Finn et al.'s baseline: supervised training on all tasks pooled, "
                       "fine-tuned by SGD at test time"))
register(AlgorithmSpec("imaml", iMAML, (INNER_LR, INNER_STEPS, LAM, CG_STEPS),
                       "iMAML (Rajeswaran et al. 2019): proximal inner loop, implicit meta-gradient by CG",
                       "iMAML"))
register(AlgorithmSpec("reptile", Reptile,
                       (INNER_LR, INNER_STEPS, INNER_OPTIMIZER, TRAIN_ON_OPTION, INNER_BATCH),
                       "Reptile (Nichol et al. 2018): .grad = θ − mean of the task-trained weights",
                       "Reptile"))
register(AlgorithmSpec("metasgd", MetaSGD, (INNER_LR, INNER_STEPS, FIRST_ORDER),
                       "Meta-SGD (Li et al. 2017): a step size per parameter element, learned from inner_lr",
                       "Meta-SGD"))
