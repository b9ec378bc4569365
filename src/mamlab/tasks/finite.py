"""A finite pool of tasks: meta-train on M fixed tasks, each with a fixed dataset of N examples.

The usual meta-training stream draws a fresh task every time. Theory of meta-generalization
(Chen et al. 2020; Fallah et al. 2021) asks what happens with finitely many tasks, M, each with
finitely many examples, N: :class:`TaskPool` draws the M tasks and their N examples once, from a
seed, and then serves meta-batches of tasks picked uniformly (with replacement) from the pool,
each task's support and query sets a random disjoint split of its own N examples.

For N-way classification (a family with a ``ways`` attribute, e.g. Omniglot) the N examples are
per class, and support and query sets keep the family's class-by-class order and balance.

References:
    J. Chen, X.-M. Wu, Y. Li, Q. Li, L.-M. Zhan, F. Chung. A Closer Look at the Training Strategy
    for Modern Meta-Learning. NeurIPS 2020.
    A. Fallah, A. Mokhtari, A. Ozdaglar. Generalization of Model-Agnostic Meta-Learning
    Algorithms: Recurring and Unseen Tasks. NeurIPS 2021.
"""

from __future__ import annotations

import torch

from mamlab.core.memory import available_bytes, batch_bytes, format_bytes
from mamlab.errors import MamlabError, check_positive
from mamlab.tasks.base import ParametricTasks, TaskBatch, TaskFamily

__all__ = ["TaskPool"]


class TaskPool:
    """M tasks of ``family``, each with a fixed dataset of N examples (per class for N-way tasks).

    Args:
        family: the task distribution the pool is drawn from.
        num_tasks: M, the tasks in the pool.
        examples: N, the examples of each task (per class for N-way classification), >= 2.
        generator: the random stream the pool is drawn from (its seed fixes the pool).

    A ``TaskPool`` is itself a :class:`~mamlab.tasks.base.TaskFamily`: ``sample`` draws tasks from
    the pool. ``recurring`` draws the pool's tasks with *fresh* examples (parametric families).
    """

    def __init__(self, family: TaskFamily, num_tasks: int, examples: int,
                 generator: torch.Generator | None = None) -> None:
        check_positive("train_tasks", num_tasks, integer=True)
        check_positive("train_examples", examples, integer=True)
        if examples < 2:
            raise MamlabError(f"train_examples must be at least 2 (one support and one query example), "
                              f"got {examples}")
        self.family, self.num_tasks, self.examples = family, int(num_tasks), int(examples)
        self.kind = family.kind
        self.ways = int(getattr(family, "ways", 1))
        self.name = f"{getattr(family, 'name', 'tasks')} pool"
        self.params: dict[str, torch.Tensor] | None = None
        self._check_memory(family)
        if isinstance(family, ParametricTasks):
            self.params = family.sample_tasks(self.num_tasks, generator)
            batch = family.batch(self.params, self.examples - 1, 1, generator)
        else:
            batch = family.sample(self.num_tasks, self.examples - 1, 1, generator)

        def by_class(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
            """[M, ways, N, ...]: each task's examples, class by class (one "class" for regression)."""
            m, w = self.num_tasks, self.ways
            return torch.cat([support.reshape(m, w, -1, *support.shape[2:]),
                              query.reshape(m, w, -1, *query.shape[2:])], dim=2)

        self.x = by_class(batch.support_x, batch.query_x)
        self.y = by_class(batch.support_y, batch.query_y)

    def _check_memory(self, family: TaskFamily) -> None:
        """A one-line error, before the pool is drawn, if its examples cannot fit in free memory."""
        one = family.sample(1, self.examples - 1, 1, torch.Generator().manual_seed(0))  # sizes only
        need = 2 * batch_bytes(one) * self.num_tasks  # the drawn batch and the pool made from it, at the peak
        free = available_bytes("cpu")
        if free is not None and need > free:
            raise MamlabError(f"a pool of {self.num_tasks} tasks with {self.examples} examples each needs "
                              f"about {format_bytes(need)} while it is drawn, and {format_bytes(free)} of "
                              "memory is free; lower train_tasks or train_examples")

    def check(self, shots: int, queries: int) -> None:
        """A one-line error unless ``shots + queries`` examples fit in each task's N."""
        if shots + queries > self.examples:
            per = " per class" if self.ways > 1 else ""
            raise MamlabError(f"shots + queries = {shots + queries} exceeds train_examples = {self.examples} "
                              f"(the examples{per} of each pool task); use train_examples >= "
                              f"{shots + queries}")

    def sample_indices(self, num_tasks: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_tasks`` pool tasks picked uniformly with replacement: their indices ``[T]``."""
        check_positive("num_tasks", num_tasks, integer=True)
        return torch.randint(self.num_tasks, (num_tasks,), generator=generator)

    def batch(self, index: torch.Tensor, shots: int, queries: int,
              generator: torch.Generator | None = None) -> TaskBatch:
        """Support and query sets of the pool tasks ``index``: a random disjoint split of their examples."""
        check_positive("shots", shots, integer=True)
        check_positive("queries", queries, integer=True)
        self.check(shots, queries)
        t, w, n = len(index), self.ways, self.examples
        order = torch.rand(t, w, n, generator=generator).argsort(dim=-1)[..., :shots + queries]
        x, y = self.x[index], self.y[index]

        def take(values: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
            shape = pick.shape + values.shape[3:]
            idx = pick.reshape(*pick.shape, *([1] * (values.dim() - 3))).expand(shape)
            return values.gather(2, idx).reshape(t, w * pick.shape[-1], *values.shape[3:])

        s, q = order[..., :shots], order[..., shots:]
        return TaskBatch(take(x, s), take(y, s), take(x, q), take(y, q))

    def sample(self, num_tasks: int, shots: int, queries: int,
               generator: torch.Generator | None = None) -> TaskBatch:
        """``num_tasks`` pool tasks, each split into ``shots`` support and ``queries`` query examples."""
        self.check(shots, queries)
        return self.batch(self.sample_indices(num_tasks, generator), shots, queries, generator)

    def recurring(self, num_tasks: int, shots: int, queries: int,
                  generator: torch.Generator | None = None) -> TaskBatch:
        """Pool tasks with fresh examples, drawn from the tasks' own distributions (Fallah et al.'s
        recurring tasks); only for parametric families, whose tasks are known beyond their examples."""
        if self.params is None or not isinstance(self.family, ParametricTasks):
            raise MamlabError(f"fresh examples of a pool task need a parametric task family; "
                              f"{self.family!r} is known only through its examples")
        index = self.sample_indices(num_tasks, generator)
        params = {k: v[index] for k, v in self.params.items()}
        return self.family.batch(params, shots, queries, generator)

    def recurring_tasks(self) -> TaskFamily:
        """The pool's tasks with fresh examples, as a task family (its ``sample`` is :meth:`recurring`)."""
        if self.params is None:
            self.recurring(1, 1, 1)  # raises the one-line error
        return _Recurring(self)

    def __repr__(self) -> str:
        return f"TaskPool({self.family!r}, tasks={self.num_tasks}, examples={self.examples})"


class _Recurring:
    """A pool's tasks with fresh examples (:meth:`TaskPool.recurring`) as a :class:`TaskFamily`."""

    def __init__(self, pool: TaskPool) -> None:
        self.pool, self.kind = pool, pool.kind

    def sample(self, num_tasks: int, shots: int, queries: int,
               generator: torch.Generator | None = None) -> TaskBatch:
        """``num_tasks`` pool tasks, each with fresh support and query examples."""
        return self.pool.recurring(num_tasks, shots, queries, generator)
