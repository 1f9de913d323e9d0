"""Rebuild task vectors (or weighted sums of them) from stored factors.

Pure tensor functions: no I/O, no randomness, ``torch.no_grad()``. The store reads factors
and hands them here one tensor at a time, so peak memory is one tensor plus its factors.
"""

import torch

from .factors import matrix_shape
from .ingest.quantize import dequantize


@torch.no_grad()
def rebuild_tensor(shape, terms, device="cpu"):
    """Rebuild ``sum_k alpha_k * tau_k`` for one tensor, combining coefficients first.

    Parameters
    ----------
    shape : tuple of int
        Shape of the tensor in the base model.
    terms : list of (alpha, shared, task_tensor)
        ``alpha`` : float, the task's coefficient; ``shared`` : SharedBasis or None, the basis of
        the task's cluster for this tensor; ``task_tensor`` : TaskTensor.
    device : str or torch.device

    Returns
    -------
    torch.Tensor of shape ``shape``, float32, on ``device``.

    Notes
    -----
    Tasks of one cluster share ``U`` and ``V``, so ``sum alpha_t U C_t V^T = U (sum alpha_t C_t) V^T``:
    one product per cluster whatever the number of terms. Per-task low-rank terms are stacked
    into a single ``[alpha_t A_t] @ [B_t]^T`` product.
    """
    mshape = matrix_shape(shape)
    if mshape is None:
        out = torch.zeros(int(torch.Size(shape).numel()), device=device)
        for alpha, _, tt in terms:
            if tt.dense is not None:
                out += alpha * dequantize(tt.dense, device=device)[:, 0]
        return out.reshape(shape)

    m, n = mshape
    out = torch.zeros(m, n, device=device)
    # group cores by basis object: one U (sum alpha C) V^T per cluster
    cores = {}
    for alpha, shared, tt in terms:
        if tt.core is not None:
            key = id(shared)
            core = alpha * dequantize(tt.core, device=device)
            if key in cores:
                cores[key] = (shared, cores[key][1] + core)
            else:
                cores[key] = (shared, core)
    for shared, core_sum in cores.values():
        U = dequantize(shared.U, device=device)  # (m, r_u)
        V = dequantize(shared.V, device=device)  # (n, r_v)
        out += U @ core_sum @ V.T
    lowrank = [(alpha, tt) for alpha, _, tt in terms if tt.A is not None]
    if lowrank:
        A = torch.cat([alpha * dequantize(tt.A, device=device) for alpha, tt in lowrank], dim=1)  # (m, sum q)
        B = torch.cat([dequantize(tt.B, device=device) for _, tt in lowrank], dim=1)  # (n, sum q)
        out += A @ B.T
    return out.reshape(shape)
