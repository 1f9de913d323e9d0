"""tvbase benchmarks: seeded scripts that record device, dtype and versions with their results.

- ``python -m benchmarks.memory_accuracy`` — storage against accuracy (and composition) of tvbase
  and published task-vector compressors on the digits zoo. The harness and its baselines are
  installed with the package (:mod:`tvbase.bench.memory_accuracy`, :mod:`tvbase.bench.baselines`)
  and also run as ``tvbase bench memory-accuracy``; this module is a shim that calls it.
- :mod:`benchmarks.theory` — the claims of the theory paper, measured through tvbase.
- :mod:`benchmarks.reliability` — crash, concurrency, corruption and bad-input trials.

These run from a checkout only; all of them write their ``benchmarks/RESULTS.md`` sections through
:mod:`tvbase.bench.report`.
"""
