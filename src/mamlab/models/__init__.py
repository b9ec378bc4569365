"""Networks used in the papers: the sinusoid MLP and the Omniglot Conv4."""

from mamlab.models.conv4 import Conv4
from mamlab.models.mlp import MLP

__all__ = ["MLP", "Conv4"]
