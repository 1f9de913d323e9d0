"""Error metrics for comparing rebuilt tensors with the true ones, in tests and benchmarks.

- :func:`relative_error`: the relative Frobenius error over a whole task vector (a dict of
  tensors), ``||approx - exact|| / ||exact||``.
- :func:`max_relative_error`: the largest entry error of one tensor, relative to its largest
  entry.

Both compute in float64 on the CPU whatever the inputs' dtype and device.
"""

import math
from collections.abc import Mapping

import torch

__all__ = ["relative_error", "max_relative_error"]


def _float64(t):
    return t.detach().to(device="cpu", dtype=torch.float64)


def relative_error(approx, exact):
    """Relative Frobenius error of ``approx`` against ``exact`` over every tensor of ``exact``.

    ``sqrt(sum_n ||approx[n] - exact[n]||^2 / sum_n ||exact[n]||^2)``, the sums over the names
    of ``exact`` (names only in ``approx`` are ignored), each tensor's sum of squares in float64.

    Parameters
    ----------
    approx : dict of str to Tensor, or Tensor
        The rebuilt tensors: every name of ``exact``, each of the same shape (any float dtype,
        any device).
    exact : dict of str to Tensor, or Tensor
        The true tensors. Two plain tensors are compared as one-tensor dicts.

    Returns
    -------
    float
        The relative error; ``0.0`` when ``exact`` is all zero (or empty) and ``approx`` equals
        it, ``inf`` when ``exact`` is all zero and ``approx`` is not.

    Raises
    ------
    KeyError
        If ``approx`` lacks a name of ``exact``.
    ValueError
        If a tensor of ``approx`` has another shape than its counterpart in ``exact``.
    """
    if isinstance(exact, torch.Tensor) and isinstance(approx, torch.Tensor):
        approx, exact = {"": approx}, {"": exact}
    if not isinstance(exact, Mapping) or not isinstance(approx, Mapping):
        raise TypeError("relative_error compares two dicts of tensors, or two tensors")
    err = total = 0.0
    for name, e in exact.items():
        a = approx[name]
        if tuple(a.shape) != tuple(e.shape):
            raise ValueError(f"{name!r}: approx has shape {tuple(a.shape)}, exact {tuple(e.shape)}")
        e = _float64(e)
        err += float((_float64(a) - e).square().sum())
        total += float(e.square().sum())
    if total == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return math.sqrt(err / total)


def max_relative_error(actual, expected):
    """``max |actual - expected| / max |expected|`` of one tensor, in float64.

    Parameters
    ----------
    actual : Tensor
        Any shape that broadcasts against ``expected`` (normally the same shape).
    expected : Tensor
        The true values.

    Returns
    -------
    float
        The largest absolute entry error relative to the largest absolute expected entry. When
        ``expected`` is all zero it is the largest absolute error itself (so 0 when both are
        zero); 0 when ``expected`` is empty.
    """
    actual, expected = _float64(actual), _float64(expected)
    if not expected.numel():
        return 0.0
    denom = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    if denom == 0.0:
        return err
    return err / denom
