"""Published task-vector compressors that tvbase is measured against, and coefficient selection.

Every compressor follows one small interface, in the scikit-learn manner:

- ``__init__`` stores parameters only;
- ``fit(task_vectors)`` builds the compressed representation, kept as packed numpy arrays in
  ``packed_`` (what one would write to disk: codes, bit masks, scales, factors), so that
  ``nbytes_`` — the sum of their ``nbytes`` — is the real size of the representation, bits
  counted as whole bytes, scales and masks included (tensor names and shapes are known from the
  base and not counted);
- ``rebuild(task)`` decodes one task vector from ``packed_`` only;
- ``compose(coefficients)`` returns ``sum_t alpha_t * rebuild(t)``.

``task_vectors`` is always ``{task name: {tensor name: torch.Tensor}}`` (float32, CPU, the
base's shapes; ``tau = theta_finetuned - theta_base``). Every compressor is deterministic for its
``seed``. The implementations follow the papers cited in each docstring; none is copied.

The two coefficient rules of task arithmetic, :func:`choose_addition_alpha` and
:func:`choose_negation_alpha`, are here too so that they can move into the library later.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from tvbase.factors import matrix_shape
from tvbase.ingest.cluster import TaskClusterer

__all__ = [
    "BASELINES",
    "BitDelta",
    "ClusterMean",
    "Compressor",
    "CenteredPCA",
    "Fp16",
    "Fp32",
    "GramAutoencoder",
    "Int8",
    "TallMasks",
    "TsvCompress",
    "choose_addition_alpha",
    "choose_negation_alpha",
    "make_baseline",
]

TaskVectors = Mapping[str, Mapping[str, torch.Tensor]]

#: The addition coefficient grid of Task Vector Bases (Zeng et al., 2025): linspace(0, 1, 21).
ALPHA_GRID = tuple(float(a) for a in np.linspace(0.0, 1.0, 21))


# --------------------------------------------------------------------------------------------
# Coefficient selection (task arithmetic)
# --------------------------------------------------------------------------------------------


def choose_addition_alpha(evaluate_fn: Callable[[float], float], grid: Iterable[float] = ALPHA_GRID):
    """Coefficient of task addition ``theta_0 + alpha * sum_t tau_t``, chosen on validation data.

    Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic", ICLR) and Task
    Vector Bases (Zeng et al., 2025) pick the one ``alpha`` of a grid that maximizes the mean
    normalized validation accuracy over the added tasks.

    Parameters
    ----------
    evaluate_fn : callable float -> float
        Score of a coefficient, higher is better (mean normalized validation accuracy).
    grid : iterable of float
        Candidate coefficients, tried in order; ties go to the earlier one (the smaller alpha).

    Returns
    -------
    alpha : float
        The chosen coefficient.
    scores : list of (float, float)
        ``(alpha, score)`` for every candidate, in grid order.
    """
    scores = [(float(a), float(evaluate_fn(float(a)))) for a in grid]
    if not scores:
        raise ValueError("the coefficient grid is empty; give at least one alpha")
    best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))  # first maximum
    return scores[best][0], scores


def choose_negation_alpha(
    evaluate_fn: Callable[[float], tuple[float, float]],
    grid: Iterable[float] = ALPHA_GRID,
    control_floor: float = 0.0,
):
    """Coefficient of task negation ``theta_0 - alpha * tau_target``, chosen on validation data.

    The rule of task arithmetic's forgetting experiments (Ilharco et al., 2023, ICLR), as used by
    Task Vector Bases (Zeng et al., 2025): the largest drop of target accuracy among the
    coefficients that keep control accuracy at or above a floor (95% of the base's control
    accuracy).

    Parameters
    ----------
    evaluate_fn : callable float -> (float, float)
        ``(target accuracy, control accuracy)`` of a coefficient, on validation data.
    grid : iterable of float
        Candidate coefficients, tried in order; ties go to the earlier one (the smaller alpha).
    control_floor : float
        Smallest admissible control accuracy, e.g. ``0.95 * base control accuracy``.

    Returns
    -------
    alpha : float
        The chosen coefficient; 0.0 when no candidate keeps the control accuracy.
    rows : list of (float, float, float)
        ``(alpha, target accuracy, control accuracy)`` for every candidate, in grid order.
    """
    rows = [(float(a), *map(float, evaluate_fn(float(a)))) for a in grid]
    if not rows:
        raise ValueError("the coefficient grid is empty; give at least one alpha")
    admissible = [i for i, (_, _, control) in enumerate(rows) if control >= control_floor]
    if not admissible:
        return 0.0, rows
    best = min(admissible, key=lambda i: (rows[i][1], i))  # lowest target accuracy, first one
    return rows[best][0], rows


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _shapes(task_vectors: TaskVectors) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in the first task's order (every task has the same tensors)."""
    first = next(iter(task_vectors.values()))
    return {name: tuple(t.shape) for name, t in first.items()}


def _numpy32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _flatten(task_vectors: TaskVectors, tasks: Sequence[str], names: Sequence[str]) -> torch.Tensor:
    """All task vectors as one float64 matrix of shape (T, N), tensors concatenated in ``names`` order."""
    return torch.stack(
        [torch.cat([task_vectors[t][n].reshape(-1).double() for n in names]) for t in tasks]
    )  # (T, N)


def _unflatten(vector: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Split a flat (N,) vector back into tensors of ``shapes`` (float32)."""
    out, start = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = vector[start : start + n].to(torch.float32).reshape(shape).clone()
        start += n
    return out


def _pack_bits(mask: torch.Tensor) -> np.ndarray:
    """A boolean tensor as packed bits: uint8 of shape (ceil(numel / 8),)."""
    return np.packbits(mask.detach().cpu().reshape(-1).numpy().astype(np.bool_))


def _unpack_bits(bits: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(bits, count=n).astype(np.bool_)).reshape(shape)


class Compressor:
    """Base class: packed arrays, their byte count, and composition by rebuilding each term."""

    #: Short name of the method family (one line in the Pareto plot).
    family = ""
    #: Paper the method comes from.
    reference = ""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"

    def params(self) -> dict:
        """The constructor parameters (JSON-serializable)."""
        return {}

    @property
    def label(self) -> str:
        """Row name of the method in result tables."""
        return self.family

    @property
    def series(self) -> str:
        """Line of the method in plots: its family, unless variants of one family must not be joined."""
        return self.family

    @property
    def nbytes_(self) -> int:
        """Bytes of the packed representation of all fitted tasks (sum of ``packed_`` arrays)."""
        return int(sum(a.nbytes for a in self.packed_.values()))

    def fit(self, task_vectors: TaskVectors) -> "Compressor":
        raise NotImplementedError

    def rebuild(self, task: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compose(self, coefficients: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """``sum_t alpha_t * tau_hat_t``: tensor name -> float32 tensor."""
        out = {name: torch.zeros(shape) for name, shape in self.shapes_.items()}
        for task, alpha in coefficients.items():
            for name, t in self.rebuild(task).items():
                out[name] += alpha * t
        return out

    def _start(self, task_vectors: TaskVectors) -> None:
        if not task_vectors:
            raise ValueError(f"{type(self).__name__}.fit needs at least one task vector")
        self.tasks_ = list(task_vectors)
        self.shapes_ = _shapes(task_vectors)
        self.packed_: dict[tuple, np.ndarray] = {}

    def _check_task(self, task: str) -> None:
        if task not in self.tasks_:
            raise KeyError(f"task {task!r} was not fitted; fitted tasks: {', '.join(self.tasks_)}")


# --------------------------------------------------------------------------------------------
# Element-wise codecs
# --------------------------------------------------------------------------------------------


class Fp32(Compressor):
    """Raw task vectors in float32: the 100% reference (``tau`` itself, bit for bit)."""

    family = "raw fp32"
    reference = "uncompressed"

    def fit(self, task_vectors):
        self._start(task_vectors)
        for t, tensors in task_vectors.items():
            for name, x in tensors.items():
                self.packed_[t, name] = _numpy32(x)
        return self

    def rebuild(self, task):
        self._check_task(task)
        return {n: torch.from_numpy(self.packed_[task, n].copy()).reshape(s) for n, s in self.shapes_.items()}


class Fp16(Compressor):
    """Task vectors cast to IEEE float16 (half of fp32)."""

    family = "fp16"
    reference = "IEEE 754 half precision"

    def fit(self, task_vectors):
        self._start(task_vectors)
        for t, tensors in task_vectors.items():
            for name, x in tensors.items():
                self.packed_[t, name] = _numpy32(x).astype("<f2")
        return self

    def rebuild(self, task):
        self._check_task(task)
        return {n: torch.from_numpy(self.packed_[task, n].astype(np.float32)).reshape(s) for n, s in self.shapes_.items()}


class Int8(Compressor):
    """Symmetric int8 with one float32 absmax scale per row (per output channel).

    Rows are the first axis of a tensor (conv kernels: output channels); a 1-D tensor has one
    scale. Stored per tensor: ``rows`` float32 scales and ``numel`` int8 codes
    ``round(x / scale)``, ``scale = max|row| / 127``. Per-channel absmax round-to-nearest as in
    LLM.int8() (Dettmers et al., 2022, NeurIPS), applied to the task vector.
    """

    family = "int8"
    reference = "Dettmers et al., 2022, LLM.int8() (NeurIPS) - per-row absmax round-to-nearest"

    @property
    def label(self):
        return "int8 (per-row absmax)"

    def fit(self, task_vectors):
        self._start(task_vectors)
        for t, tensors in task_vectors.items():
            for name, x in tensors.items():
                rows = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)  # (r, c)
                scale = rows.abs().amax(dim=1) / 127.0  # (r,)
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                codes = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
                self.packed_[t, name, "scale"] = _numpy32(scale)
                self.packed_[t, name, "codes"] = codes.numpy()
        return self

    def rebuild(self, task):
        self._check_task(task)
        out = {}
        for name, shape in self.shapes_.items():
            codes = torch.from_numpy(self.packed_[task, name, "codes"]).float()  # (r, c)
            scale = torch.from_numpy(self.packed_[task, name, "scale"])  # (r,)
            out[name] = (codes * scale[:, None]).reshape(shape)
        return out


class BitDelta(Compressor):
    """One sign bit per entry and one float32 scale per weight matrix; 1-D tensors in fp16.

    ``tau_hat = scale * sign(tau)`` with ``scale = mean |tau|`` of the matrix, the initialization
    of BitDelta (Liu et al., 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit",
    NeurIPS); the paper then distils the scales on calibration data, which is not done here.
    Tensors with two or more dimensions (conv kernels included) count as matrices. Zero entries
    get the + sign.
    """

    family = "BitDelta"
    reference = "Liu et al., 2024, BitDelta: Your Fine-Tune May Only Be Worth One Bit (NeurIPS)"

    @property
    def label(self):
        return "BitDelta (1 bit + scale)"

    def fit(self, task_vectors):
        self._start(task_vectors)
        for t, tensors in task_vectors.items():
            for name, x in tensors.items():
                if x.dim() >= 2:
                    self.packed_[t, name, "sign"] = _pack_bits(x >= 0)
                    self.packed_[t, name, "scale"] = np.array([float(x.abs().mean())], dtype="<f4")
                else:
                    self.packed_[t, name, "dense"] = _numpy32(x).astype("<f2")
        return self

    def rebuild(self, task):
        self._check_task(task)
        out = {}
        for name, shape in self.shapes_.items():
            if (task, name, "dense") in self.packed_:
                out[name] = torch.from_numpy(self.packed_[task, name, "dense"].astype(np.float32)).reshape(shape)
            else:
                positive = _unpack_bits(self.packed_[task, name, "sign"], shape)
                scale = float(self.packed_[task, name, "scale"][0])
                out[name] = torch.where(positive, scale, -scale).to(torch.float32)
        return out


# --------------------------------------------------------------------------------------------
# Low rank, masks
# --------------------------------------------------------------------------------------------


class TsvCompress(Compressor):
    """TSV-C: per task and weight matrix, the truncated SVD of rank ``floor(min(m, n) / T)``.

    Task Singular Vectors (Gargiulo et al., 2025, "Task Singular Vectors: Reducing Task
    Interference in Model Merging", CVPR), compression variant: each task keeps ``1/T`` of the
    singular triplets of each layer, so T tasks cost about one model. Conv kernels are flattened
    to (out, in * kh * kw), as in tvbase. Stored per matrix: ``U_k * s_k`` (m, k) and ``V_k``
    (n, k) in ``factor_dtype``; tensors that are not matrices (biases, norms) are stored densely
    in the same dtype.

    Parameters
    ----------
    factor_dtype : {"float16", "float32"}
        Storage dtype of the factors and dense tensors (default float16: half the bytes, no
        measurable loss at these ranks).
    min_rank : int
        Smallest rank kept per matrix. ``floor(min(m, n) / T)`` is 0 for matrices narrower than
        T (e.g. a 16-wide patch embedding with 25 tasks); the paper's rule would drop those
        layers, we keep rank ``min_rank`` (default 1) instead, which only helps the baseline.
    """

    family = "TSV-C"
    reference = "Gargiulo et al., 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR)"

    def __init__(self, factor_dtype: str = "float16", min_rank: int = 1):
        self.factor_dtype = factor_dtype
        self.min_rank = min_rank

    def params(self):
        return {"factor_dtype": self.factor_dtype, "min_rank": self.min_rank}

    @property
    def label(self):
        return f"TSV-C (rank min(m,n)/T, {'fp16' if self.factor_dtype == 'float16' else 'fp32'})"

    def fit(self, task_vectors):
        if self.factor_dtype not in ("float16", "float32"):
            raise ValueError(f"factor_dtype must be 'float16' or 'float32', got {self.factor_dtype!r}")
        self._start(task_vectors)
        dtype = np.dtype(self.factor_dtype).newbyteorder("<")
        n_tasks = len(self.tasks_)
        self.ranks_ = {}
        for name, shape in self.shapes_.items():
            mshape = matrix_shape(shape)
            if mshape is not None:
                self.ranks_[name] = max(self.min_rank, min(mshape) // n_tasks)
        for t, tensors in task_vectors.items():
            for name, x in tensors.items():
                mshape = matrix_shape(self.shapes_[name])
                if mshape is None:
                    self.packed_[t, name, "dense"] = _numpy32(x).astype(dtype)
                    continue
                k = self.ranks_[name]
                u, s, vh = torch.linalg.svd(x.reshape(mshape).float(), full_matrices=False)
                self.packed_[t, name, "US"] = _numpy32(u[:, :k] * s[:k]).astype(dtype)  # (m, k)
                self.packed_[t, name, "V"] = _numpy32(vh[:k].T).astype(dtype)  # (n, k)
        return self

    def rebuild(self, task):
        self._check_task(task)
        out = {}
        for name, shape in self.shapes_.items():
            if (task, name, "dense") in self.packed_:
                out[name] = torch.from_numpy(self.packed_[task, name, "dense"].astype(np.float32)).reshape(shape)
            else:
                us = torch.from_numpy(self.packed_[task, name, "US"].astype(np.float32))  # (m, k)
                v = torch.from_numpy(self.packed_[task, name, "V"].astype(np.float32))  # (n, k)
                out[name] = (us @ v.T).reshape(shape)
        return out


class TallMasks(Compressor):
    """TALL masks: one merged vector in fp32 plus one binary mask per task.

    Wang et al., 2024, "Localizing Task Information for Improved Model Merging and Compression"
    (ICML). The merged vector ``tau_MTL`` is task arithmetic's sum ``sum_t tau_t`` or the TIES
    merge of the task vectors; task ``t`` keeps the entries where it dominates,
    ``m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|``, and is rebuilt as ``m_t * tau_MTL``.
    ``lambda_t`` is chosen per task from ``lambdas`` by ``score`` (validation accuracy of the
    rebuilt task). Stored: ``tau_MTL`` once in float32 and one bit per entry per task (every
    tensor, biases included).

    Parameters
    ----------
    lambdas : sequence of float
        Candidates for ``lambda_t`` (the paper's {0.2, 0.3, 0.4, 0.5, 0.6}).
    score : callable (task, rebuilt task vector) -> float, or None
        Higher is better; ties go to the earlier lambda. None uses the middle candidate.
    merge : {"sum", "ties"}
        ``tau_MTL``: the task-arithmetic sum, or TIES-merging (Yadav et al., 2023, "TIES-Merging:
        Resolving Interference When Merging Models", NeurIPS) with ``ties_density``.
    ties_density : float
        Fraction of the largest-magnitude entries each task keeps before the TIES sign election
        (0.2 in the TIES paper).
    """

    family = "TALL masks"
    reference = "Wang et al., 2024, Localizing Task Information for Improved Model Merging and Compression (ICML)"

    def __init__(self, lambdas: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6), score=None, merge: str = "sum",
                 ties_density: float = 0.2):
        self.lambdas = tuple(float(x) for x in lambdas)
        self.score = score
        self.merge = merge
        self.ties_density = ties_density

    def params(self):
        p = {"lambdas": list(self.lambdas), "merge": self.merge, "selection": "validation accuracy"}
        if self.merge == "ties":
            p["ties_density"] = self.ties_density
        return p

    @property
    def label(self):
        return f"TALL masks ({'TA sum' if self.merge == 'sum' else 'TIES'} + 1 bit/task)"

    @property
    def series(self):
        return f"TALL masks ({'TA sum' if self.merge == 'sum' else 'TIES'})"

    def fit(self, task_vectors):
        if self.merge not in ("sum", "ties"):
            raise ValueError(f"merge must be 'sum' or 'ties', got {self.merge!r}")
        self._start(task_vectors)
        if self.merge == "sum":
            merged = {n: sum(task_vectors[t][n] for t in self.tasks_) for n in self.shapes_}  # tau_MTL
        else:
            merged = _ties_merge(task_vectors, self.tasks_, self.shapes_, self.ties_density)
        for name, x in merged.items():
            self.packed_["merged", name] = _numpy32(x)
        self.lambdas_ = {}
        for t in self.tasks_:
            candidates = {}
            for lam in self.lambdas:
                masks = {n: task_vectors[t][n].abs() >= lam * (merged[n] - task_vectors[t][n]).abs() for n in self.shapes_}
                candidates[lam] = masks
            if self.score is None or len(self.lambdas) == 1:
                lam = self.lambdas[len(self.lambdas) // 2]
            else:
                scored = [(self.score(t, self._apply(masks)), -i) for i, masks in enumerate(candidates.values())]
                lam = self.lambdas[-max(scored)[1]]
            self.lambdas_[t] = lam
            for name, mask in candidates[lam].items():
                self.packed_[t, name, "mask"] = _pack_bits(mask)
        return self

    def _apply(self, masks):
        return {n: torch.from_numpy(self.packed_["merged", n]).reshape(s) * masks[n] for n, s in self.shapes_.items()}

    def rebuild(self, task):
        self._check_task(task)
        return self._apply({n: _unpack_bits(self.packed_[task, n, "mask"], s) for n, s in self.shapes_.items()})


def _ties_merge(task_vectors, tasks, shapes, density):
    """TIES-merging (Yadav et al., 2023, NeurIPS): trim, elect sign, disjoint mean; {name: tensor}.

    Each task keeps its ``density`` fraction of largest-magnitude entries over the whole vector;
    each entry's sign is the sign of the sum of the trimmed values; the merged entry is the mean
    of the trimmed values that agree with that sign (0 where none do).
    """
    flat = _flatten(task_vectors, tasks, list(shapes)).float()  # (T, N)
    k = max(1, int(round(density * flat.shape[1])))
    threshold = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values  # (T, 1)
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))  # (T, N)
    sign = torch.sign(trimmed.sum(dim=0))  # (N,)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)  # (T, N)
    merged = (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)  # (N,)
    return _unflatten(merged, shapes)


# --------------------------------------------------------------------------------------------
# Global bases (Task Vector Bases)
# --------------------------------------------------------------------------------------------


class CenteredPCA(Compressor):
    """Centered PCA of the flattened task vectors: ``tau_t ~ mu + S c_t`` with M components.

    Task Vector Bases (Zeng et al., 2025, "Efficient Model Editing with Task Vector Bases: A
    Theoretical Framework and Scalable Approach"), PCA basis. Computed from the T x T Gram matrix
    of the centered vectors, so it costs O(T^2 N). Stored in float32: the mean (N,), M basis
    vectors (M, N) and the coefficients (T, M).

    Parameters
    ----------
    n_components : int
        M, the number of basis vectors (at most T - 1 carry information).
    """

    family = "PCA"
    reference = "Zeng et al., 2025, Efficient Model Editing with Task Vector Bases (centered PCA basis)"

    def __init__(self, n_components: int = 2):
        self.n_components = n_components

    def params(self):
        return {"n_components": self.n_components}

    @property
    def label(self):
        return f"PCA M={self.n_components}"

    def fit(self, task_vectors):
        self._start(task_vectors)
        x = _flatten(task_vectors, self.tasks_, list(self.shapes_))  # (T, N)
        mean = x.mean(dim=0)  # (N,)
        xc = x - mean  # (T, N)
        evals, evecs = torch.linalg.eigh(xc @ xc.T)  # ascending, (T,), (T, T)
        m = self.n_components
        evals, evecs = evals.flip(0)[:m].clamp(min=0), evecs.flip(1)[:, :m]  # (M,), (T, M)
        evecs = evecs * torch.sign(evecs[evecs.abs().argmax(0), torch.arange(m)])  # sign-fixed
        sigma = evals.sqrt()  # singular values of xc
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        basis = (xc.T @ evecs / safe).T  # (M, N), orthonormal rows
        coeffs = evecs * sigma  # (T, M) = xc @ basis.T
        self.packed_["mean"] = _numpy32(mean)
        self.packed_["basis"] = _numpy32(basis)
        self.packed_["coeffs"] = _numpy32(coeffs)
        return self

    def rebuild(self, task):
        self._check_task(task)
        c = torch.from_numpy(self.packed_["coeffs"][self.tasks_.index(task)])  # (M,)
        flat = torch.from_numpy(self.packed_["mean"]) + c @ torch.from_numpy(self.packed_["basis"])  # (N,)
        return _unflatten(flat, self.shapes_)


class GramAutoencoder(Compressor):
    """Task Vector Bases' autoencoder on the Gram matrix: basis ``S = V B``, decoder ``W``.

    Zeng et al., 2025 (Task Vector Bases): with ``V`` (N, T) the task vectors as columns and
    ``G = V^T V``, learn ``A`` (T, M) and ``W`` (M, T) minimizing
    ``tr((B W - I)^T G (B W - I)) / T^2``, ``B = softmax(A / tau)`` over the task axis (each basis
    vector is a convex combination of tasks), with Adam. Only the T x T Gram matrix enters the
    optimization, so it is cheap for any N. Then ``S = V B`` (N, M) and ``tau_hat_t = S W[:, t]``.
    Stored in float32: ``S`` (M, N) and ``W`` (M, T).

    The loss is optimized on ``G`` divided by its mean diagonal (same minimizer, better
    conditioned steps); ``loss_`` is reported in the original units next to ``loss_bound_``,
    ``sum_{i>M} lambda_i(G) / T^2``, which no M-vector basis can beat.

    Parameters
    ----------
    n_bases : int
        M (the paper uses T / 2).
    temperature : float
        tau of the softmax (5 in the paper).
    steps : int
        Adam steps (6000 in the paper).
    lr : float
        Adam learning rate (0.01 in the paper).
    seed : int
        Seed of the initialization: ``A ~ N(0, 1)``, ``W ~ N(0, 1 / M)``.
    """

    family = "Gram AE"
    reference = "Zeng et al., 2025, Efficient Model Editing with Task Vector Bases (autoencoder basis)"

    def __init__(self, n_bases: int = 2, temperature: float = 5.0, steps: int = 6000, lr: float = 0.01, seed: int = 0):
        self.n_bases = n_bases
        self.temperature = temperature
        self.steps = steps
        self.lr = lr
        self.seed = seed

    def params(self):
        return {"n_bases": self.n_bases, "temperature": self.temperature, "steps": self.steps, "lr": self.lr, "seed": self.seed}

    @property
    def label(self):
        return f"Gram AE M={self.n_bases}"

    def fit(self, task_vectors):
        self._start(task_vectors)
        v = _flatten(task_vectors, self.tasks_, list(self.shapes_))  # (T, N): V transposed
        n_tasks, m = v.shape[0], self.n_bases
        gram = v @ v.T  # (T, T) = V^T V
        unit = float(gram.diagonal().mean()) or 1.0
        g = gram / unit
        gen = torch.Generator().manual_seed(self.seed)
        a = torch.randn(n_tasks, m, generator=gen, dtype=torch.float64).requires_grad_()
        w = (torch.randn(m, n_tasks, generator=gen, dtype=torch.float64) / math.sqrt(m)).requires_grad_()
        eye = torch.eye(n_tasks, dtype=torch.float64)
        optimizer = torch.optim.Adam([a, w], lr=self.lr)

        def loss_fn():
            r = torch.softmax(a / self.temperature, dim=0) @ w - eye  # (T, T)
            return torch.trace(r.T @ g @ r) / n_tasks**2

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # T x T problems: threads only add overhead (much of it on a busy machine)
        try:
            for _ in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn()
                loss.backward()
                optimizer.step()
        finally:
            torch.set_num_threads(threads)
        with torch.no_grad():
            self.loss_ = float(loss_fn()) * unit
            evals = torch.linalg.eigvalsh(gram).flip(0)  # descending
            self.loss_bound_ = float(evals[m:].clamp(min=0).sum()) / n_tasks**2
            self.energy_ = float(gram.trace()) / n_tasks**2  # the loss of W = 0
            mix = torch.softmax(a / self.temperature, dim=0)  # (T, M), columns sum to 1
            basis = mix.T @ v  # (M, N) = (V B)^T
        self.packed_["basis"] = _numpy32(basis)
        self.packed_["decoder"] = _numpy32(w.detach())
        return self

    def rebuild(self, task):
        self._check_task(task)
        w = torch.from_numpy(self.packed_["decoder"][:, self.tasks_.index(task)])  # (M,)
        return _unflatten(w @ torch.from_numpy(self.packed_["basis"]), self.shapes_)


class ClusterMean(Compressor):
    """Spectral clustering of the tasks, each task rebuilt as the mean of its cluster.

    Task Vector Bases (Zeng et al., 2025), clustering basis with mean as the inner merge:
    ``|cos|`` affinity of the flattened task vectors, spectral clustering with the number of
    clusters from the largest eigengap (tvbase's :class:`~tvbase.ingest.cluster.TaskClusterer`,
    fed the exact vectors rather than sketches). Stored: K cluster means in float32 (K, N) and
    one uint8 cluster label per task.

    Parameters
    ----------
    n_clusters : int or "auto"
    seed : int
        Seed of the k-means step of spectral clustering.
    """

    family = "cluster mean"
    reference = "Zeng et al., 2025, Efficient Model Editing with Task Vector Bases (spectral clustering + mean merge)"

    def __init__(self, n_clusters: int | str = "auto", seed: int = 0):
        self.n_clusters = n_clusters
        self.seed = seed

    def params(self):
        return {"n_clusters": self.n_clusters, "seed": self.seed}

    @property
    def label(self):
        fitted = getattr(self, "n_clusters_", None)
        if self.n_clusters == "auto":
            return "spectral clusters + mean (K eigengap" + (f" = {fitted})" if fitted is not None else ")")
        return f"spectral clusters + mean (K = {self.n_clusters})"

    def fit(self, task_vectors):
        self._start(task_vectors)
        x = _flatten(task_vectors, self.tasks_, list(self.shapes_))  # (T, N)
        clusterer = TaskClusterer(n_clusters=self.n_clusters, seed=self.seed).fit(x.numpy())
        self.labels_ = clusterer.labels_.astype(np.uint8)  # (T,)
        self.n_clusters_ = int(clusterer.n_clusters_)
        means = torch.stack([x[torch.from_numpy(self.labels_ == k)].mean(0) for k in range(self.n_clusters_)])  # (K, N)
        self.packed_["means"] = _numpy32(means)
        self.packed_["labels"] = self.labels_
        return self

    def rebuild(self, task):
        self._check_task(task)
        k = int(self.packed_["labels"][self.tasks_.index(task)])
        return _unflatten(torch.from_numpy(self.packed_["means"][k]), self.shapes_)


#: Baselines by name. :func:`make_baseline` builds one and lists these names for an unknown one.
BASELINES: dict[str, type[Compressor]] = {
    "fp32": Fp32,
    "fp16": Fp16,
    "int8": Int8,
    "bitdelta": BitDelta,
    "tsv-c": TsvCompress,
    "tall": TallMasks,
    "pca": CenteredPCA,
    "gram-ae": GramAutoencoder,
    "cluster-mean": ClusterMean,
}


def make_baseline(name: str, **params) -> Compressor:
    """A compressor of :data:`BASELINES` by name, constructed with ``params``."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")
    return BASELINES[name](**params)
