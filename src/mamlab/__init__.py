"""mamlab: Model-Agnostic Meta-Learning and its family, task-vectorized, with generalization analysis."""

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

__version__ = "0.2.0.dev0"

__all__ = ["MAML", "ANIL", "MAMLPlusPlus", "MetaSGD", "iMAML", "Reptile", "Pretrain", "MetaAlgorithm",
           "build_algorithm", "TaskBatch", "MamlabError", "models", "tasks", "__version__"]
