"""mamlab: Model-Agnostic Meta-Learning, task-vectorized, with generalization analysis."""

from mamlab import models, tasks
from mamlab.algorithms.maml import MAML
from mamlab.errors import MamlabError
from mamlab.tasks.base import TaskBatch

__version__ = "0.1.0"

__all__ = ["MAML", "TaskBatch", "MamlabError", "models", "tasks", "__version__"]
