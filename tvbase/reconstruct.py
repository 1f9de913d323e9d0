"""Rebuild task vectors (or weighted sums of them) from stored factors.

Pure tensor functions: no I/O, nothing random (the probes of bfloat16 products are seeded),
``torch.no_grad()``. The store reads factors and hands them here one tensor at a time, so peak
memory is one tensor plus its factors.
"""

import math

import torch

from .codec import matrix_shape
from .codec.quantize import dequantize
from .codec.sparse import checked_positions
from .errors import IntegrityError

# Reads may move a task's recorded relative error by at most this fraction through bfloat16
# rounding. Rounding is noise of its own, adding to the fit's error in quadrature: a tensor whose
# rounding is at most ``e * sqrt(2 * BF16_ERROR_SHARE)`` of its norm, for a task of recorded error
# ``e``, moves ``e`` by at most BF16_ERROR_SHARE (:func:`bf16_tolerance`).
BF16_ERROR_SHARE = 1e-3
# The least relative rounding a bfloat16 product leaves (2**-8; measured 0.26-0.38% on GPT-2 and
# BERT-base stores): below it a tolerance would send nearly every product back to float32.
_BF16_FLOOR = 2.0**-8
# Matrices of fewer entries multiply in float32: bfloat16 gains nothing measurable there, and the
# rounding (whose per-column scale part has few degrees of freedom) can correlate with the fit's
# error instead of adding to it in quadrature: it moved a task's error by 0.12% on the 1000 x 48
# embedding of a test zoo, against 0.005-0.009% on GPT-2 small (benchmarks/RESULTS.md).
_BF16_MIN_ENTRIES = 1 << 18
_PROBES = 8  # seeded Gaussian probe vectors that measure a bfloat16 product's rounding ...
_PROBE_ROWS = 1024  # ... on about this many of its rows, evenly spaced (all of a smaller matrix)


def bf16_tolerance(rel_errors):
    """The largest relative rounding a tensor may take from bfloat16 products in a read of tasks
    with these recorded errors (see ``BF16_ERROR_SHARE``), or None where bfloat16 could not meet
    it: float32 products."""
    tolerance = min(rel_errors, default=0.0) * math.sqrt(2 * BF16_ERROR_SHARE)
    return tolerance if tolerance >= _BF16_FLOOR else None


@torch.no_grad()
def rebuild_tensor(shape, terms, device="cpu", bf16_tolerance=None):
    """Rebuild ``sum_k alpha_k * tau_k`` for one tensor, combining coefficients first.

    Parameters
    ----------
    shape : tuple of int
        Shape of the tensor in the base model.
    terms : list of (alpha, shared, task_tensor)
        ``alpha`` : float, the task's coefficient; ``shared`` : SharedBasis or None, the basis of
        the task's cluster for this tensor; ``task_tensor`` : TaskTensor.
    device : str or torch.device
    bf16_tolerance : float or None, default None (float32 products)
        Multiply the factors of a matrix in bfloat16 (float32 accumulation) where every factor
        holds integer codes of at most 8 bits, and keep the result where its rounding, measured
        on seeded probe vectors against the float32 factors, is at most this fraction of the
        product's norm; else multiply again in float32. The codes are exact in bfloat16; rounding
        the scales and the product adds a relative 2**-9 per entry, while AVX-512 BF16, AMX and
        tensor cores multiply 4-14x faster (benchmarks/RESULTS.md). Reads pass
        :func:`bf16_tolerance` of the tasks' recorded errors where the device has such units
        (:func:`tvbase.devices.bf16_products`); the fit does not (its error bookkeeping
        subtracts nearly equal sums).

    Returns
    -------
    torch.Tensor of shape ``shape``, float32, on ``device``; with more rows when a task added
    rows after the base's (``new_rows``): as many as the task that added most, the rows a task
    lacks counting as zero.

    Notes
    -----
    Tasks of one cluster share ``U`` and ``V``, so ``sum alpha_t U C_t V^T = U (sum alpha_t C_t) V^T``:
    one term per cluster whatever the number of tasks. Those terms and every task's low-rank
    ``alpha_t A_t B_t^T`` are stacked into a single product per matrix.
    """
    return _add_new_rows(_rebuild_base_rows(shape, terms, device, bf16_tolerance), terms, device)


def _add_new_rows(out, terms, device):
    """``out`` (the base's shape) grown by the rows tasks added after the base's, weighted."""
    added = [(alpha, dequantize(tt.new_rows, device=device).T) for alpha, _, tt in terms if tt.new_rows is not None]  # (k, n)
    if not added:
        return out
    m = out.shape[0]
    grown = torch.zeros(m + max(len(rows) for _, rows in added), *out.shape[1:], device=device)
    grown[:m] = out
    flat = grown.view(grown.shape[0], -1)  # (m + k_max, n)
    for alpha, rows in added:
        flat[m : m + len(rows)].add_(rows, alpha=alpha)
    return grown


def _rebuild_base_rows(shape, terms, device, bf16_tolerance=None):
    numel = int(torch.Size(shape).numel())
    mshape = matrix_shape(shape)
    out = torch.zeros(*(mshape or (numel,)), device=device)  # reshaped at the end
    if mshape is not None:  # the products first, into zeros: a rejected bfloat16 one is redone alone
        _add_products(out, terms, device, bf16_tolerance if _integer_codes(terms) else None)
    _add_seed_terms(out.view(-1), terms, device)
    if mshape is None:
        for alpha, _, tt in terms:
            if tt.dense is not None:
                out += alpha * dequantize(tt.dense, device=device)[:, 0]
        return out.reshape(shape)

    m, n = mshape
    for alpha, _, tt in terms:
        if tt.rows is not None:  # rows kept whole: (n, s) columns added to rows row_ids
            ids = dequantize(tt.row_ids, device=device)[0].long()  # (s,)
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= m):
                raise IntegrityError(f"stored row numbers fall outside the matrix's {m} rows; run `tvbase verify`")
            out.index_add_(0, ids, dequantize(tt.rows, device=device).T, alpha=alpha)
    for alpha, _, tt in terms:
        if tt.sparse is not None:
            out.view(-1).index_add_(0, _sparse_positions(m * n, tt, device), dequantize(tt.sparse, device=device)[:, 0], alpha=alpha)
    return out.reshape(shape)


def _integer_codes(terms):
    """Whether every factor of a matrix's products holds integer codes of at most 8 bits."""
    factors = [tt.A for _, _, tt in terms if tt.A is not None] + [tt.B for _, _, tt in terms if tt.B is not None]
    factors += [tt.core for _, _, tt in terms if tt.core is not None]
    factors += [q for _, shared, tt in terms if shared is not None and tt.core is not None for q in (shared.U, shared.V)]
    return all(q.bits <= 8 for q in factors)


# entries of a bfloat16 product formed at a time: the block of ``out`` (4 MiB) and its product
# (2 MiB) stay in cache while the product is added (10% faster than 64 MiB blocks)
_PRODUCT_BLOCK_ENTRIES = 1 << 20


def _add_products(out, terms, device, bf16_tolerance=None):
    """``out`` (m, n) float32, all zeros, += every shared and low-rank term, as one product of
    operands ``left`` (m, k) @ ``right`` (k, n) decoded straight into them: one pass over ``out``
    instead of one per term (a third faster on a 50257 x 768 embedding, 3 clusters, 8 tasks).

    In float32 the product accumulates in place (``addmm_``: no m x n temporary). In bfloat16
    (``bf16_tolerance`` given, at least ``_BF16_MIN_ENTRIES`` entries; float32 accumulation) it
    is formed by blocks of rows and kept where its rounding, measured on up to ``_PROBE_ROWS``
    evenly spaced rows ``S``, is within the tolerance: ``||(P_bf16 - P)[S] X|| <= tolerance
    sqrt(p) ||P_bf16[S]||`` for seeded Gaussian probes ``X`` (n, p) (``E ||D X||^2 = p ||D||^2``),
    ``P[S] X`` taken from the float32 factors at (|S| + n) k p multiplications; else ``out`` is
    zeroed and the product formed in float32."""
    bases = _sum_per_basis(terms, "core", device)  # [(basis, sum of alpha_t C_t (r_u, r_v))]
    lowrank = [(alpha, tt) for alpha, _, tt in terms if tt.A is not None]
    k = sum(_folded_rank(shared) for shared, _ in bases) + sum(tt.A.shape[1] for _, tt in lowrank)
    if k == 0:
        return
    m, n = out.shape
    if bf16_tolerance is not None and m * n >= _BF16_MIN_ENTRIES:
        probes = torch.randn(n, _PROBES, generator=torch.Generator(device).manual_seed(0), device=device)
        rows = slice(None, None, max(1, m // _PROBE_ROWS))
        left, right, exact = _operands(out.shape, bases, lowrank, k, torch.bfloat16, device, (rows, probes))
        step = max(1, _PRODUCT_BLOCK_ENTRIES // max(n, 1))
        for start in range(0, m, step):
            out[start:start + step] += left[start:start + step] @ right
        del left, right
        sampled = out[rows]
        rounding = float(torch.linalg.norm(sampled @ probes - exact))
        if rounding <= bf16_tolerance * _PROBES**0.5 * float(torch.linalg.norm(sampled)):
            return
        out.zero_()
    left, right, _ = _operands(out.shape, bases, lowrank, k, torch.float32, device)
    out.addmm_(left, right)


def _operands(shape, bases, lowrank, k, dtype, device, probe=None):
    """``(left (m, k), right (k, n), exact)`` of dtype ``dtype``: every basis's folded factors,
    then every task's ``alpha A``, ``B^T``. With ``probe = (rows, X)`` (a slice of rows, X (n, p)),
    ``exact`` is ``(left @ right)[rows] @ X`` from the float32 factors; else None."""
    (m, n), col = shape, 0
    left = torch.empty(m, k, dtype=dtype, device=device)
    right = torch.empty(k, n, dtype=dtype, device=device)
    exact = None
    if probe is not None:
        rows, probes = probe
        exact = torch.zeros(len(range(m)[rows]), probes.shape[1], device=device)

    def put(L, R):  # L (m, r), R (n, r) float32
        nonlocal col
        r = L.shape[1]
        left[:, col:col + r] = L
        right[col:col + r] = R.T
        if exact is not None:
            exact.addmm_(L[rows], R.T @ probes)
        col += r

    for shared, core_sum in bases:  # one basis's float32 factors alive at a time
        put(*_fold_core(shared, core_sum, device))
    for alpha, tt in lowrank:
        put(dequantize(tt.A, device=device).mul_(alpha), dequantize(tt.B, device=device))
    return left, right, exact


def _sparse_positions(numel, tt, device="cpu"):
    """The flat positions of a task's sparse residual in a matrix of ``numel`` entries."""
    if tt.sparse_mask is None:
        raise IntegrityError("a sparse residual is stored without the seed of its positions; run `tvbase verify`")
    pos, problem = checked_positions(numel, *tt.sparse_mask, tt.sparse.shape[0], device)
    if problem:
        raise IntegrityError(f"{problem}; run `tvbase verify`")
    return pos


@torch.no_grad()
def factor_tensor(shape, terms, device="cpu"):
    """``sum_k alpha_k * tau_k`` of one matrix as factors ``L @ R.T``, without forming it.

    Parameters
    ----------
    shape, terms, device : as for :func:`rebuild_tensor`.

    Returns
    -------
    (L, R) : torch.Tensor of shapes (m, k) and (n, k), float32, on ``device``; ``k`` is the sum
    of the terms' ranks (a shared term's ``r_u`` or ``r_v`` per cluster, whichever is cheaper,
    each low-rank term's ``q``, one per row kept whole), not reduced. None for a tensor that is
    not a matrix, or whose terms include a seed basis (``S``: dense, no factors). Sparse
    residuals (random entries, no factors) are left out: the factors are those of the sum
    without them.
    """
    mshape = matrix_shape(shape)
    if mshape is None or any(tt.coef is not None for _, _, tt in terms):
        return None
    m, n = mshape
    lefts, rights = [torch.zeros(m, 0, device=device)], [torch.zeros(n, 0, device=device)]
    for shared, core_sum in _sum_per_basis(terms, "core", device):
        left, right = _fold_core(shared, core_sum, device)
        lefts.append(left)
        rights.append(right)
    for alpha, _, tt in terms:
        if tt.A is not None:
            lefts.append(alpha * dequantize(tt.A, device=device))  # (m, q)
            rights.append(dequantize(tt.B, device=device))  # (n, q)
        if tt.rows is not None:  # rows kept whole: one-hot columns of their row numbers
            ids = dequantize(tt.row_ids, device=device)[0].long()  # (s,)
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= m):
                raise IntegrityError(f"stored row numbers fall outside the matrix's {m} rows; run `tvbase verify`")
            picks = torch.zeros(m, len(ids), device=device)
            picks[ids, torch.arange(len(ids), device=device)] = alpha
            lefts.append(picks)  # (m, s)
            rights.append(dequantize(tt.rows, device=device))  # (n, s)
    return torch.cat(lefts, dim=1), torch.cat(rights, dim=1)


def svd_form(left, right):
    """``left @ right.T`` (``left`` (m, k), ``right`` (n, k)) in SVD form, without forming it.

    Returns ``(L, R, s)``, float64: ``L = U diag(s)`` (m, k') and ``R = V`` (n, k') with
    orthonormal ``U``, ``V``, ``s`` (k',) descending, ``k' = min(k, m, n)``; from two thin QRs and
    an SVD of the small product of their triangles.
    """
    q_l, r_l = torch.linalg.qr(left.double())  # (m, k'), (k', k)
    q_r, r_r = torch.linalg.qr(right.double())  # (n, k'), (k', k)
    u, s, vh = torch.linalg.svd(r_l @ r_r.T, full_matrices=False)  # (k', k')
    return q_l @ (u * s), q_r @ vh.T, s


def _fold_core(shared, core_sum, device):
    """``U @ core_sum @ V.T`` of one basis as factors ``(L (m, k), R (n, k))``, the core folded
    into the side :func:`_core_into_u` picks: ``(U core, V)`` (``k = r_v``) or ``(U, V core^T)``
    (``k = r_u``)."""
    U = dequantize(shared.U, device=device)  # (m, r_u)
    V = dequantize(shared.V, device=device)  # (n, r_v)
    return (U @ core_sum, V) if _core_into_u(shared) else (U, V @ core_sum.T)


def _core_into_u(shared):
    """Whether ``(U core) V^T`` takes fewer multiplications than ``U (core V^T)``: on a
    50257 x 768 embedding with ``r_u = r_v = 256``, the second saves a quarter of them."""
    (m, r_u), (n, r_v) = shared.U.shape, shared.V.shape
    return m * r_v * (r_u + n) <= n * r_u * (r_v + m)


def _folded_rank(shared):
    """``k`` of :func:`_fold_core`'s factors, known before decoding them."""
    return shared.V.shape[1] if _core_into_u(shared) else shared.U.shape[1]


def _sum_per_basis(terms, part, device):
    """[(basis, sum of alpha_t * part_t over the basis's tasks)] for tasks with that part.

    Tasks are grouped by the identity of their basis object: the store hands every task of a
    cluster the same object for one tensor.
    """
    sums = {}
    for alpha, shared, tt in terms:
        value = getattr(tt, part)
        if value is None or shared is None:
            continue
        value = alpha * (dequantize(value, device=device) if part == "core" else torch.as_tensor(value, dtype=torch.float32, device=device))
        key = id(shared)
        sums[key] = (shared, sums[key][1] + value) if key in sums else (shared, value)
    return list(sums.values())


def _add_seed_terms(out, terms, device):
    """Add ``sum alpha_t (mu + S c_t) = (sum alpha_t) mu + S (sum alpha_t c_t)`` per basis to ``out``."""
    for shared, coef_sum in _sum_per_basis(terms, "coef", device):
        out += dequantize(shared.S, device=device) @ coef_sum  # (numel, M) @ (M,)
        if shared.mu is not None:
            alpha_sum = sum(alpha for alpha, s, tt in terms if s is shared and tt.coef is not None)
            out += alpha_sum * dequantize(shared.mu, device=device)[:, 0]
