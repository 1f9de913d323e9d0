"""LoRA adapters stored from their own factors: no fit, nothing densified.

An adapter's update of a matrix is ``L R^T`` of rank ``r`` (see :class:`tvbase.io.lora.LoraAdapter`).
It is stored as the task's own low-rank term ``A B^T`` in SVD form
(:func:`tvbase.reconstruct.svd_form`: two thin QRs and an r x r SVD). The product is unchanged;
the SVD form puts the energy in the leading columns and gives each factor column its own
quantization scale, as every stored low-rank term does. Weights the adapter saves
whole are stored as rows (matrices: every row its own scale) or densely (vectors).
"""

import torch

from ..codec import matrix_shape
from ..codec.factors import TaskTensor
from ..codec.quantize import dequantize, quantize
from ..reconstruct import svd_form
from .result import FitResult
from .tucker import _column_signs

KIND = "lora"  # the task kind recorded in the store


@torch.no_grad()
def fit_lora(sources, shapes, params):
    """Store each LoRA adapter's factors as they are, quantized at ``params.lora_bits``.

    Parameters
    ----------
    sources : dict task -> LoraAdapter
    shapes : dict tensor name -> shape of the base
    params : FitParams

    Returns
    -------
    FitResult with every task on its own (label None, kind ``"lora"``) and its exact relative
    error, computed from the factors without forming an m x n matrix.
    """
    result = FitResult(method=KIND)
    bits = params.lora_bits
    for task, source in sources.items():
        tensors, error, energy = {}, 0.0, 0.0
        for name, shape in shapes.items():
            tt = tensors[name] = TaskTensor()
            pair = source.factors(name)
            if pair is not None:
                tt.A, tt.B, e, total = _lowrank(*pair, bits)
            else:
                x = source.whole(name)
                if x is None:
                    continue
                tt.rows, tt.row_ids, tt.dense, e, total = _whole(x, shape, bits)
            error, energy = error + e, energy + total
        result.tasks[task], result.labels[task], result.kind[task] = tensors, None, KIND
        result.energy[task] = energy
        result.rel_error[task] = (error / energy) ** 0.5 if energy > 0 else 0.0
    return result


def _lowrank(left, right, bits):
    """(A, B) quantized, with ``||L R^T - A B^T||^2`` and ``||L R^T||^2``, for ``left`` (m, r),
    ``right`` (n, r)."""
    a, b, s = svd_form(left, right)  # (m, r), (n, r), (r,)
    kept = s > s[:1] * 1e-7  # columns with nothing in them are not stored
    a, b = a[:, kept], b[:, kept]  # (m, q), (n, q)
    signs = _column_signs(a)
    qa, qb = quantize((a * signs).float(), bits), quantize((b * signs).float(), bits)
    A, B = dequantize(qa).double(), dequantize(qb).double()
    left, right = left.double(), right.double()

    def inner(x1, y1, x2, y2):  # <x1 y1^T, x2 y2^T>, through r x r products only
        return float(((x1.T @ x2) * (y1.T @ y2)).sum())

    total = inner(left, right, left, right)
    error = total - 2 * inner(left, right, A, B) + inner(A, B, A, B)
    return qa, qb, max(error, 0.0), total


def _whole(x, shape, bits):
    """(rows, row_ids, dense, squared error, energy) of a delta saved whole: a matrix as all of
    its rows kept whole, anything else as one dense column."""
    mshape = matrix_shape(shape)
    if mshape is None:
        dense = quantize(x.reshape(-1, 1), bits)  # (numel, 1)
        rebuilt = dequantize(dense)[:, 0]
        rows = row_ids = None
    else:
        m, _ = mshape
        x = x.reshape(mshape)
        rows = quantize(x.T.contiguous(), bits)  # (n, m): a scale per row
        row_ids = quantize(torch.arange(m, dtype=torch.float32)[None], 32)  # (1, m), exact
        rebuilt, dense = dequantize(rows).T, None
    x = x.reshape(rebuilt.shape)
    return rows, row_ids, dense, float((rebuilt - x).double().square().sum()), float(x.double().square().sum())
