"""Sparse task-vector compressors of the memory-accuracy benchmark: DARE, UltraDelta and T-Switch.

Each keeps a small part of every task vector's entries and stores them as a packed file of that
method would hold them (the :class:`~tvbase.bench.baselines.Compressor` interface):

- :class:`Dare`: a random drop at rate ``p``, the survivors rescaled by ``1 / (1 - p)`` and
  stored in int8 with one absmax scale per tensor;
- :class:`UltraDelta`: per-layer 4-bit min-max quantization, a random drop of each
  quantization level's entries at a per-layer rate set by the layer's variance, one global
  rescaling and a per-task trace-norm factor;
- :class:`TSwitch`: the largest-magnitude positive and negative entries of each tensor as a
  mask, their signs and one scale per tensor.

Positions are :func:`~tvbase.bench.packing.pack_positions` (the smaller of a bitmap and
Golomb-Rice coded gaps), codes :func:`~tvbase.bench.packing.pack_uint` at their bit width,
scales float32; ``nbytes_`` is the sum of the packed arrays. Positions hold the entries whose
stored value is not zero (a kept entry that quantizes to 0 is not stored: the rebuild is the
same). Tensor names and shapes are known from the base and not counted. Random draws come from
a ``torch.Generator`` seeded from ``(seed, task index, tensor index)``, so two fits give the
same bytes. :func:`variants` lists the settings the benchmark runs.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import torch

from ..devices import torch_threads
from .baselines import Compressor, TaskVectors
from .packing import pack_positions, pack_uint, unpack_positions, unpack_uint

__all__ = ["Dare", "TSwitch", "UltraDelta", "variants"]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _generator(seed: int, task_index: int, tensor_index: int) -> torch.Generator:
    """A CPU generator for one (task, tensor) of one fit, independent of every other pair."""
    digest = hashlib.blake2b(f"{seed}/{task_index}/{tensor_index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _flat32(x: torch.Tensor) -> torch.Tensor:
    """A tensor as a contiguous float32 CPU vector, shape (numel,)."""
    return x.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()


def _scatter(mask: np.ndarray, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of ``shape``: ``values`` at the True positions of ``mask`` (numel,), 0 elsewhere."""
    out = torch.zeros(math.prod(shape), dtype=torch.float32)
    out[torch.from_numpy(mask)] = values
    return out.reshape(shape)


def _check_rate(name: str, value: float, low_open: bool = False) -> None:
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not (isinstance(value, (int, float)) and ok):
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


# --------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------


class Dare(Compressor):
    """DARE: drop each delta entry at random with rate ``p``, rescale the rest by ``1 / (1 - p)``.

    Every entry of every tensor (weights, biases, norms: DARE drops all delta parameters) is
    kept with probability ``1 - p``, independently (a Bernoulli draw, as in DARE); the kept
    entries are multiplied by ``1 / (1 - p)`` and quantized to int8, symmetric absmax per
    tensor: ``q = round(v / s)``, ``s = max |v| / 127`` over the tensor's kept rescaled values
    ``v``. Rebuilt: ``q * s`` at the kept positions, 0 elsewhere.

    Stored per task and tensor: the positions of the nonzero codes (``pack_positions``), one
    8-bit code per position (``pack_uint``, ``q + 127``) and ``s`` (float32). Bytes of a tensor
    with ``n`` entries and ``k`` stored codes: ``len(pack_positions) + k + 4``, where
    ``len(pack_positions) = 1 + ceil(n / 8)`` when the bitmap is the smaller.

    Reference: Le Yu, Bowen Yu, Haiyang Yu, Fei Huang, Yongbin Li, 2024, "Language Models are
    Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch" (ICML). Paper's
    default drop rate 0.9 (its experiments go to 0.99).

    Simplified: DARE itself keeps the survivors at full precision; the int8 values with one
    absmax scale per tensor are the benchmark issue's packed format (90-99% drop, int8 values),
    not the paper's. Kept entries whose code rounds to 0 are not stored (same rebuild).

    Parameters
    ----------
    drop_rate : float
        ``p`` in [0, 1).
    seed : int
        Seed of the random drop.

    Attributes (after ``fit``)
    --------------------------
    density_ : float
        Stored codes over all entries of all tasks.
    """

    family = "DARE"
    reference = ("Yu et al., 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
                 "as a Free Lunch (ICML)")

    def __init__(self, drop_rate: float = 0.9, seed: int = 0):
        self.drop_rate = drop_rate
        self.seed = seed

    def params(self):
        return {"drop_rate": self.drop_rate, "value_bits": 8, "seed": self.seed}

    @property
    def label(self):
        return f"DARE (drop {self.drop_rate:g}, int8)"

    def fit(self, task_vectors: TaskVectors) -> "Dare":
        _check_rate("drop_rate", self.drop_rate)
        self._start(task_vectors)
        keep_scale = 1.0 / (1.0 - self.drop_rate)
        stored = total = 0
        for ti, (t, tensors) in enumerate(task_vectors.items()):
            for ni, name in enumerate(self.shapes_):
                x = _flat32(tensors[name])  # (n,)
                keep = torch.rand(x.numel(), generator=_generator(self.seed, ti, ni)) >= self.drop_rate
                v = x[keep] * keep_scale  # (k0,) kept, rescaled
                scale = v.abs().max() / 127 if v.numel() else torch.zeros((), dtype=torch.float32)
                q = torch.round(v / scale).clamp_(-127, 127) if scale > 0 else torch.zeros_like(v)
                nonzero = q != 0
                keep[keep.clone()] = nonzero  # positions of the nonzero codes only
                codes = (q[nonzero].to(torch.int64) + 127).numpy()
                self.packed_[t, name, "pos"] = pack_positions(keep.numpy())
                self.packed_[t, name, "q"] = pack_uint(codes, 8)
                self.packed_[t, name, "scale"] = np.array([float(scale)], dtype="<f4")
                stored += codes.size
                total += x.numel()
        self.density_ = stored / max(1, total)
        return self

    def rebuild(self, task):
        self._check_task(task)
        out = {}
        for name, shape in self.shapes_.items():
            mask = unpack_positions(self.packed_[task, name, "pos"], math.prod(shape))
            codes = unpack_uint(self.packed_[task, name, "q"], 8, int(mask.sum())) - 127
            scale = torch.tensor(self.packed_[task, name, "scale"][0], dtype=torch.float32)
            out[name] = _scatter(mask, torch.from_numpy(codes).to(torch.float32) * scale, shape)
        return out


# --------------------------------------------------------------------------------------------
# UltraDelta
# --------------------------------------------------------------------------------------------

_SCOPES = ("blocks", "matrices", "all")
_BLOCK_INDEX = re.compile(r"(^|\.)\d+\.")  # a numbered layer of a repeated stack: "blocks.0.", "layer.11."


def _ultradelta_scope(shapes: dict[str, tuple[int, ...]], scope: str) -> list[str]:
    """Names of the tensors UltraDelta compresses; the others keep their pretrained value."""
    if scope == "all":
        return list(shapes)
    matrices = [n for n, s in shapes.items() if len(s) >= 2]
    if scope == "matrices":
        return matrices
    blocks = [n for n in matrices if len(shapes[n]) == 2 and _BLOCK_INDEX.search(n) and n.endswith("weight")]
    return blocks or matrices  # a model without numbered blocks (a CNN): all its weight matrices


def _allocate_rates(sizes: dict[str, int], stds: dict[str, float], target: float, step: float) -> dict[str, float]:
    """Variance-based mixed sparsity: drop rate per tensor, averaging ``target`` over the entries.

    Tensors sorted by standard deviation, increasing, are cut into thirds of the entries
    (a tensor goes to the first third while the running count including it is at most N / 3,
    to the second while at most 2N / 3): the low-variance third drops ``target + step``, the
    middle ``target``, the high-variance third the rate that makes the weighted mean
    ``target``, clipped to [0, 0.99], as in UltraDelta's code.
    """
    total = sum(sizes.values())
    order = sorted(sizes, key=lambda n: stds[n])  # stable: ties in tensor order
    rates, running, n_low, n_mid, n_high = {}, 0, 0, 0, 0
    for name in order:
        running += sizes[name]
        if running <= total / 3:
            rates[name] = target + step
            n_low += sizes[name]
        elif running <= 2 * total / 3:
            rates[name] = target
            n_mid += sizes[name]
        else:
            n_high += sizes[name]
    high = target
    if n_high:
        high = min(0.99, max(0.0, (target * total - target * n_mid - (target + step) * n_low) / n_high))
    return {name: rates.get(name, high) for name in order}


def _nuclear_norm(a: torch.Tensor) -> float:
    """Sum of the singular values of ``a`` (m, n): square roots of those of the smaller Gram
    matrix (positive semidefinite, so its singular values are its eigenvalues), in float64. An
    SVD of a 30522 x 384 matrix takes seconds, this 0.1 s. The small decomposition runs on one
    thread: on 2 busy cores LAPACK's threaded solvers took 0.5-7 s on 384 x 384, one thread
    0.03 s."""
    a = a.double()
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T  # (min(m, n), min(m, n))
    with torch_threads(1):
        values = torch.linalg.svdvals(gram)  # (min(m, n),)
    return float(values.sqrt().sum())


def _dequantize(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    """Min-max dequantization ``code / levels * (hi - lo) + lo`` in float32 (fit and rebuild share it)."""
    return codes.to(torch.float32) / levels * (hi - lo) + lo


class UltraDelta(Compressor):
    """UltraDelta: per-layer 4-bit quantization, a variance-allocated group-wise random drop,
    a global rescaling and trace-norm-guided task factors; data-free.

    For each task and compressed tensor (a "layer"):

    1. Uniform ``bits``-bit min-max quantization: ``c = round((x - lo) / (hi - lo) * L)``,
       ``L = 2**bits - 1``, ``lo, hi`` the tensor's min and max; ``x_q = c / L * (hi - lo) + lo``.
    2. Mixed sparsity allocation: the tensors' standard deviations (of ``x_q``) rank them;
       the low-variance third of the entries drops ``mask_rate + step_size``, the middle third
       ``mask_rate``, the high-variance third what keeps the average at ``mask_rate``
       (:func:`_allocate_rates`).
    3. Distribution-aware drop: the entries of each quantization level form a group, and
       exactly ``round(n_g * r')`` of each group's ``n_g`` entries are dropped at random,
       ``r' = (r - z) / (1 - z)`` for the layer's rate ``r`` and its fraction ``z`` of entries
       already 0, so every level keeps its share (the intra-layer distribution).
    4. Rescaling: every kept value times ``1 / (1 - mask_rate)`` (one global factor, the
       target's, as in the code), then times ``lambda_t = min_s N_s / N_t``, where ``N_t`` is
       the sum of the nuclear norms of task ``t``'s sparse rescaled matrices: the paper's
       ``(mean_s N_s / N_t) / max_u (mean_s N_s / N_u)``. This factor couples the tasks fitted
       together (one fit, like TALL masks).

    Tensors outside ``scope`` keep their pretrained value, as in the paper's code: 0 bytes,
    rebuilt as 0.

    Stored per task and compressed tensor: the kept positions (``pack_positions``), one
    ``bits``-bit code per kept entry (``pack_uint``), ``lo, hi`` (2 float32); per task, the
    factor ``lambda_t / (1 - mask_rate)`` (float32). Bytes of a task:
    ``4 + sum over compressed tensors (len(pack_positions) + ceil(k * bits / 8) + 8)``.

    Reference: Xiaohui Wang, Peng Ye, Chenyu Huang, Shenghe Zheng, Bo Zhang, Lei Bai, Wanli
    Ouyang, Tao Chen, 2025, "Breaking the Compression Ceiling: Data-Free Pipeline for
    Ultra-Efficient Delta Compression" (NeurIPS); defaults of its released code
    (github.com/xiaohuiwang000/UltraDelta, ``run.sh``): drop 0.97, 4 bits, step 0.01,
    additional factor 1.0, trace-norm rescaling on; compressed tensors: the weight matrices of
    the attention and MLP linear layers of the transformer blocks.

    Simplified / assumed: the released code covers ViT only (its LLM and NLP pipelines are
    not published); ``scope="blocks"`` carries its rule to other models as "2-D weights whose
    name has a numbered layer (``blocks.0.``, ``layer.11.``)", and, for a model without
    numbered blocks (the CNN zoo), every weight tensor with 2+ dims. Conv kernels, when
    compressed, enter the nuclear norm as (out, in * kh * kw). The code simulates the bits in
    float and counts only the codes; here positions, codes, ranges and factors are stored and
    counted. Entries whose dequantized value is exactly 0 are not stored (same rebuild). A
    constant tensor (``hi == lo``) gets code 0 everywhere. A task whose sparse matrices have
    nuclear norm 0 gets ``lambda_t = 1``.

    Parameters
    ----------
    mask_rate : float
        Target average drop rate ``s`` in (0, 1); ``s + step_size`` must be at most 1.
    step_size : float
        ``s_step``: the low-variance third drops ``s + s_step``.
    bits : int
        Quantization width, 1..16.
    trace_norm : bool
        Apply the trace-norm task factor.
    scope : {"blocks", "matrices", "all"}
        Which tensors are compressed: the paper's block linear weights, every tensor with 2+
        dims, or every tensor.
    seed : int
        Seed of the random drop.

    Attributes (after ``fit``)
    --------------------------
    scope_ : list of str
        The compressed tensors.
    rates_ : dict
        Task -> {tensor name: drop rate}.
    trace_norms_ : dict
        Task -> ``N_t``.
    factors_ : dict
        Task -> stored factor ``lambda_t / (1 - mask_rate)``.
    density_ : float
        Stored entries over all entries of all tasks.
    """

    family = "UltraDelta"
    reference = ("Wang et al., 2025, Breaking the Compression Ceiling: Data-Free Pipeline for Ultra-Efficient "
                 "Delta Compression (NeurIPS)")

    def __init__(self, mask_rate: float = 0.97, step_size: float = 0.01, bits: int = 4, trace_norm: bool = True,
                 scope: str = "blocks", seed: int = 0):
        self.mask_rate = mask_rate
        self.step_size = step_size
        self.bits = bits
        self.trace_norm = trace_norm
        self.scope = scope
        self.seed = seed

    def params(self):
        return {"mask_rate": self.mask_rate, "step_size": self.step_size, "bits": self.bits,
                "trace_norm": self.trace_norm, "scope": self.scope, "seed": self.seed}

    @property
    def label(self):
        where = "" if self.scope == "blocks" else f", {self.scope}"
        return f"UltraDelta (drop {self.mask_rate:g}, {self.bits}-bit{where})"

    @property
    def series(self):
        return self.family if self.scope == "blocks" else f"{self.family} ({self.scope})"

    def _validate(self) -> None:
        _check_rate("mask_rate", self.mask_rate, low_open=True)
        if not (isinstance(self.step_size, (int, float)) and 0.0 <= self.step_size <= 1.0 - self.mask_rate):
            raise ValueError(f"step_size must be in [0, 1 - mask_rate] = [0, {1 - self.mask_rate:g}] so that the "
                             f"low-variance layers drop at most everything, got {self.step_size!r}")
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 16):
            raise ValueError(f"bits must be an integer 1..16, got {self.bits!r}")
        if self.scope not in _SCOPES:
            raise ValueError(f"scope must be one of {', '.join(map(repr, _SCOPES))}, got {self.scope!r}")

    def fit(self, task_vectors: TaskVectors) -> "UltraDelta":
        self._validate()
        self._start(task_vectors)
        self.scope_ = _ultradelta_scope(self.shapes_, self.scope)
        index = {name: i for i, name in enumerate(self.shapes_)}
        levels = 2**self.bits - 1
        rescale = 1.0 / (1.0 - self.mask_rate)  # global, from the target rate
        self.rates_, self.trace_norms_ = {}, {}
        stored = 0
        for ti, (t, tensors) in enumerate(task_vectors.items()):
            quantized, stds = {}, {}  # codes (n,) int32 and range per tensor: one copy of the task
            for name in self.scope_:
                x = _flat32(tensors[name])  # (n,)
                lo, hi = x.min(), x.max()
                if hi > lo:
                    codes = torch.round((x - lo) / (hi - lo) * levels).clamp_(0, levels).to(torch.int32)
                else:
                    codes = torch.zeros(x.numel(), dtype=torch.int32)
                quantized[name] = (codes, lo, hi)
                xq = _dequantize(codes, lo, hi, levels).double()
                stds[name] = float(xq.std(correction=0)) if xq.numel() > 1 else 0.0
            rates = _allocate_rates({n: q[0].numel() for n, q in quantized.items()}, stds,
                                    self.mask_rate, self.step_size)
            self.rates_[t] = rates
            nuclear = 0.0
            for name, (codes, lo, hi) in quantized.items():
                xq = _dequantize(codes, lo, hi, levels)  # (n,) float32
                keep = self._group_drop(codes, xq, rates[name], _generator(self.seed, ti, index[name]))
                self.packed_[t, name, "pos"] = pack_positions(keep)
                self.packed_[t, name, "q"] = pack_uint(codes.numpy()[keep], self.bits)
                self.packed_[t, name, "range"] = np.array([float(lo), float(hi)], dtype="<f4")
                stored += int(keep.sum())
                shape = self.shapes_[name]
                if self.trace_norm and len(shape) >= 2:
                    sparse = _scatter(keep, xq[torch.from_numpy(keep)] * rescale, shape).reshape(shape[0], -1)
                    nuclear += _nuclear_norm(sparse)
            self.trace_norms_[t] = nuclear
        positive = [n for n in self.trace_norms_.values() if n > 0]
        self.factors_ = {}
        for t in self.tasks_:
            lam = min(positive) / self.trace_norms_[t] if self.trace_norm and self.trace_norms_[t] > 0 else 1.0
            self.packed_[t, "factor"] = np.array([rescale * lam], dtype="<f4")
            self.factors_[t] = float(self.packed_[t, "factor"][0])
        self.density_ = stored / max(1, len(self.tasks_) * sum(math.prod(s) for s in self.shapes_.values()))
        return self

    @staticmethod
    def _group_drop(codes: torch.Tensor, xq: torch.Tensor, rate: float, gen: torch.Generator) -> np.ndarray:
        """Kept positions (numel,) bool: each quantization level drops ``round(n_g * r')`` of its
        ``n_g`` entries at random; entries whose value is 0 are never stored."""
        n = codes.numel()
        zero = (xq == 0).numpy()
        already = float(zero.mean()) if n else 0.0
        adjusted = max(0.0, (rate - already) / (1.0 - already)) if already < 1.0 else 0.0
        c = codes.numpy()
        order = np.argsort(c, kind="stable")  # entries grouped by level, (n,)
        counts = np.bincount(c, minlength=1)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        keep = np.zeros(n, dtype=np.bool_)
        for start, n_g in zip(starts.tolist(), counts.tolist()):  # one pass per level, 2**bits at most
            if n_g == 0:
                continue
            n_drop = min(n_g, round(n_g * adjusted))
            survivors = torch.randperm(n_g, generator=gen)[n_drop:].numpy()
            keep[order[start + survivors]] = True
        keep &= ~zero
        return keep

    def rebuild(self, task):
        self._check_task(task)
        levels = 2**self.bits - 1
        factor = torch.tensor(self.packed_[task, "factor"][0], dtype=torch.float32)
        out = {name: torch.zeros(shape) for name, shape in self.shapes_.items()}  # pretrained value: delta 0
        for name in self.scope_:
            shape = self.shapes_[name]
            mask = unpack_positions(self.packed_[task, name, "pos"], math.prod(shape))
            codes = torch.from_numpy(unpack_uint(self.packed_[task, name, "q"], self.bits, int(mask.sum())))
            lo, hi = (torch.tensor(v, dtype=torch.float32) for v in self.packed_[task, name, "range"])
            out[name] = _scatter(mask, _dequantize(codes, lo, hi, levels) * factor, shape)
        return out


# --------------------------------------------------------------------------------------------
# T-Switch
# --------------------------------------------------------------------------------------------


def _largest(values: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Mask (n,) of the entries ``>=`` the ``int(n * keep_fraction)``-th largest of ``values``
    (n,); all of them when that count is 0, as T-Switch's code does."""
    n = values.numel()
    k = int(n * keep_fraction)
    if n == 0 or k == 0:
        return torch.ones(n, dtype=torch.bool)
    threshold = torch.kthvalue(values, n - k + 1).values
    return values >= threshold


class TSwitch(Compressor):
    """T-Switch: an activation switch (mask), a polarity switch (signs) and a knob (scale) per tensor.

    For each task and tensor of at least one dimension, the positive entries keep their
    ``int(n_+ * (1 - drop_ratio))`` largest and the negative entries their
    ``int(n_- * (1 - drop_ratio))`` largest in magnitude (a threshold per sign: entries at or
    above the k-th largest); the rest is dropped. Rebuilt: ``lambda * sign`` at the kept
    positions, 0 elsewhere, with the knob ``lambda = ||tau_kept||_2 / ||sign(tau_kept)||_2``
    (the root mean square of the kept entries, which keeps the tensor's L2 norm after the
    drop). Scalars (0-d tensors) are kept as they are, in float32, as in the paper's code.

    Stored per task and tensor: the activation switch (``pack_positions``: a bitmap, as in
    the paper, or coded gaps when smaller), one sign bit per kept entry (``pack_uint``, 1 bit,
    1 = positive) and ``lambda`` (float32). Bytes of a tensor with ``n`` entries and ``k``
    kept: ``len(pack_positions) + ceil(k / 8) + 4``; ``len(pack_positions) = 1 + ceil(n / 8)``
    when the bitmap is the smaller.

    Reference: Biqing Qi, Fangyuan Li, Zhen Wang, Junqi Gao, Dong Li, Peng Ye, Bowen Zhou,
    2025, "Less is More: Efficient Model Merging with Binary Task Switch" (CVPR). Defaults of
    its released code (github.com/lfy-123/Binary-Task-Switch, ``merge_vit/run_merge_vit.sh``):
    drop ratio 0.6 for full fine-tunes (0.4 for LoRA), applied to every parameter.

    Simplified: the paper's file codes the mask in groups of 4 entries (a flag bit per group,
    then each nonzero group's 4 mask bits and its signs); ``pack_positions`` is used instead
    (never larger than a bitmap, about the mask's entropy). When ``int(n * (1 - drop_ratio))``
    is 0 for one sign of a small tensor, all entries of that sign are kept, as the code does.
    Auto-Switch (the retrieval of task weights at inference) is not part of storage and is not
    implemented; the benchmark composes with its own coefficients. No random draws: the
    method is deterministic.

    Parameters
    ----------
    drop_ratio : float
        Fraction of each sign's entries dropped, in [0, 1).

    Attributes (after ``fit``)
    --------------------------
    density_ : float
        Kept entries over all entries of all tasks.
    """

    family = "T-Switch"
    reference = "Qi et al., 2025, Less is More: Efficient Model Merging with Binary Task Switch (CVPR)"

    def __init__(self, drop_ratio: float = 0.6):
        self.drop_ratio = drop_ratio

    def params(self):
        return {"drop_ratio": self.drop_ratio}

    @property
    def label(self):
        return f"T-Switch (drop {self.drop_ratio:g}, mask + sign + scale)"

    def fit(self, task_vectors: TaskVectors) -> "TSwitch":
        _check_rate("drop_ratio", self.drop_ratio)
        self._start(task_vectors)
        keep_fraction = 1 - self.drop_ratio
        kept = total = 0
        for t, tensors in task_vectors.items():
            for name, shape in self.shapes_.items():
                x = _flat32(tensors[name])  # (n,)
                total += x.numel()
                if len(shape) == 0:
                    self.packed_[t, name, "dense"] = x.numpy().astype("<f4")
                    kept += 1
                    continue
                keep = torch.zeros(x.numel(), dtype=torch.bool)
                for side in (x > 0, x < 0):
                    keep[side] = _largest(x[side].abs(), keep_fraction)
                values = x[keep]  # (k,)
                scale = values.norm() / math.sqrt(values.numel()) if values.numel() else torch.zeros(())
                self.packed_[t, name, "pos"] = pack_positions(keep.numpy())
                self.packed_[t, name, "sign"] = pack_uint((values > 0).numpy().astype(np.uint8), 1)
                self.packed_[t, name, "scale"] = np.array([float(scale)], dtype="<f4")
                kept += values.numel()
        self.density_ = kept / max(1, total)
        return self

    def rebuild(self, task):
        self._check_task(task)
        out = {}
        for name, shape in self.shapes_.items():
            out[name] = self._dense(task, name, shape)
            if out[name] is not None:
                continue
            mask = unpack_positions(self.packed_[task, name, "pos"], math.prod(shape))
            positive = torch.from_numpy(unpack_uint(self.packed_[task, name, "sign"], 1, int(mask.sum())) == 1)
            scale = float(self.packed_[task, name, "scale"][0])
            out[name] = _scatter(mask, torch.where(positive, scale, -scale).to(torch.float32), shape)
        return out


# --------------------------------------------------------------------------------------------
# The benchmark's settings
# --------------------------------------------------------------------------------------------

#: DARE drop rates: the paper's 0.9 and higher, to about 0.25% of fp32 (values int8, positions
#: coded: about 0.26%, 0.5%, 0.93%, 2.2%, 4.0% of fp32).
DARE_DROP_RATES = (0.995, 0.99, 0.98, 0.95, 0.9)
#: UltraDelta target drop rates around the code's 0.97 (the issue's 97-99%, and lower, since only
#: part of a model is compressed: about half of MiniLM): about 0.4% (0.99) to 4.7% (0.8) of fp32
#: of the compressed tensors (4-bit codes, coded positions).
ULTRADELTA_MASK_RATES = (0.99, 0.98, 0.97, 0.95, 0.9, 0.8)
#: T-Switch drop ratios from the code's 0.6 up: about 4.4% (0.6) down to 0.3% (0.99) of fp32.
TSWITCH_DROP_RATIOS = (0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6)


def variants(n_tasks: int, seed: int = 0) -> list[Compressor]:
    """The sparse peers the benchmark runs: each method's paper default and a sweep of its
    drop rate, each family in increasing storage. ``n_tasks`` is not needed by these methods
    (none of their settings depends on it); it is taken for the benchmark's common call.
    ``seed`` seeds DARE's and UltraDelta's random drops."""
    return [
        *[Dare(drop_rate=p, seed=seed) for p in DARE_DROP_RATES],
        *[UltraDelta(mask_rate=s, seed=seed) for s in ULTRADELTA_MASK_RATES],
        *[TSwitch(drop_ratio=d) for d in TSWITCH_DROP_RATIOS],
    ]
