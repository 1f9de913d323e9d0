"""Group tasks whose vectors share a subspace, from small sketches of the vectors.

Two steps, both cheap next to the factorization that follows:

1. :class:`TaskSketcher` streams one task vector tensor by tensor and folds each tensor into a
   CountSketch of ``dim`` numbers. The bucket and sign of every element depend only on
   ``(seed, tensor_index)``, so the same tensor of two tasks is hashed the same way and inner
   products of sketches estimate inner products of the full vectors without bias.
2. :class:`TaskClusterer` builds the ``|cosine|`` affinity of the sketches and runs spectral
   clustering on it, choosing the number of clusters by the largest eigengap of the normalized
   Laplacian (Zeng et al., 2025, "Task Vector Bases", section on clustered bases).

Example
-------
>>> sketcher = TaskSketcher(dim=1024, seed=0)
>>> sketch = sum(sketcher.sketch_tensor(i, t) for i, t in enumerate(task_tensors))  # doctest: +SKIP
>>> TaskClusterer().fit(np.stack(sketches)).labels_  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import numbers
import warnings

import numpy as np
import torch

from tvbase.errors import InvalidInputError

__all__ = ["TaskSketcher", "TaskClusterer"]

# Elements are hashed in chunks of this many, each chunk from its own seeded generator, so the
# working memory of `sketch_tensor` stays a few tens of MiB even for a 100M-element embedding.
# Part of the hash function: changing it changes every sketch (sketches are never stored, only
# compared within one fit, so that is harmless across versions).
_CHUNK = 1 << 20

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64: a bijective 64-bit mixer (Steele et al., 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _stream_seed(seed: int, tensor_index: int, chunk: int) -> int:
    """Generator seed for one chunk of one tensor.

    Mixed rather than added so that ``(seed=0, tensor 1)`` and ``(seed=1, tensor 0)`` do not share
    a stream. Kept below 2**63 because ``torch.Generator.manual_seed`` is happiest there.
    """
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (tensor_index & _MASK64))
    x = _splitmix64(x ^ (chunk & _MASK64))
    return x >> 1


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    """Reject bools, floats and out-of-range values with a message quoting ``value``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidInputError(f"{name} must be {bound}, got {value!r}")
    return value


class _ParamsRepr:
    """``repr`` listing every ``__init__`` parameter in signature order, as scikit-learn
    estimators store them: one place instead of a hand-kept list per class."""

    def __repr__(self) -> str:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


class TaskSketcher(_ParamsRepr):
    """CountSketch of a task vector, computed one tensor at a time.

    Every element ``i`` of tensor ``tensor_index`` goes to bucket ``h(i)`` in ``[0, dim)`` with sign
    ``s(i)`` in ``{-1, +1}``, both drawn from a ``torch.Generator`` seeded by
    ``(seed, tensor_index)``. For two task vectors ``a`` and ``b`` sketched with the same
    parameters, ``E[<S a, S b>] = <a, b>`` (the signs are independent across elements), and the
    variance shrinks as ``1 / dim``.

    Parameters
    ----------
    dim : int, default=16384
        Length of a sketch: 128 KiB of float64 per task; the hashing work does not depend on it.
        The error of a cosine shrinks as ``1 / sqrt(dim)``. On the benchmark's 25-task zoos
        (cosines 0.13 on average) 1024 made errors up to 0.09 and the clusters changed with the
        seed; 16384 keeps them under 0.03 and gives the same clusters for every seed.
    seed : int, default=0
        Seed of the hash. Every task that is to be compared must use the same seed.

    Notes
    -----
    The hash is computed on the CPU whatever the tensor's device, so sketches do not depend on
    the device. Working memory is ``O(min(numel, 2**20))`` on top of the input tensor.
    """

    def __init__(self, dim: int = 16384, seed: int = 0):
        # No fit step: validate here, at the boundary.
        self.dim = _check_int("dim", dim, 1)
        self.seed = _check_int("seed", seed, 0)

    @torch.no_grad()
    def sketch_tensor(self, tensor_index: int, tensor: torch.Tensor) -> torch.Tensor:
        """Sketch of one tensor of a task vector.

        Parameters
        ----------
        tensor_index : int
            Position of the tensor in the model's fixed (sorted) tensor order; must be the same
            for the same parameter across tasks.
        tensor : torch.Tensor of any shape, real dtype, any device
            One tensor of the task vector (``theta_finetuned - theta_base``).

        Returns
        -------
        torch.Tensor of shape (dim,), dtype float64, on the CPU
            Sum these over all tensors of a task to get the task's sketch.
        """
        tensor_index = _check_int("tensor_index", tensor_index, 0)
        if not isinstance(tensor, torch.Tensor):
            raise InvalidInputError(
                f"tensor {tensor_index}: expected a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.is_complex():
            raise InvalidInputError(
                f"tensor {tensor_index}: expected a real dtype, got {tensor.dtype}"
            )
        flat = tensor.detach().reshape(-1)  # (numel,), a view when contiguous
        out = torch.zeros(self.dim, dtype=torch.float64)
        for chunk, start in enumerate(range(0, flat.numel(), _CHUNK)):
            part = flat[start : start + _CHUNK].to(device="cpu", dtype=torch.float64)
            gen = torch.Generator().manual_seed(_stream_seed(self.seed, tensor_index, chunk))
            # One draw in [0, 2*dim) gives both: bucket = r mod dim, sign = - iff r >= dim.
            r = torch.randint(0, 2 * self.dim, (part.numel(),), generator=gen)
            signs = (r >= self.dim).to(torch.float64).mul_(-2.0).add_(1.0)  # (n,) of +-1
            out.index_add_(0, r.remainder_(self.dim), part * signs)  # not in place: may alias input
        return out


def _cosine_affinity(sketches: np.ndarray) -> np.ndarray:
    """``|cos|`` between rows, with ones on the diagonal.

    Absolute because a contradictory task (``tau' ~ -tau``) lives in the same subspace and is
    stored best by the same basis. A zero row has cosine 0 with every other row.
    """
    norms = np.linalg.norm(sketches, axis=1)  # (T,)
    safe = np.where(norms > 0, norms, 1.0)
    unit = sketches / safe[:, None]  # (T, dim); zero rows stay zero
    affinity = np.abs(unit @ unit.T)  # (T, T)
    np.clip(affinity, 0.0, 1.0, out=affinity)  # rounding can push |cos| a hair above 1
    np.fill_diagonal(affinity, 1.0)
    return affinity


def _laplacian_eigenvalues(affinity: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of ``I - D^-1/2 A D^-1/2``; ``D >= 1`` thanks to the unit diagonal."""
    inv_sqrt = 1.0 / np.sqrt(affinity.sum(axis=1))  # (T,)
    laplacian = np.eye(len(affinity)) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    return np.linalg.eigvalsh(laplacian)  # (T,), ascending


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters by the smallest task index they contain: task 0 is always in cluster 0."""
    order = {}
    for label in labels.tolist():
        order.setdefault(label, len(order))
    return np.array([order[label] for label in labels.tolist()], dtype=np.int64)


class TaskClusterer(_ParamsRepr):
    """Spectral clustering of tasks on the ``|cosine|`` of their sketches.

    Parameters
    ----------
    n_clusters : int or "auto", default="auto"
        Number of clusters, in ``[1, n_tasks]``. ``"auto"`` picks ``k`` in
        ``[1, min(max_clusters, n_tasks - 1)]`` by the largest eigengap
        ``lambda_k - lambda_{k-1}`` of the symmetric normalized Laplacian of the affinity.
    max_clusters : int, default=8
        Upper bound for ``"auto"``. Ignored when ``n_clusters`` is an integer.
    min_clusters : int, default=1
        Lower bound for ``"auto"`` (capped at ``k_max``). The |cos| affinity of task vectors is a
        dense, connected graph, so the gap after ``lambda_0 = 0`` is nearly always the largest;
        a lower bound of 2 lets the eigengap choose among real splits.
    seed : int, default=0
        ``random_state`` of the k-means step inside spectral clustering, in ``[0, 2**32 - 1]``.

    Attributes
    ----------
    labels_ : ndarray of shape (n_tasks,), dtype int64
        Cluster of each task. Clusters are numbered in order of their smallest task index.
    n_clusters_ : int
        Number of distinct clusters in ``labels_``.
    affinity_ : ndarray of shape (n_tasks, n_tasks), dtype float64
        ``|cos|`` between the sketches, ones on the diagonal, in ``[0, 1]``.
    eigenvalues_ : ndarray of shape (n_tasks,), dtype float64
        Ascending eigenvalues of the normalized Laplacian of ``affinity_``.
    eigengap_ : ndarray of shape (k_max,), dtype float64
        ``eigengap_[k - 1] = eigenvalues_[k] - eigenvalues_[k - 1]`` for ``k`` in
        ``[1, k_max]``, ``k_max = min(max_clusters, n_tasks - 1)``; empty when ``n_tasks == 1``.
        With ``"auto"``, ``n_clusters_ = argmax(eigengap_) + 1``.

    Notes
    -----
    With two tasks or fewer, or ``n_clusters == 1``, every task goes to cluster 0: a cluster basis
    for two tasks saves nothing over two per-task factorizations.
    """

    def __init__(self, n_clusters: int | str = "auto", max_clusters: int = 8, seed: int = 0, min_clusters: int = 1):
        self.min_clusters = min_clusters
        self.n_clusters = n_clusters
        self.max_clusters = max_clusters
        self.seed = seed

    def _validate(self, sketches) -> tuple[np.ndarray, int | None, int, int]:
        """Check inputs and parameters; return the sketches as float64 and the clean parameters."""
        x = np.asarray(sketches, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 1:
            raise InvalidInputError(
                f"sketches must be a 2-D array of shape (n_tasks >= 1, dim), got shape {x.shape}"
            )
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if bad.size:
            raise InvalidInputError(
                f"sketches of tasks {bad[:10].tolist()} contain NaN or inf; "
                "check those task vectors for non-finite values"
            )
        n_tasks = x.shape[0]
        if isinstance(self.n_clusters, str):
            if self.n_clusters != "auto":
                raise InvalidInputError(
                    f"n_clusters must be an integer or 'auto', got {self.n_clusters!r}"
                )
            n_clusters = None
        else:
            n_clusters = _check_int("n_clusters", self.n_clusters, 1, n_tasks)
        max_clusters = _check_int("max_clusters", self.max_clusters, 1)
        seed = _check_int("seed", self.seed, 0, 2**32 - 1)
        return x, n_clusters, max_clusters, seed

    def fit(self, sketches: np.ndarray, y=None) -> "TaskClusterer":
        """Cluster the tasks.

        Parameters
        ----------
        sketches : array-like of shape (n_tasks, dim)
            One sketch per task (see :class:`TaskSketcher`); any real dtype, converted to float64.
        y : None
            Ignored; scikit-learn convention.

        Returns
        -------
        self : TaskClusterer
        """
        x, n_clusters, max_clusters, seed = self._validate(sketches)
        n_tasks = x.shape[0]

        self.affinity_ = _cosine_affinity(x)  # (T, T)
        self.eigenvalues_ = _laplacian_eigenvalues(self.affinity_)  # (T,)
        k_max = min(max_clusters, n_tasks - 1)
        self.eigengap_ = np.diff(self.eigenvalues_)[:k_max]  # (k_max,)

        if n_clusters is None:
            # argmax takes the first maximum: ties go to fewer clusters (a bigger shared basis).
            low = min(_check_int("min_clusters", self.min_clusters, 1), max(k_max, 1)) - 1
            n_clusters = int(np.argmax(self.eigengap_[low:])) + 1 + low if n_tasks > 2 else 1
        if n_tasks <= 2 or n_clusters == 1:
            labels = np.zeros(n_tasks, dtype=np.int64)
        elif n_clusters == n_tasks:
            # One task per cluster; the spectral embedding cannot give T components anyway.
            labels = np.arange(n_tasks, dtype=np.int64)
        else:
            labels = self._spectral(n_clusters, seed)

        self.labels_ = _relabel(labels)  # (T,)
        self.n_clusters_ = int(self.labels_.max()) + 1
        return self

    def fit_predict(self, sketches: np.ndarray, y=None) -> np.ndarray:
        """Fit and return ``labels_``, of shape (n_tasks,), dtype int64."""
        return self.fit(sketches).labels_

    def _spectral(self, n_clusters: int, seed: int) -> np.ndarray:
        from sklearn.cluster import SpectralClustering  # sklearn import is slow; only when needed

        model = SpectralClustering(
            n_clusters=n_clusters, affinity="precomputed", random_state=seed
        )
        with warnings.catch_warnings():
            # Exactly orthogonal or zero sketches disconnect the graph; the embedding still
            # separates the components, which is what we want.
            warnings.filterwarnings("ignore", message="Graph is not fully connected")
            return model.fit_predict(self.affinity_)
