"""In-memory containers for stored factors, shared by the methods, the store format and reconstruction.

A task vector is stored tensor by tensor. A 2-D weight (conv kernels flattened to 2-D) of
shape (m, n) is rebuilt as::

    tau ~= U @ core @ V.T  +  A @ B.T

``U`` (m, r_u) and ``V`` (n, r_v) are shared by every task of one cluster (Tucker-2); ``core``
(r_u, r_v) belongs to the task; ``A`` (m, q), ``B`` (n, q) are a per-task low-rank term (the
residual of the shared fit, or the whole task for tasks stored as per-task SVD). A vocabulary
matrix may also keep a few rows whole: ``rows`` (n, s) holds them as columns (so each row gets
its own quantization scale) and ``row_ids`` (1, s) their row numbers, exact integers in float32:
``tau[row_ids[j]] += rows[:, j]``. Tensors that are not matrices (biases, norms, 1 x n rows) are
stored densely as a (numel, 1) column. A fine-tune that added tokens has more rows in its
embedding or head than the base: the rows the base has are stored as above, the ``k`` new
ones whole in ``new_rows`` (n, k), each as a column of the fine-tune's values (there is no
base row to subtract), ``n`` being the size of one row (1 for a vector).

A matrix may also add a *sparse residual*: ``sparse`` (k, 1) holds what the factors above
leave of the task at k seeded random entries, divided by the fraction kept, and
``sparse_mask`` the (seed, threshold) that those entries' positions follow from
(:mod:`tvbase.codec.sparse`; kept in the task's metadata, not the payload).

The seed-basis methods of Task Vector Bases (PCA, Gram autoencoder, cluster merge) store instead,
for every tensor, a basis ``S`` (numel, M) and optionally a mean ``mu`` (numel, 1) shared by all
their tasks, and per task one coefficient vector ``c_t`` (M,): ``tau ~= mu + S @ c_t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: reading a store's layout needs no torch
    from .quantize import QuantizedMatrix


def matrix_shape(shape):
    """The (m, n) a tensor of ``shape`` is factorized as, or ``None`` if it is stored densely.

    Conv kernels (out, in, kh, kw) become (out, in*kh*kw). Vectors, scalars and matrices with
    a side of 1 gain nothing from factorization.
    """
    if len(shape) < 2:
        return None
    m, n = int(shape[0]), math.prod(int(s) for s in shape[1:])
    if min(m, n) < 2:
        return None
    return m, n


@dataclass
class SharedBasis:
    """Factors of one tensor shared by a cluster's tasks: Tucker-2 ``U`` (m, r_u) and ``V``
    (n, r_v), or a seed basis ``S`` (numel, M) with an optional mean ``mu`` (numel, 1)."""

    U: QuantizedMatrix | None = None
    V: QuantizedMatrix | None = None
    S: QuantizedMatrix | None = None
    mu: QuantizedMatrix | None = None

    @property
    def nbytes(self):
        return sum(p.nbytes for p in (self.U, self.V, self.S, self.mu) if p is not None)

    def parts(self):
        """(role, matrix) pairs of the parts present, in a fixed order."""
        return [(role, p) for role, p in zip(("U", "V", "S", "mu"), (self.U, self.V, self.S, self.mu)) if p is not None]


@dataclass
class TaskTensor:
    """What one task stores for one tensor; unused parts are ``None``."""

    core: QuantizedMatrix | None = None  # (r_u, r_v), needs the cluster's SharedBasis
    A: QuantizedMatrix | None = None  # (m, q)
    B: QuantizedMatrix | None = None  # (n, q)
    rows: QuantizedMatrix | None = None  # (n, s): s rows of the matrix kept whole, as columns
    row_ids: QuantizedMatrix | None = None  # (1, s) float32: their row numbers
    dense: QuantizedMatrix | None = None  # (numel, 1)
    new_rows: QuantizedMatrix | None = None  # (n, k): rows the fine-tune added after the base's (tokens), as columns
    sparse: QuantizedMatrix | None = None  # (k, 1): the residual at k random entries, rescaled
    coef: tuple | None = None  # (M,) seed-basis coefficients; kept in metadata, not the payload
    sparse_mask: tuple | None = None  # (seed, threshold) of sparse's positions; kept in metadata

    _ROLES = ("core", "A", "B", "rows", "row_ids", "dense", "new_rows", "sparse")

    @property
    def nbytes(self):
        return sum(p.nbytes for _, p in self.parts())

    def parts(self):
        """(role, matrix) pairs of the parts present, in a fixed order."""
        return [(role, getattr(self, role)) for role in self._ROLES if getattr(self, role) is not None]


