"""Determinism: equal requests give equal bits on one device and thread count.

Randomized SVDs are seeded (``FitParams.seed``) and composition terms are combined in sorted
task order, so a fit repeated on the same inputs stores the same factors, and a composition
does not depend on the order its coefficients were given in.
"""

import pytest
import torch
from safetensors.torch import save_file

from tvbase import FitParams, Store
from tvbase.methods.tucker import _randomized_svd, _truncated_svd


def test_compose_does_not_depend_on_the_order_of_its_terms(populated):
    store = Store.open(populated["path"])
    tasks = store.tasks[:4]
    forward = store.compose({t: 0.3 + i for i, t in enumerate(tasks)}, device="cpu")
    backward = store.compose({t: 0.3 + i for i, t in reversed(list(enumerate(tasks)))}, device="cpu")
    assert all(torch.equal(forward[name], backward[name]) for name in forward)


@pytest.fixture(scope="module")
def wide_zoo(tmp_path_factory):
    """A base with one 600 x 540 matrix (both sides over 512: the randomized SVD path) and two
    fine-tunes whose deltas have a decaying spectrum."""
    root = tmp_path_factory.mktemp("wide")
    gen = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(600, 540, generator=gen), "b": torch.randn(600, generator=gen)}
    save_file(base, root / "base.safetensors")
    tasks = {}
    for i in range(2):
        u, v = torch.randn(600, 40, generator=gen), torch.randn(540, 40, generator=gen)
        delta = (u * torch.logspace(0, -3, 40)) @ v.T * 0.01  # (600, 540)
        tasks[f"t{i}"] = root / f"t{i}.safetensors"
        save_file({"w": base["w"] + delta, "b": base["b"] + 0.01 * torch.randn(600, generator=gen)}, tasks[f"t{i}"])
    return root / "base.safetensors", tasks


def test_a_repeated_fit_stores_the_same_factors(wide_zoo, tmp_path):
    """Per-task SVD at rank 8 of a matrix with both sides over 512 uses the randomized SVD:
    two fits of the same inputs rebuild bit-identical task vectors."""
    base, tasks = wide_zoo
    rebuilt = []
    for i in range(2):
        store = Store.create(tmp_path / f"s{i}", base, params=FitParams(rank=8, seed=3))
        store.ingest(tasks, method="svd", device="cpu", progress=False)
        rebuilt.append({t: store.get(t, device="cpu") for t in tasks})
    assert all(torch.equal(rebuilt[0][t][n], rebuilt[1][t][n]) for t in tasks for n in rebuilt[0][t])


def test_randomized_svd_is_seeded_and_accurate():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(700, 30, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(600, 30, generator=gen))
    s = torch.logspace(0, -4, 30)
    x = (u * s) @ v.T  # (700, 600), singular values s
    first, again, other = _randomized_svd(x, 10, seed=1), _randomized_svd(x, 10, seed=1), _randomized_svd(x, 10, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])  # the seed is really used
    assert torch.allclose(first[1], s[:10], rtol=1e-4)
    uq, sq, vq = _truncated_svd(x, 10, seed=1)  # sign-fixed, so the seed does not flip columns
    assert torch.allclose(torch.abs(uq.T @ u[:, :10]), torch.eye(10), atol=1e-3)
    assert torch.allclose((uq * sq) @ vq.T, (u[:, :10] * s[:10]) @ v[:, :10].T, atol=1e-5)
