"""``python -m compress``: the same command line as ``clip-compress``.

The CLI lives in ``experiments`` (which may import everything); it is imported lazily here,
like the registry's plug-ins, so that ``compress`` itself never depends on it at import time.
"""

import importlib
import sys

if __name__ == "__main__":
    sys.exit(importlib.import_module("experiments.cli").main())
