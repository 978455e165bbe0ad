"""``python -m fastjac``: the command-line jobs of :mod:`fastjac.cli` (this file is only the entry point)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
