"""``python -m benchmarks.memory_accuracy``: the memory-versus-accuracy benchmark from a checkout.

The harness lives in :mod:`tvbase.bench.memory_accuracy` and is installed with tvbase as
``tvbase bench memory-accuracy``; this module runs the same program under its older name.
"""

import sys

from tvbase.bench.memory_accuracy import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks.memory_accuracy"))
