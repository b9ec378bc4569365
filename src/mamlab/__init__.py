"""mamlab: Model-Agnostic Meta-Learning and its family, task-vectorized, with generalization analysis.

The public names are imported on first use (PEP 562), so ``import mamlab`` itself is instant and
the command line can answer a Ctrl-C that arrives while PyTorch loads with one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"

#: Public name → the module that defines it.
_EXPORTS = {
    "ANIL": "mamlab.algorithms",
    "MAML": "mamlab.algorithms",
    "MAMLPlusPlus": "mamlab.algorithms",
    "MetaAlgorithm": "mamlab.algorithms",
    "MetaSGD": "mamlab.algorithms",
    "Pretrain": "mamlab.algorithms",
    "Reptile": "mamlab.algorithms",
    "build_algorithm": "mamlab.algorithms",
    "iMAML": "mamlab.algorithms",
    "TaskBatch": "mamlab.core.batch",
    "MamlabError": "mamlab.errors",
}
_SUBMODULES = ("models", "tasks")

__all__ = ["MAML", "ANIL", "MAMLPlusPlus", "MetaSGD", "iMAML", "Reptile", "Pretrain", "MetaAlgorithm",
           "build_algorithm", "TaskBatch", "MamlabError", "models", "tasks", "__version__"]

if TYPE_CHECKING:  # what the names are, for type checkers and readers
    from mamlab import models, tasks
    from mamlab.algorithms import (
        ANIL,
        MAML,
        MAMLPlusPlus,
        MetaAlgorithm,
        MetaSGD,
        Pretrain,
        Reptile,
        build_algorithm,
        iMAML,
    )
    from mamlab.core.batch import TaskBatch
    from mamlab.errors import MamlabError


def __getattr__(name: str) -> Any:
    """Import a public name (or the ``models`` / ``tasks`` package) on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"mamlab.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mamlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
