"""How much memory autograd graphs hold: the peak bytes of tensors saved for backward, alive at once.

Every tensor autograd saves (forward and double backward alike) is wrapped while ``fn`` runs; a
wrapper lives exactly as long as the graph that saved it, so the running sum of live wrappers is
the memory that graphs hold, which is what grows with the inner steps when an algorithm
differentiates through them. It counts on any device, unlike ``torch.cuda.max_memory_allocated``,
and leaves out parameters, gradients and temporaries, which do not depend on the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["peak_saved_bytes"]


def peak_saved_bytes(fn: Callable[[], object]) -> int:
    """The peak total bytes of tensors saved for backward and alive at once while ``fn()`` runs."""
    state = {"live": 0, "peak": 0}

    class Held:
        def __init__(self, t: torch.Tensor) -> None:
            self.t, self.size = t, t.numel() * t.element_size()
            state["live"] += self.size
            state["peak"] = max(state["peak"], state["live"])

        def __del__(self) -> None:
            state["live"] -= self.size

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        fn()
    return state["peak"]
