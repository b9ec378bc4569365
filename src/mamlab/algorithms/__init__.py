"""Meta-learning algorithms under one contract (``MetaAlgorithm``), and the registry of their names."""

from mamlab.algorithms.anil import ANIL, head_parameters
from mamlab.algorithms.base import InnerLoopAlgorithm, MetaAlgorithm
from mamlab.algorithms.imaml import iMAML
from mamlab.algorithms.maml import EXECUTIONS, MAML, default_execution
from mamlab.algorithms.mamlpp import MAMLPlusPlus
from mamlab.algorithms.metasgd import MetaSGD
from mamlab.algorithms.pretrain import Pretrain
from mamlab.algorithms.registry import ALGORITHMS, AlgorithmSpec, algorithm_spec, build_algorithm
from mamlab.algorithms.reptile import Reptile

__all__ = ["MetaAlgorithm", "InnerLoopAlgorithm", "MAML", "ANIL", "MAMLPlusPlus", "MetaSGD", "iMAML",
           "Reptile", "Pretrain", "head_parameters", "ALGORITHMS", "AlgorithmSpec", "algorithm_spec",
           "build_algorithm", "EXECUTIONS", "default_execution"]
