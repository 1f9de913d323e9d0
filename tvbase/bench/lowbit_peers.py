"""Low-bit peers of the memory-accuracy benchmark: Delta-CoMe, TVQ and RTVQ.

- :class:`DeltaCoMe`: per weight matrix, the truncated SVD of the task vector with mixed-precision
  singular vectors (more bits for the larger singular values), Ping et al., 2024 (NeurIPS);
- :class:`TVQ`: every tensor of every task vector quantized to a few bits (asymmetric min-max,
  one scale and zero point per tensor), Kim et al., 2025 (ICCV);
- :class:`RTVQ`: the same paper's residual variant, a shared base vector stored once plus low-bit
  per-task offsets computed against the quantized base.

Each follows :class:`tvbase.bench.baselines.Compressor`: ``fit(task_vectors)`` keeps what a file
of the method would hold in ``packed_`` (codes at their bit width through
:func:`tvbase.bench.packing.pack_uint`, scales and zero points, singular values, the 1-D
tensors), ``nbytes_`` is the sum of their ``nbytes``, and ``rebuild`` decodes from ``packed_``
only. Tensor names and shapes are known from the base and not counted. None of the three draws
random numbers, so none has a seed: two fits give the same bytes. :func:`variants` gives the
settings the benchmark sweeps.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from ..codec import matrix_shape
from ..devices import torch_threads
from .baselines import Compressor
from .packing import pack_uint, unpack_uint

__all__ = ["DeltaCoMe", "RTVQ", "TVQ", "variants"]

# Delta-CoMe's published allocation for a 4096 x 4096 attention projection of Llama-2-7B
# (run.sh of github.com/thunlp/Delta-CoMe): 2 singular vectors at 8 bits, 32 at 3 bits, 968 at 2
# bits, the rest dropped; (2*8 + 32*3 + 968*2) * (4096 + 4096) bits = 1/16 of the fp16 matrix.
PAPER_ALLOCATION = ((8, 2), (3, 32), (2, 968))

_FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)
_FP16_MAX = float(np.finfo(np.float16).max)


# --------------------------------------------------------------------------------------------
# Storage helpers
# --------------------------------------------------------------------------------------------


def _bf16_bytes(x: torch.Tensor) -> np.ndarray:
    """A tensor as bfloat16, flattened: uint16 bit patterns (2 bytes per entry)."""
    return x.detach().reshape(-1).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()


def _from_bf16(bits: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`_bf16_bytes`: a flat float32 tensor."""
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).to(torch.float32)


def _check_bits(name: str, bits, low: int = 1, high: int = 16) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {bits!r}")


# --------------------------------------------------------------------------------------------
# Round-to-nearest quantizers
# --------------------------------------------------------------------------------------------


def _quantize_groups(x: torch.Tensor, bits: int, group_size: int):
    """GPTQ's asymmetric quantizer, round to nearest, per row and per group of ``group_size`` columns.

    Each group's grid spans ``[min(x, 0), max(x, 0)]`` in ``2**bits - 1`` steps (the quantizer of
    GPTQ, Frantar et al., 2023, ICLR, as Delta-CoMe configures it: ``perchannel=True``,
    ``sym=False``), so zero is always on the grid; an all-zero group gets the range [-1, 1] as
    there. ``x_hat = scale * (q - zero)``.

    Parameters
    ----------
    x : torch.Tensor of shape (R, C), float32
    bits : int
    group_size : int

    Returns
    -------
    codes : torch.Tensor of shape (R, C), int64 in ``[0, 2**bits)``
    scales : np.ndarray of shape (R, G), float16, ``G = ceil(C / group_size)``
    zeros : torch.Tensor of shape (R, G), int64 in ``[0, 2**bits)``
    """
    rows, cols = x.shape
    groups = -(-cols // group_size)
    maxq = (1 << bits) - 1
    # zero padding leaves each group's range alone: the range always contains 0
    xg = torch.nn.functional.pad(x, (0, groups * group_size - cols)).reshape(rows, groups, group_size)  # (R, G, g)
    lo = xg.amin(dim=-1).clamp(max=0.0)  # (R, G)
    hi = xg.amax(dim=-1).clamp(min=0.0)
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    # GPTQ stores scales in fp16: quantize with the stored value, so that decoding matches
    scales = ((hi - lo) / maxq).clamp(_FP16_TINY, _FP16_MAX).to(torch.float16)
    s = scales.to(torch.float32)
    zeros = torch.round(-lo / s).clamp(0, maxq)
    q = torch.clamp(torch.round(xg / s[..., None]) + zeros[..., None], 0, maxq)  # (R, G, g)
    codes = q.reshape(rows, groups * group_size)[:, :cols].to(torch.int64)
    return codes, scales.numpy(), zeros.to(torch.int64)


def _dequantize_groups(codes: torch.Tensor, scales: np.ndarray, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`_quantize_groups`: float32 of the codes' shape (R, C)."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    q = torch.nn.functional.pad(codes, (0, groups * group_size - cols)).reshape(rows, groups, group_size)
    s = torch.from_numpy(scales.astype(np.float32))  # (R, G)
    x = s[..., None] * (q.to(torch.float32) - zeros.to(torch.float32)[..., None])  # (R, G, g)
    return x.reshape(rows, groups * group_size)[:, :cols]


def _quantize_tensor(x: torch.Tensor, bits: int):
    """TVQ's asymmetric min-max quantizer, one scale and zero point for the whole tensor.

    ``scale = (2**bits - 1) / (max - min)`` (levels per unit), ``zero = -round(scale * min)``,
    ``q = clamp(round(scale * x + zero), 0, 2**bits - 1)``, ``x_hat = (q - zero) / scale``, as
    the TVQ code computes it. A constant tensor (``max == min``, which would divide by zero) gets
    the range ``[min(c, 0), max(c, 0)]``, or ``[0, 1]`` when it is zero.

    Returns
    -------
    codes : torch.Tensor, int64, flattened, in ``[0, 2**bits)``
    scale, zero : np.ndarray of shape (1,), float32
    """
    flat = x.detach().reshape(-1).to(torch.float32)
    maxq = (1 << bits) - 1
    lo, hi = float(flat.min()), float(flat.max())
    if hi == lo:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi == lo:
            hi = lo + 1.0
    scale = torch.tensor(maxq / (hi - lo), dtype=torch.float32)
    zero = -torch.round(scale * lo)
    codes = torch.clamp(torch.round(scale * flat + zero), 0, maxq).to(torch.int64)
    return codes, scale.reshape(1).numpy().astype("<f4"), zero.reshape(1).numpy().astype("<f4")


def _dequantize_tensor(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, shape) -> torch.Tensor:
    """Inverse of :func:`_quantize_tensor`: float32 of ``shape``."""
    s = torch.from_numpy(scale.astype(np.float32))
    z = torch.from_numpy(zero.astype(np.float32))
    return ((torch.from_numpy(codes).to(torch.float32) - z) / s).reshape(shape)


# --------------------------------------------------------------------------------------------
# Delta-CoMe
# --------------------------------------------------------------------------------------------


def _top_svd(x: torch.Tensor, r: int):
    """The ``r`` leading singular triplets of ``x`` (m, n), signs fixed.

    From the float64 Gram matrix of the shorter side (``eigh`` of n x n or m x m), the other
    side's vectors as ``x v / s``: one GEMM instead of a full SVD, 5x faster on a 30522 x 384
    matrix, and within float32 rounding of it for the kept vectors. Each left singular vector's
    largest entry is made positive (as scikit-learn's ``svd_flip``); a zero singular value gets
    zero vectors.

    Returns
    -------
    u : torch.Tensor of shape (m, r), float32
    s : torch.Tensor of shape (r,), float32
    vh : torch.Tensor of shape (r, n), float32
    """
    xd = x.to(torch.float64)
    tall = xd.shape[0] >= xd.shape[1]
    a = xd if tall else xd.T  # (long, short)
    gram = a.T @ a  # (short, short)
    # one thread for the small eigenproblem: threaded, it took seconds instead of 20 ms on a busy
    # 2-core machine (threads spinning on each other)
    with torch_threads(1):
        evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, short = evals.flip(0)[:r], evecs.flip(1)[:, :r]  # (r,), (short, r)
    s = evals.clamp(min=0.0).sqrt()
    long = (a @ short) / torch.where(s > 0, s, 1.0)  # (long, r)
    long[:, s == 0] = 0.0
    u, v = (long, short) if tall else (short, long)  # (m, r), (n, r)
    sign = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True))).reshape(-1)  # (r,)
    sign[sign == 0] = 1.0
    return (u * sign).to(torch.float32), s.to(torch.float32), (v * sign).T.to(torch.float32).contiguous()


class DeltaCoMe(Compressor):
    """Delta-CoMe: truncated SVD of each weight matrix, mixed-precision singular vectors.

    Each matrix ``tau`` (m, n) of a task vector (conv kernels flattened to (out, in*kh*kw)) is
    decomposed ``tau = U diag(S) V^T`` and its leading ``r`` singular triplets are kept; the
    singular vectors are split into tiers by decreasing singular value and each tier is
    quantized at its own bit width (the paper's default: 8, 3 and 2 bits in the proportions
    2 : 32 : 968), the rest (the small singular values) dropped, i.e. 0 bits. ``tau_hat =
    sum_tiers Q(U_b) diag(S_b) Q(V_b)^T``.

    Stored per task, per matrix and tier of ``k`` singular vectors at ``b`` bits, as GPTQ (with
    which the paper quantizes) lays out a linear layer's weight (rows: outputs, groups of
    ``group_size`` along the inputs):

    - ``U_b`` (m, k): codes at b bits, one fp16 scale and one b-bit zero point per row and
      group of ``group_size`` columns;
    - ``V_b^T`` (k, n): the same, per singular vector and group of ``group_size`` entries;
    - ``S``: the r singular values in bf16 (the paper keeps them in the model's bf16).

    Tensors that are not matrices (biases, LayerNorms) are stored in bf16: the paper compresses
    only the projection matrices and keeps every other parameter of the bf16 fine-tuned model.
    Bytes of a block (R, C) at b bits: ``ceil(R*C*b/8) + 2*R*G + ceil(R*G*b/8)``, ``G =
    ceil(C/group_size)``; of a matrix: the U and V blocks of every tier plus ``2 r``; of a 1-D
    tensor: ``2 * numel``.

    The allocation is scaled to each matrix: it keeps ``r = round(16 * budget * m*n/(m+n) *
    C/B)`` singular vectors, ``C`` and ``B`` being the allocation's total count and total bits
    (1002 and 2048 for the paper's), so that the codes take about ``budget`` of the fp16
    matrix; ``r`` is between 1 and ``min(m, n)``. The tiers split ``r`` in the allocation's
    proportions (rounded), the highest-bit tier getting at least one vector and the lowest-bit
    tier the remainder. The paper's setting (2, 32, 968 vectors of a 4096 x 4096 matrix at
    ``budget = 1/16``) is reproduced exactly; :func:`variants` sweeps ``budget`` with the same
    proportions.

    Reference: Bowen Ping, Shuo Wang, Hanqing Wang, Xu Han, Yuzhuang Xu, Yukun Yan, Yun Chen,
    Baobao Chang, Zhiyuan Liu, Maosong Sun, 2024, "Delta-CoMe: Training-Free Delta-Compression
    with Mixed-Precision for Large Language Models", NeurIPS. Defaults from its code (run.sh,
    llama.py): bits (8, 3, 2), asymmetric per-channel quantizer, group size 128, compression
    1/16 of fp16.

    Simplified: round-to-nearest with GPTQ's quantizer instead of GPTQ itself (no calibration
    data, no Hessian, no act-order; the paper also feeds each tier the output of the tiers
    already quantized, which only matters with calibration); every matrix goes through the SVD,
    the word embedding and any head included (the paper compresses the attention and MLP
    projections of an LLM and keeps the rest of the fine-tuned model, whose delta would here be
    stored densely); the allocation, published for 4096-wide Llama matrices, is rescaled to each
    matrix as above, and the top singular vector always gets the highest bit width (scaled down,
    the paper's 2 of 1002 would round to none). The released code does not include its GPTQ
    module: quantizing ``U`` with rows = outputs and ``V^T`` with rows = singular vectors, as the
    calls in llama.py imply, is our reading. The packed format is ours (the paper's packing is
    unreleased): zero points at b bits, as GPTQ packs them. The leading singular triplets come
    from the float64 Gram matrix (:func:`_top_svd`) rather than a full SVD, for speed.

    Parameters
    ----------
    budget : float
        ``alpha``, the size of the codes as a fraction of the fp16 matrix (the paper's 1/16);
        scales, zero points and singular values come on top.
    allocation : sequence of (bits, count)
        Bit widths and their relative numbers of singular vectors, from the largest singular
        values down (the paper's ``((8, 2), (3, 32), (2, 968))``).
    group_size : int
        Entries per scale and zero point along a row (the paper's 128).

    Attributes (after ``fit``)
    --------------------------
    tiers_ : dict of str -> tuple of (bits, count)
        Per matrix tensor, the singular vectors kept at each bit width (empty tiers left out).
    """

    family = "Delta-CoMe"
    reference = (
        "Ping et al., 2024, Delta-CoMe: Training-Free Delta-Compression with Mixed-Precision for Large Language "
        "Models (NeurIPS)"
    )

    def __init__(self, budget: float = 1 / 16, allocation: Sequence[tuple[int, int]] = PAPER_ALLOCATION,
                 group_size: int = 128):
        self.budget = budget
        self.allocation = tuple(tuple(a) for a in allocation)
        self.group_size = group_size

    def params(self):
        return {"budget": self.budget, "allocation": [list(a) for a in self.allocation], "group_size": self.group_size}

    @property
    def label(self):
        frac = Fraction(self.budget).limit_denominator(4096)
        shown = f"1/{frac.denominator}" if frac.numerator == 1 and abs(float(frac) - self.budget) < 1e-12 else f"{self.budget:g}"
        bits = "/".join(str(b) for b, _ in self.allocation)
        return f"Delta-CoMe ({bits}-bit SVD, {shown} of fp16)"

    def _validate(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise ValueError(f"budget must be a fraction of the fp16 size in (0, 1], got {self.budget!r}")
        if not self.allocation:
            raise ValueError("allocation must list at least one (bits, count) pair, got an empty one")
        for pair in self.allocation:
            if len(pair) != 2:
                raise ValueError(f"allocation entries must be (bits, count) pairs, got {pair!r}")
            bits, count = pair
            _check_bits(f"allocation bits (in {pair!r})", bits, 1, 16)
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
                raise ValueError(f"allocation counts must be positive integers, got {count!r} in {pair!r}")
        widths = [b for b, _ in self.allocation]
        if widths != sorted(set(widths), reverse=True):
            raise ValueError(f"allocation bit widths must be distinct and decreasing (largest singular values first), "
                             f"got {widths}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

    def _tiers(self, m: int, n: int) -> tuple[tuple[int, int], ...]:
        """(bits, count) of the singular vectors a (m, n) matrix keeps, empty tiers left out."""
        total_count = sum(c for _, c in self.allocation)
        total_bits = sum(b * c for b, c in self.allocation)
        r = round(16 * self.budget * (m * n / (m + n)) * total_count / total_bits)
        r = max(1, min(min(m, n), r))
        counts, left = [], r
        for i, (_, c) in enumerate(self.allocation):
            if i == len(self.allocation) - 1:
                k = left  # the lowest-bit tier takes the rest
            else:
                k = min(left, round(r * c / total_count))
                if i == 0:
                    k = max(k, 1)  # the top singular vector gets the highest bit width
            counts.append(k)
            left -= k
        return tuple((b, k) for (b, _), k in zip(self.allocation, counts) if k > 0)

    def fit(self, task_vectors):
        self._validate()
        self._start(task_vectors)
        self.tiers_ = {}
        for name, shape in self.shapes_.items():
            mshape = matrix_shape(shape)
            if mshape is not None:
                self.tiers_[name] = self._tiers(*mshape)
        g = self.group_size
        for t, tensors in task_vectors.items():
            for name, x in tensors.items():
                mshape = matrix_shape(self.shapes_[name])
                if mshape is None:
                    self.packed_[t, name, "dense"] = _bf16_bytes(x)
                    continue
                tiers = self.tiers_[name]
                r = sum(k for _, k in tiers)
                u, s, vh = _top_svd(x.detach().reshape(mshape), r)  # (m, r), (r,), (r, n)
                self.packed_[t, name, "S"] = _bf16_bytes(s)
                start = 0
                for bits, k in tiers:
                    blocks = {"U": u[:, start:start + k], "V": vh[start:start + k]}  # (m, k), (k, n)
                    for part, block in blocks.items():
                        codes, scales, zeros = _quantize_groups(block.contiguous(), bits, g)
                        self.packed_[t, name, f"{part}{bits}"] = pack_uint(codes.numpy(), bits)
                        self.packed_[t, name, f"{part}{bits}_scale"] = scales.astype("<f2").reshape(-1)
                        self.packed_[t, name, f"{part}{bits}_zero"] = pack_uint(zeros.numpy(), bits)
                    start += k
        return self

    def _block(self, task: str, name: str, part: str, bits: int, rows: int, cols: int) -> torch.Tensor:
        g = self.group_size
        groups = -(-cols // g)
        codes = unpack_uint(self.packed_[task, name, f"{part}{bits}"], bits, rows * cols)
        zeros = unpack_uint(self.packed_[task, name, f"{part}{bits}_zero"], bits, rows * groups)
        scales = self.packed_[task, name, f"{part}{bits}_scale"].reshape(rows, groups)
        return _dequantize_groups(torch.from_numpy(codes).reshape(rows, cols), scales,
                                  torch.from_numpy(zeros).reshape(rows, groups), g)

    def rebuild(self, task):
        self._check_task(task)
        out = {}
        for name, shape in self.shapes_.items():
            if (task, name, "dense") in self.packed_:
                out[name] = _from_bf16(self.packed_[task, name, "dense"]).reshape(shape)
                continue
            m, n = matrix_shape(shape)
            s = _from_bf16(self.packed_[task, name, "S"])  # (r,)
            acc = torch.zeros(m, n)
            start = 0
            for bits, k in self.tiers_[name]:
                u = self._block(task, name, "U", bits, m, k)  # (m, k)
                v = self._block(task, name, "V", bits, k, n)  # (k, n)
                acc += (u * s[start:start + k]) @ v
                start += k
            out[name] = acc.reshape(shape)
        return out


# --------------------------------------------------------------------------------------------
# TVQ and RTVQ
# --------------------------------------------------------------------------------------------

_TVQ_REFERENCE = (
    "Kim, Lee, Jung, Ryu, Hong, 2025, Task Vector Quantization for Memory-Efficient Model Merging (ICCV)"
)


class TVQ(Compressor):
    """TVQ: each tensor of each task vector quantized to ``bits`` bits, asymmetric min-max per tensor.

    ``q = clamp(round(scale * tau + zero), 0, 2**bits - 1)`` with ``scale = (2**bits - 1) /
    (max - min)`` and ``zero = -round(scale * min)`` over the whole tensor, rebuilt as ``(q -
    zero) / scale``. Every tensor (weights, biases, norms, embeddings) is quantized the same way.
    Stored per task and tensor: the codes at ``bits`` bits and ``scale`` and ``zero`` in float32
    (the code keeps them as float32 tensors next to the codes): ``ceil(numel * bits / 8) + 8``
    bytes.

    Reference: Youngeun Kim, Seunghwan Lee, Aecheon Jung, Bogon Ryu, Sungeun Hong, 2025, "Task
    Vector Quantization for Memory-Efficient Model Merging", ICCV. Its lowest bit width without
    an accuracy loss is 3 (INT3); it also reports INT8, INT4 and INT2.

    Simplified: nothing in the method. The quantizer's formulas are those of the released code as
    a public re-implementation (github.com/mgradyn/SVD-Quantization-Task-Merging,
    quantization_utils.py) gives them; the authors' repository was not at hand. A constant tensor,
    where the paper's formula divides by zero, gets the range ``[min(c, 0), max(c, 0)]``
    (``[0, 1]`` if zero), so it is rebuilt exactly.

    Parameters
    ----------
    bits : int
        Bit width of every code (the paper's 3; 2 and 4 are its other low-bit settings).
    """

    family = "TVQ"
    reference = _TVQ_REFERENCE

    def __init__(self, bits: int = 3):
        self.bits = bits

    def params(self):
        return {"bits": self.bits}

    @property
    def label(self):
        return f"TVQ INT{self.bits} (per-tensor min-max)"

    def _put(self, key, x, bits):
        codes, scale, zero = _quantize_tensor(x, bits)
        self.packed_[(*key, "codes")] = pack_uint(codes.numpy(), bits)
        self.packed_[(*key, "scale")] = scale
        self.packed_[(*key, "zero")] = zero

    def _get(self, key, bits, shape):
        n = math.prod(shape)
        codes = unpack_uint(self.packed_[(*key, "codes")], bits, n)
        return _dequantize_tensor(codes, self.packed_[(*key, "scale")], self.packed_[(*key, "zero")], shape)

    def fit(self, task_vectors):
        _check_bits("bits", self.bits, 1, 16)
        self._start(task_vectors)
        for t, tensors in task_vectors.items():
            for name, x in tensors.items():
                self._put((t, name), x, self.bits)
        return self

    def rebuild(self, task):
        self._check_task(task)
        return {name: self._get((task, name), self.bits, shape) for name, shape in self.shapes_.items()}


class RTVQ(TVQ):
    """RTVQ: one shared base vector at ``base_bits`` plus an ``offset_bits`` offset per task.

    The base is the mean task vector ``tau_base = theta_avg - theta_pre = mean_t tau_t``,
    quantized once; the offsets are taken against the quantized base, ``tau_t - Q(tau_base)``
    (the paper's error correction: the base's quantization error goes into the offsets instead
    of adding to theirs), and quantized per task. ``tau_hat_t = Q(tau_base) + Q(tau_t -
    Q(tau_base))``. Both use TVQ's per-tensor asymmetric min-max quantizer (:class:`TVQ`), on
    every tensor. ``nbytes_`` is the whole representation: the base once, ``sum_tensors
    ceil(numel * base_bits / 8) + 8``, plus ``T`` times ``sum_tensors ceil(numel * offset_bits /
    8) + 8``; a task's share is ``nbytes_ / T``.

    Reference: Kim et al., 2025 (ICCV), as :class:`TVQ`; the paper's headline setting is B3O2
    (base at 3 bits, offsets at 2 bits), about 8% of fp32 for 8 tasks.

    Simplified: the paper allocates bits by quantization sensitivity within a memory budget; here
    the allocation is given (B3O2 by default, the setting of the paper's memory table). The base as the
    plain task average and the correction as offsets against the dequantized base are our
    reading of the paper (the code was not at hand).

    Parameters
    ----------
    base_bits : int
        Bit width of the shared base (the paper's 3).
    offset_bits : int
        Bit width of each task's offset (the paper's 2).
    """

    family = "RTVQ"
    reference = _TVQ_REFERENCE

    def __init__(self, base_bits: int = 3, offset_bits: int = 2):
        self.base_bits = base_bits
        self.offset_bits = offset_bits

    def params(self):
        return {"base_bits": self.base_bits, "offset_bits": self.offset_bits}

    @property
    def label(self):
        return f"RTVQ B{self.base_bits}O{self.offset_bits} (shared base + per-task offsets)"

    def fit(self, task_vectors):
        _check_bits("base_bits", self.base_bits, 1, 16)
        _check_bits("offset_bits", self.offset_bits, 1, 16)
        self._start(task_vectors)
        n_tasks = len(self.tasks_)
        for name, shape in self.shapes_.items():
            base = sum(task_vectors[t][name].detach().to(torch.float32) for t in self.tasks_) / n_tasks
            self._put(("shared", name, "base"), base, self.base_bits)
            base_hat = self._get(("shared", name, "base"), self.base_bits, shape)
            for t in self.tasks_:
                self._put((t, name, "offset"), task_vectors[t][name].detach().to(torch.float32) - base_hat,
                          self.offset_bits)
        return self

    def rebuild(self, task):
        self._check_task(task)
        return {
            name: self._get(("shared", name, "base"), self.base_bits, shape)
            + self._get((task, name, "offset"), self.offset_bits, shape)
            for name, shape in self.shapes_.items()
        }


# --------------------------------------------------------------------------------------------
# Settings the benchmark sweeps
# --------------------------------------------------------------------------------------------

#: Delta-CoMe budgets (fraction of fp16 taken by the codes), the paper's 1/16 the largest. On a
#: MiniLM-like layout (a 30522 x 384 embedding, 1536 x 384 layers) they take about 0.3, 0.6, 1.4,
#: 2.1 and 3.9% of fp32 with scales and zero points: GPTQ's per-row scales of ``U`` put a floor
#: near 0.3%, which 1/2048 reaches (one 8-bit singular vector per matrix).
DELTA_COME_BUDGETS = (1 / 2048, 1 / 256, 1 / 64, 1 / 32, 1 / 16)
#: TVQ bit widths: the paper's INT3 and its other low-bit settings.
TVQ_BITS = (2, 3, 4)
#: RTVQ (base bits, offset bits): the paper's B3O2, and the base one bit either side of it.
RTVQ_BITS = ((2, 2), (3, 2), (4, 2))


def _nominal_bits(c: Compressor, n_tasks: int) -> float:
    """Code bits per entry per task, the order :func:`variants` sorts by."""
    if isinstance(c, RTVQ):
        return c.offset_bits + c.base_bits / n_tasks
    if isinstance(c, TVQ):
        return c.bits
    return 16 * c.budget


def variants(n_tasks: int) -> list[Compressor]:
    """The settings of the three peers the benchmark runs, in increasing storage.

    Delta-CoMe at the budgets of :data:`DELTA_COME_BUDGETS` (the paper's 1/16 of fp16 the
    largest), TVQ at 2, 3 (the paper's) and 4 bits, RTVQ at B2O2, B3O2 (the paper's) and B4O2.
    ``n_tasks`` orders RTVQ's settings, whose shared base is spread over the tasks. TVQ and RTVQ
    cannot go below about 2 bits of 32 per entry (6%): their settings are the paper's, not
    extended by sparsity.
    """
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, (int, np.integer)) or n_tasks < 1:
        raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
    out: list[Compressor] = [DeltaCoMe(budget=b) for b in DELTA_COME_BUDGETS]
    out += [TVQ(bits=b) for b in TVQ_BITS]
    out += [RTVQ(base_bits=b, offset_bits=o) for b, o in RTVQ_BITS]
    return sorted(out, key=lambda c: _nominal_bits(c, n_tasks))
