"""Packed storage for the peers of the memory-accuracy benchmark: what a file of each method
would hold, so that its bytes are counted as written, not as simulated floats.

- :func:`pack_uint` / :func:`unpack_uint`: unsigned codes of any width from 1 to 32 bits, packed
  back to back (``ceil(n * bits / 8)`` bytes); a 3-bit code costs 3 bits, not a byte.
- :func:`pack_positions` / :func:`unpack_positions`: the positions of the kept entries of a
  sparse tensor, as the smaller of a bitmap (1 bit per entry) and Golomb-Rice coded gaps
  (Golomb 1966, Rice 1979: about the entropy of a random mask, 0.08-0.1 bits per entry at 1%
  density), with a one-byte tag saying which.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["pack_positions", "pack_uint", "unpack_positions", "unpack_uint"]


def pack_uint(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integer codes in ``[0, 2**bits)`` packed back to back, first code in the lowest
    bits: uint8 of shape ``(ceil(n * bits / 8),)``."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be 1..32, got {bits}")
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{codes.min()}, {codes.max()}]")
    planes = (codes.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & 1  # (n, bits)
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_uint(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_uint`: ``count`` codes, int64."""
    flat = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits, bitorder="little")
    planes = flat.reshape(count, bits)  # (count, bits) uint8: one plane at a time keeps it small
    codes = np.zeros(count, dtype=np.int64)
    for b in range(bits):
        codes |= planes[:, b].astype(np.int64) << b
    return codes


_BITMAP, _RICE = 0, 1


def _rice_parameter(n_kept: int, n: int) -> int:
    """Golomb-Rice parameter k for gaps of a random mask of density n_kept / n: gaps are about
    geometric with mean n / n_kept, and 2**k near ln(2) times the mean is close to optimal."""
    if n_kept == 0:
        return 0
    return max(0, int(math.floor(math.log2(max(1.0, math.log(2) * n / n_kept)))))


def _rice_bits(gaps: np.ndarray, k: int) -> int:
    return int((gaps >> k).sum()) + gaps.size * (1 + k)


def pack_positions(mask: np.ndarray) -> np.ndarray:
    """The ``True`` positions of a boolean array (flattened), as uint8: a tag byte, then either
    a bitmap or, when smaller, the Rice parameter ``k`` and the kept count (5 bytes), the unary
    quotients of the gaps between kept positions (``q`` ones and a zero each) and their ``k``-bit
    remainders (:func:`pack_uint`). Two streams instead of interleaved codes: the same bits,
    decoded without a loop."""
    mask = np.asarray(mask, dtype=np.bool_).reshape(-1)
    bitmap = np.concatenate([[_BITMAP], np.packbits(mask, bitorder="little")]).astype(np.uint8)
    kept = np.flatnonzero(mask)
    k = _rice_parameter(kept.size, mask.size)
    gaps = np.diff(kept, prepend=-1) - 1  # >= 0
    if math.ceil(_rice_bits(gaps, k) / 8) + 8 >= bitmap.size:
        return bitmap
    quotients = gaps >> k
    unary = np.ones(int(quotients.sum()) + kept.size, dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 0  # each quotient's terminating zero
    header = np.array([_RICE, k], dtype=np.uint8).tobytes() + np.uint32(kept.size).tobytes()
    parts = [np.frombuffer(header, dtype=np.uint8), np.packbits(unary, bitorder="little")]
    if k:
        parts.append(pack_uint(gaps & ((1 << k) - 1), k))
    return np.concatenate(parts)


def unpack_positions(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_positions`: a boolean array of ``n`` entries."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed[0] == _BITMAP:
        return np.unpackbits(packed[1:], count=n, bitorder="little").astype(np.bool_)
    k, n_kept = int(packed[1]), int(packed[2:6].view(np.uint32)[0])
    mask = np.zeros(n, dtype=np.bool_)
    if n_kept == 0:
        return mask
    unary = np.unpackbits(packed[6:], bitorder="little")
    ends = np.flatnonzero(unary == 0)[:n_kept]  # terminating zeros, in order
    quotients = np.diff(ends, prepend=-1) - 1
    unary_bytes = math.ceil((int(ends[-1]) + 1) / 8)
    remainders = unpack_uint(packed[6 + unary_bytes:], k, n_kept) if k else 0
    gaps = (quotients << k) + remainders
    mask[np.cumsum(gaps + 1) - 1] = True
    return mask
