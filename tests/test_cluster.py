"""Tests for task sketching and spectral clustering of tasks (tvbase.methods.cluster)."""

import numpy as np
import pytest
import torch

import tvbase.methods.cluster as cluster
from tvbase.errors import InvalidInputError
from tvbase.methods.cluster import TaskClusterer, TaskSketcher


def _task(seed, shapes=((40, 30), (30,), (25, 40))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]


def _sketch(sketcher, tensors):
    return sum(sketcher.sketch_tensor(i, t) for i, t in enumerate(tensors))


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# --- TaskSketcher ------------------------------------------------------------------------------


def test_sketch_shape_dtype_and_determinism():
    tensors = _task(0)
    a = _sketch(TaskSketcher(dim=64, seed=3), tensors)
    b = _sketch(TaskSketcher(dim=64, seed=3), tensors)
    assert a.shape == (64,) and a.dtype == torch.float64 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.equal(a, _sketch(TaskSketcher(dim=64, seed=4), tensors))


def test_sketch_is_linear_across_tasks():
    # Same (seed, tensor_index) -> same hash, so sketch(a*x + b*y) = a*sketch(x) + b*sketch(y).
    sketcher = TaskSketcher(dim=128, seed=0)
    x, y = _task(1), _task(2)
    combo = [0.7 * tx - 1.5 * ty for tx, ty in zip(x, y)]
    expected = 0.7 * _sketch(sketcher, x) - 1.5 * _sketch(sketcher, y)
    assert torch.allclose(_sketch(sketcher, combo), expected, rtol=1e-12, atol=1e-12)


def test_sketch_depends_on_tensor_index():
    sketcher = TaskSketcher(dim=256, seed=0)
    t = torch.randn(500, dtype=torch.float64)
    assert not torch.allclose(sketcher.sketch_tensor(0, t), sketcher.sketch_tensor(1, t))


def test_sketch_preserves_sum_of_squares_of_buckets():
    # Each element lands in exactly one bucket with sign +-1: with one element per tensor, the
    # sketch is that element, up to sign, in one bucket.
    sketcher = TaskSketcher(dim=16, seed=0)
    s = sketcher.sketch_tensor(5, torch.tensor([2.5]))
    assert torch.count_nonzero(s) == 1 and s.abs().max() == 2.5


def test_sketch_inner_products_are_unbiased():
    # Mean of <Sx, Sy> over independent hashes (seeds) converges to <x, y>; with dim = 64 the
    # standard deviation of one estimate is about |x||y|/8, so 400 seeds give |x||y|/160.
    x, y = _task(3), _task(4)
    y = [0.6 * tx + 0.8 * ty for tx, ty in zip(x, y)]  # cos(x, y) ~ 0.6
    fx, fy = _flat(x), _flat(y)
    estimates = []
    for seed in range(400):
        sketcher = TaskSketcher(dim=64, seed=seed)
        estimates.append(float(_sketch(sketcher, x) @ _sketch(sketcher, y)))
    scale = float(fx.norm() * fy.norm())
    assert abs(np.mean(estimates) - float(fx @ fy)) < 4 * scale / 160
    # One sketch of dim 1024 already gives the cosine to a few hundredths.
    sketcher = TaskSketcher(dim=1024, seed=0)
    sx, sy = _sketch(sketcher, x), _sketch(sketcher, y)
    cos_sketch = float(sx @ sy / (sx.norm() * sy.norm()))
    assert abs(cos_sketch - float(fx @ fy) / scale) < 0.1


def test_sketch_chunks_are_hashed_independently(monkeypatch):
    # Large tensors are hashed chunk by chunk; shrink the chunk to exercise that path.
    sketcher = TaskSketcher(dim=32, seed=1)
    small = torch.randn(5, dtype=torch.float64)
    ref_small = sketcher.sketch_tensor(0, small)
    monkeypatch.setattr(cluster, "_CHUNK", 7)
    # A tensor within one chunk hashes the same whatever the chunk size.
    assert torch.equal(sketcher.sketch_tensor(0, small), ref_small)
    # The same values in two chunks go to different buckets/signs.
    first = torch.cat([torch.ones(7), torch.zeros(7)]).double()
    second = first.flip(0)
    assert not torch.equal(sketcher.sketch_tensor(0, first), sketcher.sketch_tensor(0, second))
    # Shape does not matter, only the flattened order; the sketch stays linear.
    t = torch.randn(50, dtype=torch.float64)
    s = sketcher.sketch_tensor(0, t)
    assert torch.equal(sketcher.sketch_tensor(0, t.reshape(5, 10)), s)
    assert torch.allclose(sketcher.sketch_tensor(0, 2 * t), 2 * s, rtol=1e-12, atol=0)


def test_sketch_accepts_other_dtypes_and_layouts():
    sketcher = TaskSketcher(dim=32)
    t = torch.randn(6, 4)
    ref = sketcher.sketch_tensor(0, t.double())
    # float32 input is widened exactly, so only the summation order could differ.
    assert torch.allclose(sketcher.sketch_tensor(0, t), ref, rtol=1e-12, atol=1e-12)
    # A transposed (non-contiguous) tensor is flattened in its logical order.
    assert torch.allclose(
        sketcher.sketch_tensor(0, t.t().contiguous().t()), ref, rtol=1e-12, atol=1e-12
    )
    assert torch.count_nonzero(sketcher.sketch_tensor(0, torch.zeros(0))) == 0


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"dim": 0}, "dim must be >= 1, got 0"),
        ({"dim": 2.0}, "dim must be an integer, got 2.0"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_sketcher_rejects_bad_params(kwargs, phrase):
    with pytest.raises(InvalidInputError, match=phrase):
        TaskSketcher(**kwargs)


def test_sketch_tensor_rejects_bad_input():
    sketcher = TaskSketcher()
    with pytest.raises(InvalidInputError, match="tensor_index must be >= 0"):
        sketcher.sketch_tensor(-1, torch.zeros(3))
    with pytest.raises(InvalidInputError, match="expected a torch.Tensor"):
        sketcher.sketch_tensor(0, np.zeros(3))
    with pytest.raises(InvalidInputError, match="real dtype"):
        sketcher.sketch_tensor(0, torch.zeros(3, dtype=torch.complex64))


# --- TaskClusterer -----------------------------------------------------------------------------


def _grouped_sketches(n_groups=3, per_group=4, dim=256, noise=0.5, seed=0):
    """Tasks around n_groups random directions, with random signs (contradictory tasks)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_groups, dim))
    rows, truth = [], []
    for t in range(n_groups * per_group):
        group = t % n_groups
        sign = -1.0 if rng.random() < 0.5 else 1.0
        rows.append(sign * (centers[group] + noise * rng.standard_normal(dim)))
        truth.append(group)
    return np.array(rows), np.array(truth)


def _same_partition(a, b):
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_auto_finds_the_groups_and_relabels_by_first_task():
    sketches, truth = _grouped_sketches()
    model = TaskClusterer(seed=0).fit(sketches)
    assert model.n_clusters_ == 3
    assert _same_partition(model.labels_, truth)
    assert model.labels_.tolist()[:3] == [0, 1, 2]  # ids by smallest task index
    assert model.labels_.dtype == np.int64
    assert model.eigengap_.shape == (8,) and int(np.argmax(model.eigengap_)) == 2
    assert model.eigenvalues_.shape == (12,)


def test_contradictory_tasks_share_a_cluster():
    sketches, _ = _grouped_sketches()
    sketches[4] = -sketches[0]
    model = TaskClusterer().fit(sketches)
    assert model.affinity_[0, 4] == pytest.approx(1.0)
    assert model.labels_[0] == model.labels_[4]


def test_affinity_is_absolute_cosine_with_unit_diagonal():
    sketches = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]])
    model = TaskClusterer(n_clusters=1).fit(sketches)
    expected = np.array([[1.0, 2**-0.5, 0.0], [2**-0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(model.affinity_, expected, rtol=0, atol=1e-12)
    assert model.labels_.tolist() == [0, 0, 0]


def test_fixed_number_of_clusters_and_determinism():
    sketches, truth = _grouped_sketches(seed=1)
    a = TaskClusterer(n_clusters=3, seed=5).fit(sketches)
    b = TaskClusterer(n_clusters=3, seed=5).fit(sketches)
    assert np.array_equal(a.labels_, b.labels_)
    assert _same_partition(a.labels_, truth)
    # k = T: one task per cluster, in task order.
    assert TaskClusterer(n_clusters=12).fit(sketches).labels_.tolist() == list(range(12))


def test_fit_predict_returns_labels():
    sketches, _ = _grouped_sketches()
    model = TaskClusterer()
    assert np.array_equal(model.fit_predict(sketches), model.labels_)


@pytest.mark.parametrize("n_tasks", [1, 2])
def test_two_tasks_or_fewer_form_one_cluster(n_tasks):
    sketches = np.eye(n_tasks, 8)  # orthogonal: would be split if clustered
    model = TaskClusterer().fit(sketches)
    assert model.labels_.tolist() == [0] * n_tasks and model.n_clusters_ == 1
    assert model.eigengap_.shape == (n_tasks - 1,)


def test_max_clusters_caps_auto():
    sketches, _ = _grouped_sketches(n_groups=4, per_group=3)
    assert TaskClusterer(max_clusters=2).fit(sketches).n_clusters_ <= 2
    assert TaskClusterer().fit(sketches).n_clusters_ == 4


def test_zero_vectors_do_not_crash():
    sketches, _ = _grouped_sketches()
    sketches[[2, 7]] = 0.0
    model = TaskClusterer().fit(sketches)
    assert np.all(np.isfinite(model.affinity_))
    assert model.affinity_[2, 7] == 0.0 and model.affinity_[2, 2] == 1.0
    assert model.labels_.shape == (12,)
    TaskClusterer(n_clusters=3).fit(sketches)
    TaskClusterer().fit(np.zeros((5, 16)))  # all zero: fully disconnected graph


def test_sklearn_clone_compatible_params():
    model = TaskClusterer(n_clusters=3, max_clusters=5, seed=2)
    assert (model.n_clusters, model.max_clusters, model.seed) == (3, 5, 2)
    assert not hasattr(model, "labels_")  # __init__ only stores parameters
    assert "n_clusters=3" in repr(model)
    assert repr(TaskClusterer(min_clusters=2)).endswith("seed=0, min_clusters=2)")  # every parameter shows


@pytest.mark.parametrize(
    "params, sketches, phrase",
    [
        ({"n_clusters": 0}, np.ones((4, 3)), "n_clusters must be in [1, 4], got 0"),
        ({"n_clusters": 5}, np.ones((4, 3)), "n_clusters must be in [1, 4], got 5"),
        ({"n_clusters": 2.5}, np.ones((4, 3)), "n_clusters must be an integer, got 2.5"),
        (
            {"n_clusters": "many"},
            np.ones((4, 3)),
            "n_clusters must be an integer or 'auto', got 'many'",
        ),
        ({"n_clusters": True}, np.ones((4, 3)), "n_clusters must be an integer, got True"),
        ({"max_clusters": 0}, np.ones((4, 3)), "max_clusters must be >= 1, got 0"),
        ({"seed": -3}, np.ones((4, 3)), "seed must be in [0, 4294967295], got -3"),
        ({}, np.ones(3), "2-D array of shape (n_tasks >= 1, dim), got shape (3,)"),
        ({}, np.ones((0, 3)), "got shape (0, 3)"),
        ({}, np.array([[1.0, np.nan], [1.0, 2.0]]), "sketches of tasks [0] contain NaN or inf"),
    ],
)
def test_fit_validates_params(params, sketches, phrase):
    with pytest.raises(InvalidInputError) as info:
        TaskClusterer(**params).fit(sketches)
    assert phrase in str(info.value)


def test_end_to_end_from_tensors():
    # Three groups of task vectors built as tensors, sketched tensor by tensor, then clustered.
    gen = torch.Generator().manual_seed(0)
    shapes = [(20, 16), (16,), (16, 20)]
    centers = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    sketcher = TaskSketcher(dim=512, seed=0)
    sketches, truth = [], []
    for t in range(9):
        group = t % 3
        sign = -1.0 if t % 2 else 1.0
        tensors = [sign * (c + 0.3 * torch.randn(c.shape, generator=gen)) for c in centers[group]]
        sketches.append(_sketch(sketcher, tensors).numpy())
        truth.append(group)
    model = TaskClusterer().fit(np.stack(sketches))
    assert model.n_clusters_ == 3
    assert _same_partition(model.labels_, np.array(truth))
