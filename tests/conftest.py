"""Session-wide test settings: one torch thread, and mamlab's dataset cache in a temporary directory."""

from __future__ import annotations

import pytest
import torch

# The test models are tiny: one intra-op thread is as fast and does not stall when the other core
# is busy (see benchmarks/speed.py and the README's note on threads).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point MAMLAB_CACHE_DIR at a temporary folder so tests never write to ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MAMLAB_CACHE_DIR", str(tmp_path_factory.mktemp("mamlab-cache")))
    yield
    mp.undo()


@pytest.fixture
def float64():
    """Gradients are compared in float64: the default dtype for the test, restored after it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
