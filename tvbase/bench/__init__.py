"""tvbase's benchmark harness, installed with the package so that ``tvbase bench`` can run it.

- :mod:`tvbase.bench.memory_accuracy` — storage against accuracy (and composition) of tvbase and
  published task-vector compressors on the digits zoos and a pretrained text transformer zoo;
  ``tvbase bench memory-accuracy`` (or,
  from a checkout, ``python -m benchmarks.memory_accuracy``).
- :mod:`tvbase.bench.baselines` — the compressors tvbase is compared with.
- :mod:`tvbase.bench.report` — the one writer of ``RESULTS.md`` sections, shared with the
  benchmarks that run only from a checkout (``benchmarks/theory``, ``benchmarks/reliability.py``).

Nothing here is imported by ``import tvbase``, and this file imports nothing: ``tvbase bench``
reads the descriptions below without loading a harness.
"""

DESCRIPTIONS = {
    "memory-accuracy": "Storage against accuracy of tvbase and published task-vector compressors on the digits zoos "
    "and a pretrained MiniLM text zoo.",
}
