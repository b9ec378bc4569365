"""``python -m mamlab``: the command line."""

import sys

from mamlab.cli import main

sys.exit(main())
