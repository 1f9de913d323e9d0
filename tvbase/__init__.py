"""tvbase: many fine-tunes of one base model as a compact, factorized task-vector basis."""

__version__ = "0.1.0"
