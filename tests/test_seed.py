"""Tests for the seed bases of Zeng et al. (2025) (tvbase.methods.seed).

Task vectors are tiny and synthetic (three tensors of varied shapes, T = 8), served by a
dict-backed source that counts its reads. Tolerances: exactness checks at 1e-5 relative (float32
basis tensors), Gram identities at 1e-9 (float64).
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from tvbase.errors import InvalidInputError, NotFoundError
from tvbase.methods.seed import (
    SEED_METHODS,
    GramAutoencoder,
    PCABasis,
    _softmax_columns,
    _train_autoencoder,
    fit_seed_basis,
    gram_matrix,
    ties_merge,
)
from tvbase.testing.metrics import relative_error

SHAPES = {"w": (12, 10), "b": (7,), "conv": (3, 2, 2, 5)}
NUMEL = {name: math.prod(shape) for name, shape in SHAPES.items()}
N = sum(NUMEL.values())  # 187
T = 8
METHODS = list(SEED_METHODS)


class DictSource:
    """Task vectors held as flat float64 vectors; serves float32 tensors and counts reads."""

    def __init__(self, vectors):
        self.vectors = vectors  # task -> (N,) float64
        self.reads = Counter()

    def tensor(self, task, name):
        self.reads[task, name] += 1
        offset = 0
        for key, shape in SHAPES.items():
            if key == name:
                flat = self.vectors[task][offset : offset + NUMEL[key]]
                return flat.reshape(shape).to(torch.float32)
            offset += NUMEL[key]
        raise KeyError(name)

    def matrix(self, tasks):
        """V: (N, T) float64 of the float32 values the source serves."""
        return torch.stack([self.vectors[t].float().double() for t in tasks], dim=1)


def _tasks(n=T):
    return [f"t{i}" for i in range(n)]


def _gaussian(n=T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return DictSource({t: torch.randn(N, generator=gen, dtype=torch.float64) for t in _tasks(n)})


def _clustered(sizes=(2, 2, 2, 2), noise=0.1, seed=0, flip=()):
    """Tasks = a scaled cluster center + noise; centers are random (nearly orthogonal)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(sizes), N, generator=gen, dtype=torch.float64)
    vectors, i = {}, 0
    for k, size in enumerate(sizes):
        for _ in range(size):
            sign = -1.0 if i in flip else 1.0
            scale = 1.0 + 0.1 * i
            vectors[f"t{i}"] = sign * scale * centers[k] + noise * torch.randn(
                N, generator=gen, dtype=torch.float64
            )
            i += 1
    return DictSource(vectors)


def _reconstruct(result):
    """tau_hat for every task: dict task -> (N,) float64, built from iter_tensors."""
    parts = {t: [] for t in result.tasks}
    for name, basis, mean in result.iter_tensors():
        assert basis.shape == (NUMEL[name], result.M) and basis.dtype == torch.float32
        assert (mean is None) == (not result.has_mean)
        for t in result.tasks:
            x = basis.double() @ torch.from_numpy(result.coefficients[t])  # (numel,)
            parts[t].append(x if mean is None else x + mean.double())
    return {t: torch.cat(p) for t, p in parts.items()}


def _rel_errors(source, result):
    """task -> relative error of its rebuilt vector against the float32 vector the source serves."""
    rebuilt = _reconstruct(result)
    return {t: relative_error(rebuilt[t], source.vectors[t].float()) for t in result.tasks}


# --- registry and validation -------------------------------------------------------------------


def test_registry_has_references_and_unknown_method_lists_choices():
    assert set(SEED_METHODS) == {"pca", "autoencoder", "cluster-merge"}
    for name, spec in SEED_METHODS.items():
        assert spec.name == name and "Zeng et al., 2025" in spec.reference
    assert "Yadav et al., 2023" in SEED_METHODS["cluster-merge"].reference
    with pytest.raises(InvalidInputError) as err:
        fit_seed_basis(_gaussian(), _tasks(), SHAPES, "svd")
    message = str(err.value)
    assert "'svd'" in message and all(name in message for name in SEED_METHODS)


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(InvalidInputError, match=r"unknown parameter.*'temperature'.*tau, lr, steps"):
        fit_seed_basis(_gaussian(), _tasks(), SHAPES, "autoencoder", temperature=2.0)
    with pytest.raises(InvalidInputError, match=r"valid: none"):
        fit_seed_basis(_gaussian(), _tasks(), SHAPES, "pca", tau=2.0)


@pytest.mark.parametrize("bad", [0, T + 1, 2.5, True])
def test_n_components_out_of_range_is_rejected(bad):
    with pytest.raises(InvalidInputError, match=f"n_components.*{bad!r}"):
        fit_seed_basis(_gaussian(), _tasks(), SHAPES, "pca", n_components=bad)


def test_bad_inputs_are_rejected_with_names():
    source = _gaussian()
    with pytest.raises(InvalidInputError, match="duplicates"):
        fit_seed_basis(source, ["t0", "t0"], SHAPES, "pca")
    with pytest.raises(InvalidInputError, match=r"task 't0', tensor 'w': expected 130 elements"):
        fit_seed_basis(source, _tasks(), {**SHAPES, "w": (13, 10)}, "pca")
    source.vectors["t3"][0] = float("nan")
    with pytest.raises(InvalidInputError, match=r"task 't3', tensor 'w': contains NaN"):
        fit_seed_basis(source, _tasks(), SHAPES, "pca")
    with pytest.raises(InvalidInputError, match="merge 'median'.*mean, ties"):
        fit_seed_basis(_gaussian(), _tasks(), SHAPES, "cluster-merge", merge="median")
    with pytest.raises(InvalidInputError, match=r"tau must be in \(0.0, inf\), got -1.0"):
        GramAutoencoder(tau=-1.0).fit(np.eye(3))


# --- the Gram ------------------------------------------------------------------------------------


def test_gram_matches_dense_product_and_blocks_bound_memory():
    source = _gaussian()
    dense = (source.matrix(_tasks()).T @ source.matrix(_tasks())).numpy()  # (T, T)
    gram = gram_matrix(source, _tasks(), SHAPES)
    np.testing.assert_allclose(gram, dense, rtol=1e-12, atol=1e-9)
    assert max(source.reads.values()) == 1

    # Blocks of 3 tasks for the largest tensor (130 * 8 bytes each): ceil(8 / 3) = 3 reads at most.
    source.reads.clear()
    blocked = gram_matrix(source, _tasks(), SHAPES, max_block_bytes=3 * 8 * 130)
    np.testing.assert_allclose(blocked, dense, rtol=1e-12, atol=1e-9)
    assert max(source.reads[t, "w"] for t in _tasks()) == 3


# --- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_tasks", [T, 2, 1])
def test_every_method_is_exact_at_m_equals_t(method, n_tasks):
    source = _gaussian(n_tasks)
    result = fit_seed_basis(source, _tasks(n_tasks), SHAPES, method, n_components=n_tasks)
    assert result.M == n_tasks
    assert max(_rel_errors(source, result).values()) <= 1e-5
    assert max(result.rel_error.values()) <= 1e-9  # from the Gram, float64


def test_pca_is_exact_at_rank_of_centered_data():
    source = _gaussian()
    result = fit_seed_basis(source, _tasks(), SHAPES, "pca", n_components=T - 1)
    assert result.has_mean and result.info["rank"] == T - 1
    assert max(_rel_errors(source, result).values()) <= 1e-5

    # mu is the mean task vector, the basis is orthonormal, the scores are centered.
    v = source.matrix(_tasks())  # (N, T)
    mean = torch.cat([result.mean(name).double() for name in SHAPES])
    basis = torch.cat([result.basis(name).double() for name in SHAPES])  # (N, T-1)
    torch.testing.assert_close(mean, v.mean(dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(basis.T @ basis, torch.eye(T - 1, dtype=torch.float64), rtol=0, atol=1e-5)
    scores = np.stack([result.coefficients[t] for t in _tasks()])  # (T, T-1)
    np.testing.assert_allclose(scores.sum(axis=0), 0.0, atol=1e-9)

    # M = T pads one zero column and is still exact.
    padded = fit_seed_basis(source, _tasks(), SHAPES, "pca", n_components=T)
    assert torch.count_nonzero(padded.basis("w")[:, -1]) == 0
    assert all(padded.coefficients[t][-1] == 0 for t in _tasks())


def test_pca_truncation_matches_svd_of_centered_data():
    source = _gaussian()
    m = 3
    result = fit_seed_basis(source, _tasks(), SHAPES, "pca", n_components=m)
    v = source.matrix(_tasks())  # (N, T)
    centered = v - v.mean(dim=1, keepdim=True)
    u, s, vh = torch.linalg.svd(centered, full_matrices=False)
    best = u[:, :m] @ torch.diag(s[:m]) @ vh[:m] + v.mean(dim=1, keepdim=True)  # (N, T)
    expected = ((best - v).norm(dim=0) / v.norm(dim=0)).numpy()  # (T,)
    np.testing.assert_allclose([result.rel_error[t] for t in _tasks()], expected, rtol=1e-8)
    np.testing.assert_allclose(list(_rel_errors(source, result).values()), expected, rtol=1e-5)
    np.testing.assert_allclose(result.info["eigenvalues"][:T - 1], (s**2).numpy()[: T - 1], rtol=1e-9)


@pytest.mark.parametrize("method,m", [("pca", 3), ("autoencoder", 4), ("cluster-merge", 4)])
def test_gram_rel_error_matches_rebuilt_tensors(method, m):
    source = _clustered()
    params = {"steps": 300} if method == "autoencoder" else {}
    result = fit_seed_basis(source, _tasks(), SHAPES, method, n_components=m, **params)
    measured = _rel_errors(source, result)
    for t in _tasks():
        assert abs(result.rel_error[t] - measured[t]) <= 1e-5


# --- autoencoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data,m", [("clustered", 4), ("clustered", 6), ("gaussian", 4)])
def test_autoencoder_loss_is_bounded_by_the_spectrum(data, m):
    source = _clustered() if data == "clustered" else _gaussian()
    result = fit_seed_basis(source, _tasks(), SHAPES, "autoencoder", n_components=m)
    loss, bound = result.info["loss"], result.info["lower_bound"]
    eigenvalues = np.linalg.eigvalsh(result.info["gram"])[::-1]
    assert bound == pytest.approx(eigenvalues[m:].sum() / T**2, rel=1e-9)
    assert loss >= bound * (1 - 1e-9)  # Eckart-Young: rank-M B W cannot beat the SVD
    assert loss <= 1.5 * bound + 1e-6
    assert loss <= result.info["adam_loss"] * (1 + 1e-12)  # the decoder refit never hurts

    # The loss is the mean squared error of the rebuilt task vectors.
    v = source.matrix(_tasks())
    rebuilt = _reconstruct(result)
    mse = sum(float((rebuilt[t] - v[:, i]).square().sum()) for i, t in enumerate(_tasks())) / T**2
    assert mse == pytest.approx(loss, rel=1e-5)

    mixing = result.info["mixing"]  # B (T, M): convex columns
    assert mixing.shape == (T, m) and (mixing >= 0).all()
    np.testing.assert_allclose(mixing.sum(axis=0), 1.0, rtol=0, atol=1e-12)


def test_autoencoder_defaults_follow_the_paper_and_are_seeded():
    params = SEED_METHODS["autoencoder"].params()
    assert params["tau"] == 5.0 and params["lr"] == 0.01 and params["steps"] == 6000
    source = _gaussian()
    a = fit_seed_basis(source, _tasks(), SHAPES, "autoencoder", steps=200)
    b = fit_seed_basis(source, _tasks(), SHAPES, "autoencoder", steps=200)
    c = fit_seed_basis(source, _tasks(), SHAPES, "autoencoder", steps=200, seed=1)
    assert a.M == T // 2 and not a.has_mean and a.mean("w") is None
    np.testing.assert_array_equal(a.info["mixing"], b.info["mixing"])
    assert not np.array_equal(a.info["mixing"], c.info["mixing"])


def test_autoencoder_is_scale_invariant():
    # Training runs on G / mean(diag G): tiny task vectors train exactly like unit ones.
    source = _clustered()
    small = DictSource({t: 1e-4 * v for t, v in source.vectors.items()})
    a = fit_seed_basis(source, _tasks(), SHAPES, "autoencoder", steps=500)
    b = fit_seed_basis(small, _tasks(), SHAPES, "autoencoder", steps=500)
    np.testing.assert_allclose(a.info["mixing"], b.info["mixing"], rtol=1e-4, atol=1e-6)
    assert b.info["loss"] == pytest.approx(1e-8 * a.info["loss"], rel=1e-3)


def test_autoencoder_without_refit_keeps_adams_decoder():
    source = _gaussian()
    result = fit_seed_basis(source, _tasks(), SHAPES, "autoencoder", steps=300, refit_decoder=False)
    assert result.info["loss"] == result.info["adam_loss"]
    refit = fit_seed_basis(source, _tasks(), SHAPES, "autoencoder", steps=300)
    assert refit.info["loss"] < result.info["adam_loss"]


def test_hand_written_adam_matches_torch_autograd():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    g = (x.T @ x).numpy() / 40  # (6, 6)
    a0 = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    w0 = 0.1 * torch.randn(3, 6, generator=gen, dtype=torch.float64)
    a, w = _train_autoencoder(g, a0.numpy(), w0.numpy(), 5.0, 0.01, 20, 1e-6)

    a_t, w_t = a0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = torch.optim.Adam([a_t, w_t], lr=0.01, weight_decay=1e-6)
    for _ in range(20):
        err = torch.softmax(a_t / 5.0, dim=0) @ w_t - torch.eye(6, dtype=torch.float64)
        loss = (err * (torch.from_numpy(g) @ err)).sum() / 36
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(a, a_t.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(w, w_t.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(_softmax_columns(a).sum(axis=0), 1.0, atol=1e-12)


# --- cluster-merge -------------------------------------------------------------------------------


def test_cluster_merge_recovers_separated_clusters():
    # Three clusters (3, 3, 2 tasks); task 4 is contradictory (-center): |cos| keeps it in.
    source = _clustered(sizes=(3, 3, 2), noise=0.05, flip=(4,))
    result = fit_seed_basis(source, _tasks(), SHAPES, "cluster-merge")
    labels = result.info["labels"]
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2])
    assert result.M == 3 and not result.has_mean
    for i, t in enumerate(_tasks()):
        np.testing.assert_array_equal(result.coefficients[t], np.eye(3)[labels[i]])

    # Mean merge: basis column k is the mean of cluster k.
    v = source.matrix(_tasks())  # (N, T)
    basis = torch.cat([result.basis(name).double() for name in SHAPES])  # (N, 3)
    for k in range(3):
        torch.testing.assert_close(basis[:, k], v[:, labels == k].mean(dim=1), rtol=1e-6, atol=1e-6)


def test_ties_merge_hand_example():
    # density 0.4 of 5 entries keeps 2 per task (ties at the threshold kept):
    #   a -> [3, 0, -2.5, 0, 0]   b -> [-4, 0, 0, 0, 2]   c -> [2, 1, -1, 0, -1]
    # sums [1, 1, -3.5, 0, 1] elect [+, +, -, +, +]; disjoint means of the agreeing entries:
    a = torch.tensor([3.0, -1.0, -2.5, 0.0, 0.5])
    b = torch.tensor([-4.0, 1.0, 1.0, 0.0, 2.0])
    c = torch.tensor([2.0, 1.0, -1.0, 0.0, -1.0])
    merged = ties_merge([a, b, c], density=0.4)
    torch.testing.assert_close(merged, torch.tensor([2.5, 1.0, -1.75, 0.0, 2.0], dtype=torch.float64))
    # Shape is kept; an exact tie elects +; density 1 keeps everything.
    tie = ties_merge([torch.tensor([[1.0]]), torch.tensor([[-1.0]])], density=1.0)
    assert tie.shape == (1, 1) and float(tie) == 1.0


def test_cluster_merge_ties_is_ties_per_tensor():
    source = _gaussian()
    result = fit_seed_basis(source, _tasks(), SHAPES, "cluster-merge", n_components=1, merge="ties")
    assert result.rel_error is None and result.M == 1
    for name, basis, mean in result.iter_tensors():
        expected = ties_merge([source.tensor(t, name) for t in _tasks()], density=0.2)
        torch.testing.assert_close(basis[:, 0], expected.reshape(-1).float())


# --- streaming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tasks", [4, 8])
@pytest.mark.parametrize("method,params", [
    ("pca", {}), ("autoencoder", {"steps": 50}), ("cluster-merge", {}), ("cluster-merge", {"merge": "ties"}),
])
def test_each_task_tensor_is_read_a_bounded_number_of_times(n_tasks, method, params):
    source = _gaussian(n_tasks)
    result = fit_seed_basis(source, _tasks(n_tasks), SHAPES, method, n_components=2, **params)
    assert max(source.reads.values()) == 1  # the Gram pass
    for name, _, _ in result.iter_tensors():
        result.basis(name), result.mean(name)  # cached: no further read
    assert set(source.reads) == {(t, n) for t in _tasks(n_tasks) for n in SHAPES}
    assert max(source.reads.values()) <= 2  # Gram + basis, whatever T


def test_pca_result_is_deterministic():
    a = fit_seed_basis(_gaussian(), _tasks(), SHAPES, "pca", n_components=3)
    b = fit_seed_basis(_gaussian(), _tasks(), SHAPES, "pca", n_components=3)
    for t in _tasks():
        np.testing.assert_array_equal(a.coefficients[t], b.coefficients[t])
    assert torch.equal(a.basis("conv"), b.basis("conv"))
    # Pure math on the Gram: the estimator alone gives the same coefficients.
    pca = PCABasis(n_components=3).fit(a.info["gram"])
    np.testing.assert_array_equal(pca.coefficients_[0], a.coefficients["t0"])
    assert list(a.shapes) == list(SHAPES)
    with pytest.raises(NotFoundError, match="unknown tensor 'nope'"):
        a.basis("nope")
