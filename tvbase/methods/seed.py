"""Seed bases of Zeng et al. (2025), "Task Vector Bases": PCA, Gram autoencoder, cluster merge.

All three compress ``T`` task vectors into ``M`` shared basis vectors and one coefficient
vector per task, so the store can treat them alike. For every tensor::

    tau_hat_t = mu + S @ c_t        # S (numel, M) shared, c_t (M,) per task, mu (numel,) or 0

Everything is derived from the ``T x T`` Gram matrix ``G = V^T V`` of the stacked, flattened
task vectors ``V`` (numel_total, T), which is accumulated tensor by tensor; the data is read
in two passes and never held for all tasks at once:

1. :func:`gram_matrix` reads every (task, tensor) once (more only when one tensor of all the
   tasks does not fit in ``max_block_bytes``) and sums the per-tensor Grams.
2. An estimator fits on ``G`` alone: :class:`PCABasis`, :class:`GramAutoencoder`,
   :class:`ClusterMerge`. For PCA, the autoencoder and cluster means the basis is a *linear*
   map of the task vectors, ``S = V @ mixing_`` and ``mu = V @ mean_weights_``, so every
   reconstruction error follows from ``G`` without touching the data again.
3. :meth:`SeedBasisResult.iter_tensors` makes ``S`` and ``mu`` of one tensor at a time, reading
   each task's copy of that tensor once (TIES merging is elementwise and is done here, still
   in one read, see :class:`_TiesAccumulator`).

Example
-------
>>> result = fit_seed_basis(source, tasks, shapes, "pca", n_components=4)  # doctest: +SKIP
>>> for name, S, mu in result.iter_tensors():  # doctest: +SKIP
...     tau_hat = mu + S @ torch.from_numpy(result.coefficients["math"]).float()
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from ..codec import SharedBasis, TaskTensor
from ..codec.quantize import quantize
from ..errors import InvalidInputError, NotFoundError
from .cluster import TaskClusterer, _check_int, _ParamsRepr
from .registry import METHODS
from .result import FitResult, measure_errors

__all__ = [
    "SEED_METHODS",
    "SeedBasisFit",
    "ClusterMerge",
    "GramAutoencoder",
    "PCABasis",
    "SeedBasisResult",
    "SeedMethod",
    "fit_seed_basis",
    "gram_matrix",
    "ties_merge",
]

# Eigenvalues of a Gram at or below this fraction of the largest (times T) are taken as zero:
# the Gram is summed in float64 from float32 data, so its relative rounding is ~1e-16 * sqrt(n);
# a direction that small carries at most ~1e-6 of a task's norm, so dropping it costs nothing.
_EIG_RTOL = 1e-12


# -- small helpers --------------------------------------------------------------------------------


def _check_float(name: str, value, low: float, high: float | None = None, *, open_low=True) -> float:
    """Reject bools, non-numbers, NaN and out-of-range values with a message quoting ``value``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    too_low = value <= low if open_low else value < low
    if too_low or (high is not None and value > high):
        left = "(" if open_low else "["
        right = f"{high}]" if high is not None else "inf)"
        raise InvalidInputError(f"{name} must be in {left}{low}, {right}, got {value!r}")
    return value


def _check_gram(gram) -> np.ndarray:
    """A square, finite, symmetric (to rounding) Gram as float64, symmetrized exactly."""
    g = np.asarray(gram.cpu() if isinstance(gram, torch.Tensor) else gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 1:
        raise InvalidInputError(f"gram must be a square matrix of shape (T >= 1, T), got shape {g.shape}")
    if not np.isfinite(g).all():
        raise InvalidInputError("gram contains NaN or inf; check the task vectors for non-finite values")
    scale = max(float(np.abs(g).max()), np.finfo(np.float64).tiny)
    if float(np.abs(g - g.T).max()) > 1e-8 * scale:
        raise InvalidInputError("gram must be symmetric (G = V^T V), got an asymmetric matrix")
    return (g + g.T) / 2


def _default_components(n_components, n_tasks: int) -> int:
    """``n_components``, or ``T // 2`` (at least 1) as in the paper's experiments."""
    if n_components is None:
        return max(1, n_tasks // 2)
    return _check_int("n_components", n_components, 1, n_tasks)


def _eigh_desc(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a symmetric matrix, largest first, negatives clipped to 0, signs fixed.

    Returns
    -------
    eigenvalues : ndarray of shape (T,), descending, >= 0
    eigenvectors : ndarray of shape (T, T), column ``i`` for ``eigenvalues[i]``; the entry of
        largest magnitude of each column is positive (scikit-learn's ``svd_flip`` convention),
        so the result does not depend on the LAPACK build.
    """
    values, vectors = np.linalg.eigh(g)  # ascending
    values, vectors = values[::-1].clip(min=0.0), vectors[:, ::-1]
    pivot = np.abs(vectors).argmax(axis=0)  # (T,)
    signs = np.sign(vectors[pivot, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return values.copy(), vectors * signs


def _gram_factor(g: np.ndarray) -> np.ndarray:
    """Rows ``L`` (T, T) with ``L @ L.T == G`` (eigen factor; works for singular ``G``)."""
    values, vectors = _eigh_desc(g)
    return vectors * np.sqrt(values)  # (T, T)


def _rank_cutoff(values: np.ndarray) -> float:
    return float(values.max(initial=0.0)) * max(len(values), 1) * _EIG_RTOL


# -- pass 1: the Gram -----------------------------------------------------------------------------


def _read(source, task: str, name: str, numel: int, device: torch.device) -> torch.Tensor:
    """One tensor of one task, flattened to (numel,) float64 on ``device``; checked at the boundary."""
    x = source.tensor(task, name)
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(
            f"task {task!r}, tensor {name!r}: source returned {type(x).__name__}, expected a torch.Tensor"
        )
    if x.numel() != numel:
        raise InvalidInputError(
            f"task {task!r}, tensor {name!r}: expected {numel} elements (shapes), got {x.numel()} "
            f"(shape {tuple(x.shape)}); the checkpoint does not match the base model"
        )
    if x.is_complex():
        raise InvalidInputError(f"task {task!r}, tensor {name!r}: expected a real dtype, got {x.dtype}")
    x = x.detach().reshape(-1).to(device=device, dtype=torch.float64)  # (numel,)
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError(f"task {task!r}, tensor {name!r}: contains NaN or inf")
    return x


@torch.no_grad()
def gram_matrix(source, tasks, shapes, *, device="cpu", max_block_bytes: int = 1 << 30) -> np.ndarray:
    """``G = V^T V`` of the task vectors, summed tensor by tensor.

    Parameters
    ----------
    source : object with ``tensor(task, name) -> torch.Tensor``
        Any shape with ``prod(shapes[name])`` elements, any real dtype (float32 expected).
    tasks : list of str, length T
    shapes : dict tensor name -> shape
    device : torch device for the products (float64).
    max_block_bytes : int, default=1 GiB
        Most bytes spent on copies of one tensor: ``b = max_block_bytes // (8 * numel)`` tasks'
        copies are held at once. When ``b >= T`` (the usual case) every (task, tensor) is read
        once; otherwise the tasks are processed in blocks of ``b`` and a task is read at most
        ``ceil(T / b)`` times, so peak memory stays bounded whatever ``T``.

    Returns
    -------
    ndarray of shape (T, T), dtype float64
        Symmetric, positive semi-definite up to rounding; ``G[i, j] = <tau_i, tau_j>``.
    """
    device = torch.device(device)
    n_tasks = len(tasks)
    gram = torch.zeros(n_tasks, n_tasks, dtype=torch.float64, device=device)
    for name, shape in shapes.items():
        numel = math.prod(int(s) for s in shape)
        width = max(1, min(n_tasks, max_block_bytes // max(8 * numel, 1)))
        for start in range(0, n_tasks, width):
            stop = min(start + width, n_tasks)
            block = torch.empty(numel, stop - start, dtype=torch.float64, device=device)  # (numel, b)
            for j, task in enumerate(tasks[start:stop]):
                block[:, j] = _read(source, task, name, numel, device)
            gram[start:stop, start:stop] += block.T @ block
            for j in range(stop, n_tasks):  # later tasks, streamed: G is symmetric
                products = block.T @ _read(source, tasks[j], name, numel, device)  # (b,)
                gram[start:stop, j] += products
                gram[j, start:stop] += products
    gram = gram.cpu().numpy()
    return (gram + gram.T) / 2


# -- pass 2: estimators on the Gram -------------------------------------------------------------


class PCABasis(_ParamsRepr):
    """Centered PCA of the task vectors, from their Gram (Zeng et al., 2025).

    With ``C = I - 11^T / T`` the centering matrix, ``Gc = C G C`` is the Gram of the centered
    vectors ``Vc = V C``. Its top ``M`` eigenpairs ``(Lambda, U)`` give the principal
    directions ``S = Vc U Lambda^{-1/2}`` (orthonormal) and the scores ``c_t = Lambda^{1/2} U[t]``,
    so ``tau_hat_t = mu + S c_t`` with ``mu = V 1 / T``.

    Parameters
    ----------
    n_components : int or None, default=None
        ``M`` in ``[1, T]``; ``None`` gives ``T // 2`` (at least 1). Centered data has rank at
        most ``T - 1``: from ``M = T - 1`` on, reconstruction is exact, and the columns past
        the rank are zero (so ``M = T`` is accepted and exact too).

    Attributes
    ----------
    n_components_ : int
    mixing_ : ndarray of shape (T, M)
        ``S = V @ mixing_``; equals ``C U Lambda^{-1/2}``, zero columns past the rank.
    mean_weights_ : ndarray of shape (T,)
        ``mu = V @ mean_weights_``; all ``1 / T``.
    coefficients_ : ndarray of shape (T, M)
        Row ``t`` is ``c_t``, the principal component scores of task ``t``.
    eigenvalues_ : ndarray of shape (T,)
        Eigenvalues of ``Gc``, descending (squared singular values of ``Vc``).
    explained_variance_ratio_ : ndarray of shape (M,)
        Fraction of the centered energy ``trace(Gc)`` captured by each component.
    """

    def __init__(self, n_components: int | None = None):
        self.n_components = n_components

    def fit(self, gram, y=None) -> "PCABasis":
        """Fit from the Gram.

        Parameters
        ----------
        gram : array-like of shape (T, T)
            ``G = V^T V`` (see :func:`gram_matrix`).
        y : None
            Ignored; scikit-learn convention.

        Returns
        -------
        self : PCABasis
        """
        g = _check_gram(gram)
        n_tasks = g.shape[0]
        m = _default_components(self.n_components, n_tasks)

        center = np.eye(n_tasks) - 1.0 / n_tasks  # (T, T)
        values, vectors = _eigh_desc(center @ g @ center)
        keep = values[:m] > _rank_cutoff(values)  # (M,); False past the rank: zero columns
        scale = np.where(keep, np.sqrt(np.where(keep, values[:m], 1.0)), 0.0)  # Lambda^{1/2}
        inv_scale = np.where(keep, 1.0 / np.where(keep, scale, 1.0), 0.0)  # Lambda^{-1/2}

        self.n_components_ = m
        self.eigenvalues_ = values
        self.mixing_ = center @ vectors[:, :m] * inv_scale  # (T, M)
        self.mean_weights_ = np.full(n_tasks, 1.0 / n_tasks)  # (T,)
        self.coefficients_ = vectors[:, :m] * scale  # (T, M)
        total = values.sum()
        self.explained_variance_ratio_ = values[:m] / total if total > 0 else np.zeros(m)
        return self

    def _info(self) -> dict:
        return {
            "eigenvalues": self.eigenvalues_,
            "explained_variance_ratio": self.explained_variance_ratio_,
            "rank": int((self.eigenvalues_ > _rank_cutoff(self.eigenvalues_)).sum()),
        }


class GramAutoencoder(_ParamsRepr):
    """The Gram autoencoder of Zeng et al. (2025): convex mixtures of tasks as the basis.

    An encoder ``B = softmax(A / tau, dim=0)`` (T, M) mixes the tasks into ``M`` basis vectors
    ``S = V B``: each column of ``B`` is a convex combination (nonnegative, sums to one). A
    linear decoder ``W`` (M, T) maps them back, ``V_hat = S W``. The loss is the mean squared
    reconstruction error, computable from the Gram alone::

        loss = ||V (B W - I)||_F^2 / T^2 = tr((B W - I)^T G (B W - I)) / T^2

    ``A`` (seeded ``randn``) and ``W`` (zeros) are trained together by Adam, as in the paper's
    code (uiuctml/TaskVectorBasis, ``src/basis_vectors.py``: ``GramTrainer``).

    Because ``B W`` has rank at most ``M``, the loss can never beat the spectral bound
    ``sum_{i > M} lambda_i(G) / T^2`` (Eckart-Young), which a rank-M SVD attains; the convexity of
    ``B``'s columns is what can keep the autoencoder above it.

    Parameters
    ----------
    n_components : int or None, default=None
        ``M`` in ``[1, T]``; ``None`` gives ``T // 2`` (at least 1), the paper's choice.
    tau : float, default=5.0
        Softmax temperature; the paper's value. Larger keeps ``B`` closer to uniform mixing.
    lr : float, default=0.01
        Adam learning rate (paper).
    steps : int, default=6000
        Adam steps (paper).
    weight_decay : float, default=1e-6
        Adam weight decay on ``A`` and ``W`` (the paper's code default).
    refit_decoder : bool, default=True
        After training, replace ``W`` by the exact minimizer of the loss for the trained ``B``,
        ``W = (B^T G B)^+ B^T G`` (computed as a least-squares solve on a factor of ``G``). It
        can only lower the loss, removes what is left of Adam's noise, and makes ``M = T``
        exact whenever ``B`` is invertible (``B W = I``), as the paper's checkable facts
        require. ``False`` keeps Adam's ``W`` as in the paper's code.
    seed : int, default=0
        Seed of the initial ``A``.

    Attributes
    ----------
    n_components_ : int
    mixing_ : ndarray of shape (T, M)
        ``B``: ``S = V @ mixing_``; columns nonnegative, summing to one.
    logits_ : ndarray of shape (T, M)
        The trained ``A``.
    coefficients_ : ndarray of shape (T, M)
        ``W.T``: row ``t`` is ``c_t = W[:, t]``.
    mean_weights_ : None
        No mean vector.
    loss_ : float
        Final loss, in the units of ``G`` (after the decoder refit when enabled).
    adam_loss_ : float
        Loss with Adam's own ``W`` at the end of training.
    lower_bound_ : float
        ``sum_{i > M} lambda_i(G) / T^2``.
    eigenvalues_ : ndarray of shape (T,)
        Eigenvalues of ``G``, descending.

    Notes
    -----
    Training runs on ``G / mean(diag(G))``: the minimizers are the same, and it keeps the
    gradients far above Adam's ``eps`` whatever the scale of the task vectors. Losses are
    reported in the units of ``G``. Float64 numpy on the CPU: the problem is ``T x T``.
    """

    def __init__(
        self,
        n_components: int | None = None,
        tau: float = 5.0,
        lr: float = 0.01,
        steps: int = 6000,
        weight_decay: float = 1e-6,
        refit_decoder: bool = True,
        seed: int = 0,
    ):
        self.n_components = n_components
        self.tau = tau
        self.lr = lr
        self.steps = steps
        self.weight_decay = weight_decay
        self.refit_decoder = refit_decoder
        self.seed = seed

    def fit(self, gram, y=None) -> "GramAutoencoder":
        """Train on the Gram.

        Parameters
        ----------
        gram : array-like of shape (T, T)
            ``G = V^T V`` (see :func:`gram_matrix`).
        y : None
            Ignored; scikit-learn convention.

        Returns
        -------
        self : GramAutoencoder
        """
        g = _check_gram(gram)
        n_tasks = g.shape[0]
        m = _default_components(self.n_components, n_tasks)
        tau = _check_float("tau", self.tau, 0.0)
        lr = _check_float("lr", self.lr, 0.0)
        steps = _check_int("steps", self.steps, 0)
        weight_decay = _check_float("weight_decay", self.weight_decay, 0.0, open_low=False)
        seed = _check_int("seed", self.seed, 0)
        if not isinstance(self.refit_decoder, bool):
            raise InvalidInputError(f"refit_decoder must be True or False, got {self.refit_decoder!r}")

        values, _ = _eigh_desc(g)
        scale = float(np.trace(g)) / n_tasks  # mean squared norm of a task vector
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(n_tasks, m, generator=gen, dtype=torch.float64).numpy()  # A (T, M)
        decoder = np.zeros((m, n_tasks))  # W (M, T)
        if scale > 0:
            logits, decoder = _train_autoencoder(g / scale, logits, decoder, tau, lr, steps, weight_decay)
        mixing = _softmax_columns(logits / tau)  # B (T, M)

        factor = _gram_factor(g)  # (T, T), G = L L^T: loss = ||L^T (B W - I)||^2 / T^2
        self.adam_loss_ = _ae_loss(factor, mixing, decoder)
        if self.refit_decoder:
            # argmin_W ||L^T B W - L^T||_F: least squares, min-norm when L^T B is rank deficient.
            decoder = np.linalg.lstsq(factor.T @ mixing, factor.T, rcond=None)[0]  # (M, T)
        self.n_components_ = m
        self.logits_ = logits
        self.mixing_ = mixing
        self.mean_weights_ = None
        self.coefficients_ = decoder.T.copy()  # (T, M)
        self.loss_ = _ae_loss(factor, mixing, decoder)
        self.eigenvalues_ = values
        self.lower_bound_ = float(values[m:].sum()) / n_tasks**2
        return self

    def _info(self) -> dict:
        return {
            "loss": self.loss_,
            "adam_loss": self.adam_loss_,
            "lower_bound": self.lower_bound_,
            "eigenvalues": self.eigenvalues_,
            "mixing": self.mixing_,
        }


def _softmax_columns(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _ae_loss(factor: np.ndarray, mixing: np.ndarray, decoder: np.ndarray) -> float:
    """``tr((BW - I)^T G (BW - I)) / T^2`` as a sum of squares (never negative from rounding)."""
    n_tasks = factor.shape[0]
    residual = factor.T @ (mixing @ decoder - np.eye(n_tasks))  # (T, T)
    return float(np.square(residual).sum()) / n_tasks**2


def _train_autoencoder(g, logits, decoder, tau, lr, steps, weight_decay):
    """Adam on ``A`` (T, M) and ``W`` (M, T) for the Gram loss; returns the trained copies.

    Hand-written gradients and Adam in float64 numpy: the matrices are ``T x T``, so torch's
    per-op and threading overhead would dominate (about 20x slower, and erratic on a busy
    machine). Same update as ``torch.optim.Adam`` (betas 0.9, 0.999, eps 1e-8, L2 weight decay
    added to the gradient); ``tests/test_seed.py`` checks it against autograd and torch's Adam.

    Gradients, with ``E = B W - I`` and ``D = 2 G E / T^2`` (= dloss/dE, G symmetric)::

        dW = B^T D        dB = D W^T        dA[:, k] = B[:, k] * (dB[:, k] - <B[:, k], dB[:, k]>) / tau
    """
    n_tasks = g.shape[0]
    eye = np.eye(n_tasks)
    params = [logits.copy(), decoder.copy()]
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        a, w = params
        b = _softmax_columns(a / tau)  # (T, M), columns convex
        d = (2.0 / n_tasks**2) * (g @ (b @ w - eye))  # (T, T)
        grad_b = d @ w.T  # (T, M)
        grad_a = b * (grad_b - (b * grad_b).sum(axis=0, keepdims=True)) / tau  # softmax backward
        grads = [grad_a, b.T @ d]
        for p, grad, m, v in zip(params, grads, moments, squares):
            grad = grad + weight_decay * p
            m *= beta1
            m += (1 - beta1) * grad
            v *= beta2
            v += (1 - beta2) * grad * grad
            step_size = lr / (1 - beta1**step)
            p -= step_size * m / (np.sqrt(v / (1 - beta2**step)) + eps)
    return params


class ClusterMerge(_ParamsRepr):
    """Cluster the tasks, merge each cluster into one basis vector (Zeng et al., 2025).

    Spectral clustering on the ``|cosine|`` similarity of the task vectors,
    ``|G_ij| / sqrt(G_ii G_jj)`` (done by :class:`~tvbase.methods.cluster.TaskClusterer` on the
    rows of an exact factor of ``G``, whose inner products are ``G``), with the number of
    clusters by the largest eigengap unless given. Basis vector ``k`` is the merge of cluster
    ``k``'s task vectors and ``c_t`` is the one-hot of ``t``'s cluster, so ``tau_hat_t`` is its
    cluster's merged vector.

    Parameters
    ----------
    n_components : int or None, default=None
        Number of clusters ``M`` in ``[1, T]``; ``None`` picks it by eigengap in
        ``[1, min(max_clusters, T - 1)]``. ``M = T`` puts every task in its own cluster (exact
        with ``merge="mean"``).
    merge : {"mean", "ties"}, default="mean"
        Inner merge. ``"mean"``: the average of the cluster (linear, ``S = V @ mixing_``).
        ``"ties"``: TIES-merging (Yadav et al., 2023), elementwise, see :func:`ties_merge`.
    density : float, default=0.2
        TIES only: fraction of entries of each task's tensor kept by the trim step (the
        paper's k = 20%).
    max_clusters : int, default=8
        Upper bound of the eigengap search.
    seed : int, default=0
        ``random_state`` of the spectral clustering.

    Attributes
    ----------
    n_components_ : int
        Number of clusters found.
    labels_ : ndarray of shape (T,), dtype int64
        Cluster of each task, numbered by smallest task index.
    mixing_ : ndarray of shape (T, M) or None
        ``"mean"``: ``1 / |cluster k|`` where task ``t`` is in cluster ``k``; None for ``"ties"``.
    mean_weights_ : None
    coefficients_ : ndarray of shape (T, M)
        One-hot rows.
    clusterer_ : TaskClusterer
        The fitted clusterer (affinity, Laplacian eigenvalues, eigengaps).
    """

    _MERGES = ("mean", "ties")

    def __init__(
        self,
        n_components: int | None = None,
        merge: str = "mean",
        density: float = 0.2,
        max_clusters: int = 8,
        seed: int = 0,
    ):
        self.n_components = n_components
        self.merge = merge
        self.density = density
        self.max_clusters = max_clusters
        self.seed = seed

    def fit(self, gram, y=None) -> "ClusterMerge":
        """Cluster from the Gram.

        Parameters
        ----------
        gram : array-like of shape (T, T)
            ``G = V^T V`` (see :func:`gram_matrix`).
        y : None
            Ignored; scikit-learn convention.

        Returns
        -------
        self : ClusterMerge
        """
        g = _check_gram(gram)
        n_tasks = g.shape[0]
        if self.n_components is not None and self.n_components != "auto":
            _check_int("n_components", self.n_components, 1, n_tasks)
        if self.merge not in self._MERGES:
            raise InvalidInputError(
                f"unknown merge {self.merge!r}; valid choices: {', '.join(self._MERGES)}"
            )
        _check_float("density", self.density, 0.0, 1.0)

        n_clusters = "auto" if self.n_components in (None, "auto") else self.n_components
        self.clusterer_ = TaskClusterer(
            n_clusters=n_clusters, max_clusters=self.max_clusters, seed=self.seed
        ).fit(_gram_factor(g))
        labels = self.clusterer_.labels_  # (T,)
        if n_clusters == n_tasks:
            # TaskClusterer puts T <= 2 tasks in one cluster; an explicit M = T means one each.
            labels = np.arange(n_tasks, dtype=np.int64)
        m = int(labels.max()) + 1
        one_hot = np.zeros((n_tasks, m))
        one_hot[np.arange(n_tasks), labels] = 1.0  # (T, M)

        self.n_components_ = m
        self.labels_ = labels
        self.coefficients_ = one_hot
        self.mixing_ = one_hot / one_hot.sum(axis=0) if self.merge == "mean" else None
        self.mean_weights_ = None
        return self

    def _info(self) -> dict:
        return {
            "labels": self.labels_,
            "merge": self.merge,
            "density": self.density if self.merge == "ties" else None,
            "affinity": self.clusterer_.affinity_,
            "laplacian_eigenvalues": self.clusterer_.eigenvalues_,
            "eigengap": self.clusterer_.eigengap_,
        }


# -- TIES merging, elementwise and streamed -----------------------------------------------------


def _trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``ceil(density * numel)`` largest-magnitude entries of ``x`` (ties at the
    threshold kept too, as in the TIES reference code), zero the rest. ``x`` is (numel,)."""
    n = x.numel()
    keep = min(n, max(1, math.ceil(density * n - 1e-9)))  # 1e-9: 0.2 * 10 must stay 2
    if keep == n:
        return x
    magnitude = x.abs()
    threshold = torch.kthvalue(magnitude, n - keep + 1).values
    return torch.where((magnitude >= threshold) & (magnitude > 0), x, torch.zeros_like(x))


class _TiesAccumulator:
    """TIES-merging (Yadav et al., 2023) of one tensor over tasks fed one at a time.

    Trim each task (top ``density`` by magnitude), elect per entry the sign of the summed
    trimmed values, and average only the entries that agree with it (disjoint mean). The
    elected sign needs every task, but the disjoint mean of either sign does not, so four
    running sums (positive and negative totals and counts) give the merge in a single read.
    An exact tie (sum zero) elects ``+``, as mergekit does.
    """

    def __init__(self, numel: int, density: float, device, dtype=torch.float64):
        self.density = density
        self.pos_sum, self.neg_sum, self.pos_count, self.neg_count = (
            torch.zeros(numel, dtype=dtype, device=device) for _ in range(4)
        )

    def add(self, x: torch.Tensor) -> None:
        trimmed = _trim(x, self.density)  # (numel,)
        self.pos_sum += trimmed.clamp(min=0)
        self.neg_sum += trimmed.clamp(max=0)
        self.pos_count += trimmed > 0
        self.neg_count += trimmed < 0

    def result(self) -> torch.Tensor:
        positive = (self.pos_sum + self.neg_sum) >= 0  # elected sign
        return torch.where(
            positive,
            self.pos_sum / self.pos_count.clamp(min=1),
            self.neg_sum / self.neg_count.clamp(min=1),
        )


@torch.no_grad()
def ties_merge(tensors, density: float = 0.2) -> torch.Tensor:
    """TIES-merge task tensors of one parameter (Yadav et al., 2023, without the final scale).

    Parameters
    ----------
    tensors : iterable of torch.Tensor, all of one shape
        One tensor per task; consumed once, one at a time.
    density : float in (0, 1], default=0.2
        Fraction of each tensor's entries kept by the trim step: the ``ceil(density * numel)``
        largest magnitudes, plus any entries tied with the smallest of them. Trimming is per
        tensor (as in mergekit), since task vectors are streamed tensor by tensor.

    Returns
    -------
    torch.Tensor of the input shape, dtype float64, on the first tensor's device
        Per entry: the mean of the trimmed values whose sign agrees with the sign of their sum
        (``+`` on a tie); 0 where no task keeps the entry.
    """
    density = _check_float("density", density, 0.0, 1.0)
    acc, shape = None, None
    for x in tensors:
        if shape is None:
            shape = x.shape
            acc = _TiesAccumulator(x.numel(), density, x.device)
        elif x.shape != shape:
            raise InvalidInputError(
                f"ties_merge: tensors must share one shape, got {tuple(shape)} and {tuple(x.shape)}"
            )
        acc.add(x.detach().reshape(-1).to(torch.float64))
    if acc is None:
        raise InvalidInputError("ties_merge: needs at least one tensor, got none")
    return acc.result().reshape(shape)


# -- the result and the entry point -------------------------------------------------------------


@dataclass
class SeedBasisResult:
    """A fitted seed basis; the basis tensors are made lazily from the source, one at a time.

    For every tensor ``name`` and task ``t``: ``tau_hat_t = mean(name) + basis(name) @ c_t``
    (no mean term when ``has_mean`` is False), with ``c_t = coefficients[t]``.

    Attributes
    ----------
    method : str
        Key of :data:`SEED_METHODS`.
    M : int
        Number of basis vectors.
    tasks : list of str, length T
    coefficients : dict task -> ndarray of shape (M,), dtype float64
    has_mean : bool
    info : dict
        Method-specific diagnostics (always ``"gram"``, the (T, T) Gram, and ``"params"``):
        PCA ``eigenvalues``, ``explained_variance_ratio``, ``rank``; autoencoder ``loss``,
        ``adam_loss``, ``lower_bound``, ``eigenvalues``, ``mixing`` (B); cluster-merge
        ``labels``, ``merge``, ``density``, ``affinity``, ``laplacian_eigenvalues``, ``eigengap``.
    rel_error : dict task -> float, or None
        ``||tau_hat_t - tau_t|| / ||tau_t||`` over the whole task vector, exact in float64 and
        computed from the Gram (the basis is linear in the data); None for TIES merging. The
        float32 basis tensors add rounding of order 1e-7.
    """

    method: str
    M: int
    tasks: list
    coefficients: dict
    has_mean: bool
    info: dict = field(default_factory=dict)
    rel_error: dict | None = None
    _source: object = field(default=None, repr=False, compare=False)
    _shapes: dict = field(default_factory=dict, repr=False, compare=False)
    _mixing: np.ndarray | None = field(default=None, repr=False, compare=False)  # (T, M)
    _mean_weights: np.ndarray | None = field(default=None, repr=False, compare=False)  # (T,)
    _labels: np.ndarray | None = field(default=None, repr=False, compare=False)  # TIES: (T,)
    _density: float = field(default=0.2, repr=False, compare=False)
    _device: str = field(default="cpu", repr=False, compare=False)
    _cache: tuple = field(default=(None, None, None), repr=False, compare=False)

    @property
    def shapes(self) -> dict:
        """Tensor name -> shape of the fitted tensors, in iteration order (a copy)."""
        return dict(self._shapes)

    def iter_tensors(self):
        """Yield ``(name, S, mu)`` for every tensor, in the order of ``shapes``.

        Reads each task's copy of one tensor once, then moves on: memory is one tensor of one
        task plus the basis being built (``numel * M`` float64).

        Yields
        ------
        name : str
        S : torch.Tensor of shape (numel, M), float32, CPU
        mu : torch.Tensor of shape (numel,), float32, CPU, or None when ``has_mean`` is False
        """
        for name in self._shapes:
            yield (name, *self._tensor(name))

    def basis(self, name: str) -> torch.Tensor:
        """``S`` of tensor ``name``: torch.Tensor of shape (numel, M), float32, CPU."""
        return self._tensor(name)[0]

    def mean(self, name: str) -> torch.Tensor | None:
        """``mu`` of tensor ``name``: torch.Tensor of shape (numel,), float32, CPU; or None."""
        return self._tensor(name)[1]

    @torch.no_grad()
    def _tensor(self, name: str):
        if self._cache[0] == name:  # basis(name) then mean(name) read the data once
            return self._cache[1], self._cache[2]
        if name not in self._shapes:
            raise NotFoundError(
                f"unknown tensor {name!r}; the fit covered {len(self._shapes)} tensors, "
                f"e.g. {list(self._shapes)[:5]}"
            )
        numel = math.prod(int(s) for s in self._shapes[name])
        device = torch.device(self._device)
        mean = None
        if self._mixing is not None:  # linear: S = V @ mixing, mu = V @ mean_weights
            mixing = torch.from_numpy(self._mixing).to(device)  # (T, M)
            basis = torch.zeros(numel, self.M, dtype=torch.float64, device=device)
            if self._mean_weights is not None:
                mean = torch.zeros(numel, dtype=torch.float64, device=device)
            for i, task in enumerate(self.tasks):
                cols = torch.nonzero(mixing[i]).flatten()  # cluster means touch one column
                if cols.numel() == 0 and mean is None:
                    continue
                x = _read(self._source, task, name, numel, device)  # (numel,)
                if cols.numel():
                    basis[:, cols] += x[:, None] * mixing[i, cols]  # (numel, |cols|)
                if mean is not None:
                    mean += x * float(self._mean_weights[i])
        else:  # TIES: one accumulator per cluster, each task read once
            merges = [_TiesAccumulator(numel, self._density, device) for _ in range(self.M)]
            for i, task in enumerate(self.tasks):
                merges[int(self._labels[i])].add(_read(self._source, task, name, numel, device))
            basis = torch.stack([acc.result() for acc in merges], dim=1)  # (numel, M)
        basis = basis.to("cpu", torch.float32)
        mean = None if mean is None else mean.to("cpu", torch.float32)
        self._cache = (name, basis, mean)
        return basis, mean


@dataclass(frozen=True)
class SeedMethod:
    """One seed-basis method: its estimator class and where it comes from.

    Attributes
    ----------
    name : str
        Registry key.
    estimator : type
        Class with ``fit(gram)`` setting ``n_components_``, ``mixing_``, ``mean_weights_``,
        ``coefficients_``.
    reference : str
        Paper, year and section.
    """

    name: str
    estimator: type
    reference: str

    def params(self) -> dict:
        """Method parameters (besides ``n_components`` and ``seed``) and their defaults."""
        signature = inspect.signature(self.estimator.__init__)
        return {
            p.name: p.default
            for p in list(signature.parameters.values())[1:]
            if p.name not in ("n_components", "seed")
        }


SEED_METHODS = {
    name: SeedMethod(name, estimator, METHODS[name].reference)
    for name, estimator in [("pca", PCABasis), ("autoencoder", GramAutoencoder), ("cluster-merge", ClusterMerge)]
}


def fit_seed_basis(
    source,
    tasks,
    shapes,
    method: str,
    n_components: int | None = None,
    seed: int = 0,
    *,
    device="cpu",
    max_block_bytes: int = 1 << 30,
    **method_params,
) -> SeedBasisResult:
    """Fit a seed basis of Zeng et al. (2025) to the task vectors of ``tasks``.

    Parameters
    ----------
    source : object with ``tensor(task, name) -> torch.Tensor``
        Task vector tensors, float32, any shape with ``prod(shapes[name])`` elements. Read in
        two passes: the Gram (:func:`gram_matrix`) now, the basis tensors later, lazily, by
        :meth:`SeedBasisResult.iter_tensors`; so the source must stay readable until then.
    tasks : list of str, length T >= 1, unique
    shapes : dict tensor name -> shape
    method : str
        A key of :data:`SEED_METHODS`: ``"pca"``, ``"autoencoder"``, ``"cluster-merge"``.
    n_components : int or None
        ``M`` in ``[1, T]``. None: ``T // 2`` for PCA and the autoencoder, eigengap for
        cluster-merge.
    seed : int, default=0
        Seed of the autoencoder's init and of the clustering (PCA is deterministic).
    device : torch device for the Gram and the basis products.
    max_block_bytes : int, default=1 GiB
        Memory bound of the Gram pass (see :func:`gram_matrix`).
    **method_params
        The estimator's other parameters (``SEED_METHODS[method].params()``): autoencoder
        ``tau``, ``lr``, ``steps``, ``weight_decay``, ``refit_decoder``; cluster-merge ``merge``,
        ``density``, ``max_clusters``.

    Returns
    -------
    SeedBasisResult

    Raises
    ------
    InvalidInputError
        Unknown method or parameter (the message lists the valid ones), bad ``tasks``,
        ``shapes`` or ``n_components``, or a tensor whose size or values are wrong.
    """
    if method not in SEED_METHODS:
        raise InvalidInputError(
            f"unknown seed basis method {method!r}; valid choices: {', '.join(SEED_METHODS)}"
        )
    spec = SEED_METHODS[method]
    unknown = sorted(set(method_params) - set(spec.params()))
    if unknown:
        valid = ", ".join(spec.params()) or "none"
        raise InvalidInputError(f"unknown parameter(s) {unknown} for method {method!r}; valid: {valid}")
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) for t in tasks):
        raise InvalidInputError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        dupes = sorted({t for t in tasks if tasks.count(t) > 1})
        raise InvalidInputError(f"tasks must be unique, got duplicates {dupes}")
    if not isinstance(shapes, dict) or not shapes:
        raise InvalidInputError(f"shapes must be a non-empty dict name -> shape, got {shapes!r}")
    shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
    if n_components is not None:
        n_components = _check_int("n_components", n_components, 1, len(tasks))
    seed = _check_int("seed", seed, 0, 2**32 - 1)
    max_block_bytes = _check_int("max_block_bytes", max_block_bytes, 1)

    kwargs = dict(method_params, n_components=n_components)
    if "seed" in inspect.signature(spec.estimator.__init__).parameters:
        kwargs["seed"] = seed
    estimator = spec.estimator(**kwargs)

    gram = gram_matrix(source, tasks, shapes, device=device, max_block_bytes=max_block_bytes)
    estimator.fit(gram)

    mixing, mean_weights = estimator.mixing_, estimator.mean_weights_
    coefficients = estimator.coefficients_  # (T, M)
    rel_error = None
    if mixing is not None:
        rel_error = _relative_errors(gram, mixing, mean_weights, coefficients, tasks)
    info = {"gram": gram, "params": {**spec.params(), **kwargs}, **estimator._info()}
    return SeedBasisResult(
        method=method,
        M=int(estimator.n_components_),
        tasks=tasks,
        coefficients={t: coefficients[i].copy() for i, t in enumerate(tasks)},
        has_mean=mean_weights is not None,
        info=info,
        rel_error=rel_error,
        _source=source,
        _shapes=shapes,
        _mixing=mixing,
        _mean_weights=mean_weights,
        _labels=getattr(estimator, "labels_", None),
        _density=float(getattr(estimator, "density", 0.2)),
        _device=str(device),
    )


def _relative_errors(gram, mixing, mean_weights, coefficients, tasks) -> dict:
    """Per task ``||V d_t|| / ||tau_t||`` with ``d_t = m + mixing c_t - e_t``, from the Gram.

    ``tau_hat_t = V (m + mixing c_t)``, so the error vector is ``V d_t`` and its squared norm
    ``d_t^T G d_t = ||L^T d_t||^2`` (a sum of squares: no cancellation below zero).
    """
    n_tasks = len(tasks)
    weights = coefficients @ mixing.T  # (T, T): row t is mixing @ c_t
    if mean_weights is not None:
        weights = weights + mean_weights[None, :]
    diff = weights - np.eye(n_tasks)  # (T, T): row t is d_t
    err = np.sqrt(np.square(diff @ _gram_factor(gram)).sum(axis=1))  # (T,)
    norm = np.sqrt(np.clip(np.diag(gram), 0.0, None))  # (T,)
    out = {}
    for i, task in enumerate(tasks):
        out[task] = float(err[i] / norm[i]) if norm[i] > 0 else (0.0 if err[i] == 0 else math.inf)
    return out


class SeedBasisFit:
    """A seed method of Task Vector Bases as a store method: one basis ``S`` (and mean ``mu`` for
    PCA) per tensor shared by every task of the batch, stored with ``params.bits``; each task
    keeps its coefficient vector.

    Parameters
    ----------
    params : FitParams; its ``bits`` and ``seed`` are used.
    method : str, a key of :data:`SEED_METHODS`.
    n_components : int or None, ``M`` (default ``T // 2``, or the eigengap for cluster-merge).
    device, progress : where the products run; show the error pass's progress bar.

    Attributes
    ----------
    result_ : FitResult, set by :meth:`fit`.
    """

    def __init__(self, params, *, method, n_components=None, device="cpu", progress=True):
        self.method = method
        self.params = params
        self.n_components = n_components
        self.device = device
        self.progress = progress

    def __repr__(self):
        return f"SeedBasisFit(method={self.method!r}, n_components={self.n_components!r})"

    def planned_peak_bytes(self, shapes, n_tasks):
        """Peak memory planned: the basis of the largest tensor (numel x M, float64, built and
        then stored float32) beside a few copies of one task's tensor, and the process itself."""
        from .tucker import PEAK_TENSOR_COPIES, PROCESS_BYTES

        numel = max(math.prod(int(s) for s in shape) for shape in shapes.values())
        components = self.n_components or max(1, n_tasks // 2)
        return PROCESS_BYTES + 12 * numel * components + 4 * PEAK_TENSOR_COPIES * numel

    def fit(self, source, tasks, shapes):
        tasks = list(tasks)
        seed_result = fit_seed_basis(
            source, tasks, shapes, self.method, n_components=self.n_components, seed=self.params.seed, device=self.device
        )
        result = FitResult(method=self.method, labels={t: 0 for t in tasks}, clusters={0: {}})
        result.tasks = {
            t: {name: TaskTensor(coef=tuple(float(c) for c in seed_result.coefficients[t])) for name in shapes} for t in tasks
        }
        result.kind = {t: self.method for t in tasks}
        bits = self.params.bits
        for name, S, mu in seed_result.iter_tensors():
            result.clusters[0][name] = SharedBasis(S=quantize(S, bits), mu=None if mu is None else quantize(mu.reshape(-1, 1), bits))
        measure_errors(source, tasks, shapes, result, self.device, self.progress)
        result.info = {"method": self.method, "n_components": seed_result.M, **_json_safe(seed_result.info)}
        self.result_ = result
        return self


def _json_safe(info):
    """Scalars of ``info`` as plain Python values (arrays are left out of store metadata)."""
    out = {}
    for key, value in info.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
        elif isinstance(value, np.generic):
            out[key] = value.item()
        elif isinstance(value, np.ndarray) and value.ndim == 1 and len(value) <= 64 and key in ("labels", "eigenvalues"):
            out[key] = value.tolist()
    return out
