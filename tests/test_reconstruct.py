"""Rebuilds of one tensor from its factors: every product form gives the same sum."""

import pytest
import torch

from tvbase.codec.factors import SharedBasis, TaskTensor
from tvbase.codec.quantize import dequantize, quantize
from tvbase.reconstruct import _core_into_u, factor_tensor, rebuild_tensor


def _cluster(m, n, r_u, r_v, q, seed=0):
    """Two tasks of one cluster: a basis (U (m, r_u), V (n, r_v)), cores, per-task factors; fp32."""
    gen = torch.Generator().manual_seed(seed)
    basis = SharedBasis(U=quantize(torch.randn(m, r_u, generator=gen), 32), V=quantize(torch.randn(n, r_v, generator=gen), 32))
    return [
        (alpha, basis, TaskTensor(core=quantize(torch.randn(r_u, r_v, generator=gen), 32),
                                  A=quantize(torch.randn(m, q, generator=gen), 32), B=quantize(torch.randn(n, q, generator=gen), 32)))
        for alpha in (0.7, -0.4)
    ]


def _reference(terms):
    """``sum alpha (U C V^T + A B^T)`` in float64, term by term."""
    total = 0
    for alpha, basis, tt in terms:
        U, V, C = (dequantize(x).double() for x in (basis.U, basis.V, tt.core))
        A, B = dequantize(tt.A).double(), dequantize(tt.B).double()
        total = total + alpha * (U @ C @ V.T + A @ B.T)
    return total


# (m, n, r_u, r_v, whether the core goes into U): multiplications m r_v (r_u + n) into U against
# n r_u (r_v + m) into V; 900 x 60 with ranks 24 and 16: 1.21M against 1.32M
@pytest.mark.parametrize("m, n, r_u, r_v, into_u", [(900, 60, 20, 20, False), (60, 900, 20, 20, True),
                                                    (900, 60, 24, 16, True), (200, 200, 20, 20, True)])
def test_the_core_folds_into_the_cheaper_side_and_the_sum_is_unchanged(m, n, r_u, r_v, into_u):
    terms = _cluster(m, n, r_u, r_v, q=5)
    assert _core_into_u(terms[0][1]) == into_u
    expected = _reference(terms)
    rebuilt = rebuild_tensor((m, n), terms)
    assert rebuilt.shape == (m, n)
    assert torch.allclose(rebuilt.double(), expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))
    L, R = factor_tensor((m, n), terms)
    assert L.shape[1] == R.shape[1] == (r_v if into_u else r_u) + 2 * 5
    assert torch.allclose((L.double() @ R.double().T), expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))
