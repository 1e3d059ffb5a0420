"""``python -m experiments``: the same command line as ``clip-compress``."""

import sys

from experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
