"""Task families p(T): sinusoid regression, linear regression and classification, Omniglot."""

from mamlab.tasks.base import ParametricTasks, TaskBatch, TaskFamily
from mamlab.tasks.linear import LinearClassification, LinearRegression
from mamlab.tasks.omniglot import CharacterPool, Omniglot, OmniglotTasks
from mamlab.tasks.omniglot.oneshot import OneShotRun, evaluate_runs, load_runs
from mamlab.tasks.sinusoid import Sinusoid

__all__ = ["TaskBatch", "TaskFamily", "ParametricTasks", "Sinusoid", "LinearRegression",
           "LinearClassification", "Omniglot", "OmniglotTasks", "CharacterPool", "OneShotRun", "load_runs",
           "evaluate_runs"]
