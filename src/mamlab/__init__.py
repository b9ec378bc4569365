"""mamlab: Model-Agnostic Meta-Learning and its family, task-vectorized, with generalization analysis."""

from mamlab import models, tasks
from mamlab.algorithms import ANIL, MAML, MetaAlgorithm, MetaSGD, Pretrain, build_algorithm
from mamlab.core.batch import TaskBatch
from mamlab.errors import MamlabError

__version__ = "0.2.0.dev0"

__all__ = ["MAML", "ANIL", "Pretrain", "MetaAlgorithm", "build_algorithm", "TaskBatch", "MamlabError",
           "models",
           "MetaSGD",
           "tasks", "__version__"]
