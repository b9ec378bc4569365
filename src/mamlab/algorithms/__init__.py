"""Meta-learning algorithms: MAML (second and first order)."""

from mamlab.algorithms.maml import EXECUTIONS, MAML, default_execution

__all__ = ["MAML", "EXECUTIONS", "default_execution"]
