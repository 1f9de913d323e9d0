"""tvbase benchmarks: seeded scripts that record device, dtype and versions with their results.

- :mod:`benchmarks.memory_accuracy` — storage against accuracy (and composition) of tvbase and
  published task-vector compressors on the digits zoo; ``python -m benchmarks.memory_accuracy``.
- :mod:`benchmarks.baselines` — the compressors tvbase is compared with, and the coefficient
  selection rules of task addition and negation.
"""
