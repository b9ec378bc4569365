"""``python -m mamlab``: the command line (a Ctrl-C while PyTorch loads is one line, exit 130)."""

from mamlab.launch import run

run()
