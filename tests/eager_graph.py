"""``GraphedMetaGradient`` with the CUDA capture replaced by an eager re-run, to test its logic on the CPU.

A capture records a step without running it, and each replay writes into the tensors recorded;
``EagerGraph`` does the same with eager calls: recording runs the step once and undoes its effects
(buffers, random state), a replay runs it again and copies the results into the recorded tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mamlab.core.graphs import GraphedMetaGradient, check_capturable

__all__ = ["EagerGraph"]


class EagerGraph(GraphedMetaGradient):
    """The wrapper with the capture replaced: a replay runs the step again into the recorded tensors."""

    def _check(self, algorithm, device) -> None:
        check_capturable(algorithm, torch.device("cuda"))  # the CPU stands in for a CUDA device

    def _random_state(self, state=None):
        if state is None:
            return torch.get_rng_state()
        torch.set_rng_state(state)
        return None

    def _warm_up(self) -> None:
        for _ in range(self.warmup):
            self._step()

    def _record(self):
        with self._leaving_no_trace():  # a capture records without running
            loss, grads = self._step()

        def replay() -> None:
            new_loss, new_grads = self._step()
            loss.copy_(new_loss)
            for old, new in zip(grads, new_grads, strict=True):
                if old is not None:
                    old.copy_(new)

        return SimpleNamespace(replay=replay), (loss, grads)
