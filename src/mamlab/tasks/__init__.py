"""Task families p(T): sinusoid regression, linear regression and classification."""

from mamlab.tasks.base import TaskBatch, TaskFamily
from mamlab.tasks.linear import LinearClassification, LinearRegression
from mamlab.tasks.sinusoid import Sinusoid

__all__ = ["TaskBatch", "TaskFamily", "Sinusoid", "LinearRegression", "LinearClassification"]
