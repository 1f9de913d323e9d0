"""Published task-vector compressors that tvbase is measured against.

Every compressor follows one small interface, in the scikit-learn manner:

- ``__init__`` stores parameters only;
- ``fit(...)`` builds the compressed representation;
- ``nbytes_`` is the real size of the representation;
- ``rebuild(task)`` decodes one task vector;
- ``compose(coefficients)`` returns ``sum_t alpha_t * rebuild(t)``.

Two kinds implement it:

- Element-wise and per-task codecs (fp32, fp16, int8, BitDelta, TSV-C, TALL masks) are written
  here, since the library has no such codec: ``fit(task_vectors)`` keeps packed numpy arrays in
  ``packed_`` (what one would write to disk: codes, bit masks, scales, factors), ``nbytes_`` is
  the sum of their ``nbytes``, bits counted as whole bytes, scales and masks included (tensor
  names and shapes are known from the base and not counted), and ``rebuild`` decodes from
  ``packed_`` only. ``task_vectors`` is ``{task name: {tensor name: torch.Tensor}}`` (float32,
  CPU, the base's shapes; ``tau = theta_finetuned - theta_base``).
- Methods the library implements run through a real tvbase store (:class:`StoreMethod`):
  ``fit(base_path, task_paths)`` creates a store in a temporary directory and ingests the
  checkpoint files, ``rebuild`` is ``store.get``. The seed bases of Task Vector Bases
  (:class:`SeedPCA`, :class:`SeedAutoencoder`, :class:`SeedClusterMean`) are exactly what
  ``tvbase ingest --method pca|autoencoder|cluster-merge --components M`` stores
  (:mod:`tvbase.methods.seed`); nothing of them is re-implemented here. ``nbytes_`` is the store
  directory on disk, ``payload_bytes_`` its factor bytes plus the coefficients kept in its
  metadata.

Every compressor is deterministic for its ``seed``. The implementations follow the papers cited
in each docstring; none is copied. The coefficient rules of task arithmetic live in
:mod:`tvbase.coefficients`.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .. import FitParams, Store
from ..codec import matrix_shape
from ..codec.quantize import QuantizedMatrix, dequantize, quantize
from ..methods.seed import ties_merge

__all__ = [
    "BASELINES",
    "BitDelta",
    "Compressor",
    "Fp16",
    "Fp32",
    "Int8",
    "SeedAutoencoder",
    "SeedBasis",
    "SeedClusterMean",
    "SeedPCA",
    "StoreMethod",
    "TallMasks",
    "TsvCompress",
    "make_baseline",
]

TaskVectors = Mapping[str, Mapping[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _shapes(task_vectors: TaskVectors) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in the first task's order (every task has the same tensors)."""
    first = next(iter(task_vectors.values()))
    return {name: tuple(t.shape) for name, t in first.items()}


def _numpy32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


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
    #: How the representation is built and counted: "packed arrays" (written here) or "store".
    via = "packed arrays"

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

    def _dense(self, task: str, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Task ``task``'s tensor ``name`` if it was stored densely (key ``(task, name, "dense")``), else None."""
        dense = self.packed_.get((task, name, "dense"))
        return None if dense is None else torch.from_numpy(dense.astype(np.float32)).reshape(shape)

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
    dtype = "<f4"  # how each entry is stored

    def fit(self, task_vectors):
        self._start(task_vectors)
        for t, tensors in task_vectors.items():
            for name, x in tensors.items():
                self.packed_[t, name] = _numpy32(x).astype(self.dtype)
        return self

    def rebuild(self, task):
        self._check_task(task)
        return {n: torch.from_numpy(self.packed_[task, n].astype(np.float32)).reshape(s) for n, s in self.shapes_.items()}


class Fp16(Fp32):
    """Task vectors cast to IEEE float16 (half of fp32)."""

    family = "fp16"
    reference = "IEEE 754 half precision"
    dtype = "<f2"


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
        self._q_shapes = {}
        for t, tensors in task_vectors.items():
            for name, x in tensors.items():
                rows = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)  # (r, c)
                # tvbase's quantizer scales per column: transpose so each row gets its scale
                q = quantize(rows.T.contiguous(), 8)  # codes (c, r), scales (r,)
                self.packed_[t, name, "q"] = np.frombuffer(q.to_bytes(), dtype=np.uint8)
                self._q_shapes[t, name] = q.shape
        return self

    def rebuild(self, task):
        self._check_task(task)
        out = {}
        for name, shape in self.shapes_.items():
            q = QuantizedMatrix.from_bytes(self.packed_[task, name, "q"], 8, self._q_shapes[task, name])
            out[name] = dequantize(q).T.reshape(shape)  # (r, c) -> tensor shape
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
            out[name] = self._dense(task, name, shape)
            if out[name] is None:
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
            out[name] = self._dense(task, name, shape)
            if out[name] is None:
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
        Resolving Interference When Merging Models", NeurIPS) with ``ties_density``, computed by
        :func:`tvbase.methods.seed.ties_merge` (trim per tensor, as in mergekit).
    ties_density : float
        Fraction of the largest-magnitude entries of each tensor each task keeps before the TIES
        sign election (0.2 in the TIES paper).
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
        else:  # the library's TIES merge (tvbase.methods.seed), tensor by tensor
            merged = {
                n: ties_merge((task_vectors[t][n] for t in self.tasks_), self.ties_density).to(torch.float32)
                for n in self.shapes_
            }
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


# --------------------------------------------------------------------------------------------
# Methods of the library, through a real store
# --------------------------------------------------------------------------------------------


class StoreMethod(Compressor):
    """A method run through a real tvbase store: ``Store.create``, ``ingest`` of the checkpoints, ``get``.

    ``fit(base_path, task_paths)`` builds the store in a temporary directory, removed by
    :meth:`close` (or on leaving a ``with`` block). Subclasses say how: :meth:`fit_params` (the
    store's :class:`~tvbase.FitParams`) and :meth:`ingest_kwargs` (``method``, ``n_components``).

    Attributes (after ``fit``)
    --------------------------
    store_ : tvbase.Store
    nbytes_ : int
        The store directory on disk (``info()["disk_bytes"]``: payload, index, metadata and
        Icechunk history).
    factor_bytes_ : int
        Stored factors (``info()["factor_bytes"]``).
    coefficient_bytes_ : int
        Seed-basis coefficients, which the store keeps in its metadata: 4 bytes (fp32) per
        coefficient, ``4 * M`` per task; 0 for tvbase's own fit.
    payload_bytes_ : int
        ``factor_bytes_ + coefficient_bytes_``.
    raw_bytes_ : int
        Raw fp32 bytes of the ingested task vectors (``info()["raw_fp32_bytes"]``).
    """

    via = "store"

    def __init__(self, device: str = "cpu", seed: int = 0):
        self.device = device
        self.seed = seed
        self._dir = None

    def fit_params(self) -> FitParams:
        """The parameters the store is created with."""
        raise NotImplementedError

    def ingest_kwargs(self) -> dict:
        """Keyword arguments of ``Store.ingest`` besides the checkpoints."""
        return {}

    def params(self):
        return self.fit_params().to_dict()

    @property
    def nbytes_(self) -> int:
        return self.disk_bytes_

    def fit(self, base_path, task_paths) -> "StoreMethod":
        """Create a store for ``base_path`` and ingest ``task_paths`` ({task: checkpoint path})."""
        self.close()
        self._dir = Path(tempfile.mkdtemp(prefix="tvbase-bench-"))
        try:
            self.store_ = Store.create(self._dir / "store", base_path, params=self.fit_params())
            self.store_.ingest(dict(task_paths), device=self.device, progress=False, **self.ingest_kwargs())
        except BaseException:
            self.close()
            raise
        info = self.store_.info()
        self.tasks_ = list(task_paths)
        self.disk_bytes_ = int(info["disk_bytes"])
        self.factor_bytes_ = int(info["factor_bytes"])
        tasks = self.store_.meta["tasks"].values()
        self.coefficient_bytes_ = 4 * sum(len(tm.get("coefficients") or ()) for tm in tasks)  # fp32, in metadata
        self.payload_bytes_ = self.factor_bytes_ + self.coefficient_bytes_
        self.raw_bytes_ = int(info["raw_fp32_bytes"])
        self.n_clusters_ = int(info["clusters"])
        return self

    def rebuild(self, task):
        self._check_task(task)
        return self.store_.get(task, device=self.device)

    def compose(self, coefficients):
        return self.store_.compose(dict(coefficients), device=self.device)

    def close(self) -> None:
        """Remove the temporary store directory."""
        if getattr(self, "_dir", None) is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SeedBasis(StoreMethod):
    """A seed basis of Task Vector Bases as ``tvbase ingest --method METHOD --components M`` stores it.

    Zeng et al., 2025, "Efficient Model Editing with Task Vector Bases: A Theoretical Framework
    and Scalable Approach": ``tau_hat_t = mu + S c_t`` with ``M`` shared basis vectors ``S`` per
    tensor (a mean ``mu`` for PCA only) and one coefficient vector ``c_t`` per task, fitted by
    :func:`tvbase.methods.seed.fit_seed_basis` from the T x T Gram of the task vectors. The store
    keeps ``S`` and ``mu`` in fp32 (``FitParams(bits=32, dense_bits=32)``, as in the paper) and
    ``c_t`` in its metadata (counted as fp32).

    Parameters
    ----------
    n_components : int or None
        ``M``; None for the library's default (``T // 2``, or the eigengap for cluster merge).
    seed : int
        Seed of the autoencoder's initialization and of the clustering.
    device : str
        Where ingest and rebuild run.

    Attributes (after ``fit``)
    --------------------------
    n_components_ : int
        ``M`` as fitted.
    fit_info_ : dict
        The store's record of the fit (``store.meta["clusters"]``): method, n_components and the
        estimator's scalar diagnostics.
    """

    #: ``Store.ingest`` method name.
    method = ""

    def __init__(self, n_components: int | None = None, seed: int = 0, device: str = "cpu"):
        super().__init__(device=device, seed=seed)
        self.n_components = n_components

    def fit_params(self):
        return FitParams(bits=32, dense_bits=32, budget=0.5, seed=self.seed)

    def ingest_kwargs(self):
        return {"method": self.method, "n_components": self.n_components}

    def params(self):
        p = self.fit_params()
        return {"method": self.method, "n_components": self.n_components, "seed": self.seed,
                "bits": p.bits, "dense_bits": p.dense_bits}

    def fit(self, base_path, task_paths):
        super().fit(base_path, task_paths)
        (self.fit_info_,) = self.store_.meta["clusters"].values()  # one basis over the ingest
        self.n_components_ = int(self.fit_info_["n_components"])
        return self

    @property
    def _m(self):
        """M for labels: as given, else as fitted, else the library's default."""
        if self.n_components is not None:
            return self.n_components
        return getattr(self, "n_components_", "T/2")


class SeedPCA(SeedBasis):
    """Centered PCA basis (``tvbase ingest --method pca``): mean + M principal directions."""

    family = "PCA"
    reference = "Zeng et al., 2025, Efficient Model Editing with Task Vector Bases (centered PCA basis)"
    method = "pca"

    @property
    def label(self):
        return f"PCA M={self._m}"


class SeedAutoencoder(SeedBasis):
    """The Gram autoencoder basis (``tvbase ingest --method autoencoder``), library defaults.

    Softmax encoder over the tasks (temperature 5), Adam (lr 0.01, 6000 steps) on the Gram loss,
    decoder refitted by least squares (:class:`tvbase.methods.seed.GramAutoencoder`).

    Attributes (after ``fit``)
    --------------------------
    loss_ : float
        ``tr((BW - I)^T G (BW - I)) / T^2`` of the fitted basis and decoder.
    loss_bound_ : float
        ``sum_{i>M} lambda_i(G) / T^2``, which no M-vector basis can beat.
    energy_ : float or None
        ``trace(G) / T^2``, the loss of ``W = 0`` (None when the store did not record the
        eigenvalues, i.e. T > 64).
    """

    family = "Gram AE"
    reference = "Zeng et al., 2025, Efficient Model Editing with Task Vector Bases (autoencoder basis)"
    method = "autoencoder"

    @property
    def label(self):
        return f"Gram AE M={self._m}"

    def fit(self, base_path, task_paths):
        super().fit(base_path, task_paths)
        n_tasks = len(self.tasks_)
        self.loss_ = float(self.fit_info_["loss"])
        self.loss_bound_ = float(self.fit_info_["lower_bound"])
        eigenvalues = self.fit_info_.get("eigenvalues")
        self.energy_ = float(sum(eigenvalues)) / n_tasks**2 if eigenvalues is not None else None
        return self


class SeedClusterMean(SeedBasis):
    """Spectral clusters + mean (``tvbase ingest --method cluster-merge``): each task is its cluster's mean.

    ``|cos|`` affinity of the task vectors (from the Gram), spectral clustering with K by the
    largest eigengap unless given (:class:`tvbase.methods.seed.ClusterMerge`, merge ``"mean"``).

    Parameters
    ----------
    n_clusters : int or "auto"
        K, or "auto" for the eigengap.
    """

    family = "cluster mean"
    reference = "Zeng et al., 2025, Efficient Model Editing with Task Vector Bases (spectral clustering + mean merge)"
    method = "cluster-merge"

    def __init__(self, n_clusters: int | str = "auto", seed: int = 0, device: str = "cpu"):
        super().__init__(n_components=None if n_clusters == "auto" else n_clusters, seed=seed, device=device)
        self.n_clusters = n_clusters

    def params(self):
        return {**super().params(), "n_clusters": self.n_clusters}

    @property
    def label(self):
        fitted = getattr(self, "n_components_", None)
        if self.n_clusters == "auto":
            return "spectral clusters + mean (K eigengap" + (f" = {fitted})" if fitted is not None else ")")
        return f"spectral clusters + mean (K = {self.n_clusters})"

    def fit(self, base_path, task_paths):
        super().fit(base_path, task_paths)
        labels = self.fit_info_.get("labels")  # the store records them for T <= 64
        self.labels_ = None if labels is None else np.asarray(labels, dtype=np.int64)  # (T,), task order
        return self


#: Baselines by name. :func:`make_baseline` builds one and lists these names for an unknown one.
BASELINES: dict[str, type[Compressor]] = {
    "fp32": Fp32,
    "fp16": Fp16,
    "int8": Int8,
    "bitdelta": BitDelta,
    "tsv-c": TsvCompress,
    "tall": TallMasks,
    "pca": SeedPCA,
    "gram-ae": SeedAutoencoder,
    "cluster-mean": SeedClusterMean,
}


def make_baseline(name: str, **params) -> Compressor:
    """A compressor of :data:`BASELINES` by name, constructed with ``params``."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")
    return BASELINES[name](**params)
