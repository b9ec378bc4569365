"""The ``mamlab`` program's entry point: load the command line, answering a Ctrl-C while it loads.

Loading PyTorch takes a second or two; a Ctrl-C in that time would otherwise end in Python's
traceback. This module imports nothing heavy itself, so it can catch it.
"""

from __future__ import annotations

import sys
from typing import NoReturn

__all__ = ["run"]


def run() -> NoReturn:
    """Import :mod:`mamlab.cli` and run it; a Ctrl-C during the import is ``mamlab: interrupted``, 130."""
    try:
        from mamlab.cli import run as cli_run
    except KeyboardInterrupt:
        sys.stderr.write("mamlab: interrupted\n")
        sys.exit(130)
    cli_run()
