"""``python -m tools.bench``: the same as ``python tools/bench.py``."""

import sys

from .runner import main

sys.exit(main(prog="python -m tools.bench"))
