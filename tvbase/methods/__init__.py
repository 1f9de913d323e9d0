"""Factorization methods: the registry, tvbase's own methods and the Task Vector Bases seeds.

- :mod:`.registry`: :data:`METHODS` by name (``tvbase``, ``svd``, ``pca``, ``autoencoder``,
  ``cluster-merge``), each with its reference and parameters;
- :mod:`.params`: :class:`FitParams` (no torch: the registry and params are what the CLI reads);
- :mod:`.tucker`: cluster-shared Tucker-2 + residuals, per-task SVD;
- :mod:`.seed`: the seed bases of Zeng et al. (2025);
- :mod:`.cluster`, :mod:`.budget`: task clustering and rank allocation;
- :mod:`.result`: :class:`FitResult` and the error pass every method ends with.
"""

from .params import FitParams
from .registry import METHODS, Method, get_method

__all__ = ["METHODS", "FitParams", "Method", "get_method"]
