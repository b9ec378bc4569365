"""Session-wide test settings: keep mamlab's dataset cache inside pytest's temporary directory."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point MAMLAB_CACHE_DIR at a temporary folder so tests never write to ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MAMLAB_CACHE_DIR", str(tmp_path_factory.mktemp("mamlab-cache")))
    yield
    mp.undo()
