"""Factorization methods: the registry, tvbase's own methods and the Task Vector Bases seeds.

- :mod:`.registry`: :data:`METHODS` by name (``tvbase``, ``svd``, ``pca``, ``autoencoder``,
  ``cluster-merge``), each with its reference and parameters;
- :mod:`.tucker`: :class:`FitParams`, cluster-shared Tucker-2 + residuals, per-task SVD;
- :mod:`.seed`: the seed bases of Zeng et al. (2025);
- :mod:`.cluster`, :mod:`.budget`: task clustering and rank allocation;
- :mod:`.result`: :class:`FitResult` and the error pass every method ends with.
"""

from .registry import METHODS, Method, get_method
from .result import FitResult, raw_bytes
from .tucker import FitParams

__all__ = ["METHODS", "FitParams", "FitResult", "Method", "get_method", "raw_bytes"]
