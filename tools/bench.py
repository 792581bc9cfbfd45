#!/usr/bin/env python3
"""Runs queuectl's benchmark suite, the package ``tools/bench/`` beside this file:
``python tools/bench.py --help``."""

import sys
from pathlib import Path

# Run as a script, this file is not the package of the same name beside it: import that
# package from the checkout's root, whatever the current directory.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
