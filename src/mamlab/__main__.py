"""``python -m mamlab``: the command line."""

from mamlab.cli import run

run()
