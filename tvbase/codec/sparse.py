"""Seeded random positions of a sparse residual: where a task keeps entries of what its factors miss.

A task may store, for a matrix, the residual its factors leave at a random fraction ``keep``
of the entries, divided by ``keep`` (random drop with rescaling, as DARE does to whole task
vectors): its expectation is the residual itself, and its error is spread over the matrix
instead of lying in the directions the factors left out. The positions are not stored. They
follow from two integers kept in the task's metadata, through a hash fixed here:

- element ``i`` of the row-major flattened (m, n) matrix is kept when
  ``fmix32(i XOR seed) >> 8 < threshold``, where ``fmix32`` is the 32-bit finalizer of
  MurmurHash3 in uint32 arithmetic, ``seed`` is :func:`tensor_seed` of the task's seed and the
  tensor's name, and ``threshold`` is ``keep * 2**24`` rounded (:func:`keep_threshold`);
- the kept values are stored in that (ascending) order, as a (k, 1) matrix of codes.

Positions of a smaller threshold are a subset of those of a larger one (same hash), and every
matrix holds fewer than 2**32 entries. Integer arithmetic only, so every machine and device
computes the same positions: numpy's uint32 on the CPU, exact int64 products on a GPU (where
hashing on the host would take longer than the rest of a rebuild).
"""

import zlib

import numpy as np

THRESHOLD_BITS = 24  # keep probabilities are multiples of 2**-24
_BLOCK = 1 << 20  # entries hashed at a time on the CPU: the temporaries stay in cache
_DEVICE_BLOCK = 1 << 22  # entries hashed at a time on a GPU (int64 temporaries of 32 MiB)
_MASK32 = 0xFFFFFFFF


def keep_threshold(keep):
    """The integer threshold of a keep probability in [0, 1]."""
    return int(min(max(round(float(keep) * 2**THRESHOLD_BITS), 0), 2**THRESHOLD_BITS))


def keep_fraction(threshold):
    """The keep probability of an integer threshold (the rescaling factor's inverse)."""
    return threshold / 2**THRESHOLD_BITS


def tensor_seed(task_seed, name):
    """The 32-bit seed of one tensor's positions, from the task's seed and the tensor's name."""
    mixed = np.array([(int(task_seed) * 0x9E3779B1 + zlib.crc32(name.encode())) & 0xFFFFFFFF], dtype=np.uint32)
    return int(_fmix32(mixed)[0])


def record_problem(record):
    """What is wrong with a task record's ``{"seed", "threshold"}`` of its positions, or None."""
    if not isinstance(record, dict):
        return "the task's record lacks the seed and threshold of its sparse residuals' positions"
    seed, threshold = record.get("seed"), record.get("threshold")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seed, threshold)):
        return "the task's record lacks the seed and threshold of its sparse residuals' positions"
    if not (0 <= seed < 2**32 and 0 <= threshold <= 2**THRESHOLD_BITS):
        return f"the seed {seed} or threshold {threshold} of the task's sparse residuals is out of range"
    return None


def checked_positions(numel, seed, threshold, count, device=None):
    """:func:`positions`, and a message if they are not ``count`` (the values stored), else None."""
    pos = positions(numel, seed, threshold, device)
    if len(pos) != count:
        return pos, f"a sparse residual holds {count} values, its seed and threshold pick {len(pos)} entries"
    return pos, None


def _fmix32(h):
    """MurmurHash3's finalizer on a uint32 array, in place (numpy's uint32 arithmetic wraps)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _mul32(h, c):
    """``h * c mod 2**32`` for an int64 tensor ``h`` in [0, 2**32) and a 32-bit constant ``c``,
    in two halves of ``c`` so that no product reaches 2**63 (int64 overflow is not defined)."""
    return (h * (c & 0xFFFF) + ((h * (c >> 16)) & 0xFFFF) * 65536) & _MASK32


def _device_positions(numel, seed, threshold, device):
    """:func:`positions` computed with torch on ``device``: :func:`_fmix32` in int64."""
    import torch

    parts = []
    for start in range(0, numel, _DEVICE_BLOCK):
        h = torch.arange(start, min(start + _DEVICE_BLOCK, numel), dtype=torch.int64, device=device) ^ int(seed)
        h = h ^ (h >> 16)
        h = _mul32(h, 0x85EBCA6B)
        h = h ^ (h >> 13)
        h = _mul32(h, 0xC2B2AE35)
        h = h ^ (h >> 16)
        parts.append(torch.nonzero((h >> (32 - THRESHOLD_BITS)) < int(threshold)).squeeze(1) + start)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def _host_positions(numel, seed, threshold):
    """:func:`positions` with numpy's uint32 arithmetic."""
    limit = np.uint32(threshold)
    parts = []
    for start in range(0, numel, _BLOCK):
        h = np.arange(start, min(start + _BLOCK, numel), dtype=np.uint32)
        h ^= np.uint32(seed)
        parts.append(np.flatnonzero((_fmix32(h) >> np.uint32(32 - THRESHOLD_BITS)) < limit) + start)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def positions(numel, seed, threshold, device=None):
    """Ascending flat positions of the entries kept among ``numel`` (see module docstring): an
    int64 tensor on ``device`` (default the CPU), hashed there."""
    import torch  # here: `ls`, `info` and `log` read records through this module without torch

    if not 0 <= numel < 2**32:
        raise ValueError(f"a sparse residual covers fewer than 2**32 entries, got {numel}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        return torch.from_numpy(_host_positions(numel, seed, threshold))
    return _device_positions(numel, seed, threshold, device)
