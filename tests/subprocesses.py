"""What tests that start ``mamlab`` or ``torchrun`` in a subprocess share: a clean environment."""

from __future__ import annotations

import os

#: Variables torchrun sets; a child must not inherit them from a test runner started under torchrun.
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment (PYTHONPATH unchanged), one OpenMP thread, unbuffered output, no torchrun
    variables; ``extra`` adds or replaces variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in TORCHRUN_VARS:
        env.pop(var, None)
    env.update(extra)
    return env
