"""The helpers of tvbase.testing the other tests and the benchmarks rely on: the synthetic zoo
generator and the error metrics."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tvbase.testing.metrics import max_relative_error, relative_error
from tvbase.testing.zoo import build_synthetic_zoo


# -- metrics -------------------------------------------------------------------------------------
def test_relative_error_is_the_frobenius_ratio_over_all_tensors():
    exact = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    approx = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[4.0]], dtype=torch.bfloat16), "extra": torch.ones(9)}
    assert relative_error(approx, exact) == pytest.approx(1 / 5, rel=1e-15)
    assert relative_error(exact, exact) == 0.0
    assert relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == 1.0  # two tensors


def test_relative_error_edge_cases():
    zero = {"a": torch.zeros(3)}
    assert relative_error(zero, zero) == 0.0
    assert relative_error({}, {}) == 0.0
    assert relative_error({"a": torch.tensor([0.0, 1e-30, 0.0])}, zero) == math.inf
    with pytest.raises(KeyError):
        relative_error({}, zero)
    with pytest.raises(ValueError, match="shape"):
        relative_error({"a": torch.zeros(1)}, zero)  # would broadcast


def test_max_relative_error():
    expected = torch.tensor([2.0, -4.0])
    assert max_relative_error(torch.tensor([2.0, -3.0]), expected) == 0.25
    assert max_relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert max_relative_error(torch.tensor([0.5, 0.0]), torch.zeros(2)) == 0.5  # absolute when expected is 0
    assert max_relative_error(torch.zeros(0), torch.zeros(0)) == 0.0


# -- synthetic zoo -------------------------------------------------------------------------------
SHAPES = {"w": (12, 8), "conv": (6, 2, 2, 2), "row": (1, 9), "b": (5,)}


def _zoo(root, **kw):
    kw = {"seed": 7, "frozen": {"ids": torch.arange(4)}, "sharded": {"s": 200}, **kw}
    return build_synthetic_zoo(root, SHAPES, {"x0": 0, "x1": 0, "y0": 1, "s": 1}, **kw)


def test_zoo_files_tensors_and_task_vectors(tmp_path):
    zoo = _zoo(tmp_path / "z")
    assert zoo.base == tmp_path / "z" / "base.safetensors"
    assert list(zoo.tasks) == ["x0", "x1", "y0", "s"]
    assert zoo.tasks["x0"] == tmp_path / "z" / "x0.safetensors" and zoo.tasks["s"].is_dir()
    assert len(list(zoo.tasks["s"].glob("*.safetensors"))) >= 2
    assert list(zoo.base_tensors) == [*SHAPES, "ids"]
    assert {n: tuple(t.shape) for n, t in load_file(zoo.base).items()} == {**SHAPES, "ids": (4,)}
    assert zoo.items(["x1"]) == [f"x1={zoo.tasks['x1']}"]
    for task in ["x0", "x1", "y0"]:
        finetuned = load_file(zoo.tasks[task])
        assert torch.equal(finetuned["ids"], torch.arange(4))
        for name, tv in zoo.task_vectors[task].items():
            assert tv.dtype == torch.float32 and tv.shape == zoo.base_tensors[name].shape
            assert torch.equal(tv, finetuned[name].float() - zoo.base_tensors[name].float())
        assert not zoo.task_vectors[task]["ids"].any()


def test_zoo_deltas_are_low_rank_in_families(tmp_path):
    zoo = _zoo(tmp_path / "z", noise_scale=0.0)
    tv = zoo.task_vectors
    for name, (m, n) in [("w", (12, 8)), ("conv", (6, 8))]:
        for task in tv:
            assert torch.linalg.matrix_rank(tv[task][name].reshape(m, n)) == 3, (task, name)
        # one family shares its column space: x0 and x1 together still span rank 3
        assert torch.linalg.matrix_rank(torch.cat([tv["x0"][name], tv["x1"][name]], 1).reshape(m, -1)) == 3
        assert torch.linalg.matrix_rank(torch.cat([tv["x0"][name], tv["y0"][name]], 1).reshape(m, -1)) == 6
    assert torch.linalg.matrix_rank(tv["x0"]["row"]) == 1  # a side of 1: a dense delta


def test_zoo_is_reproducible_and_seeded(tmp_path):
    a, b, c = _zoo(tmp_path / "a"), _zoo(tmp_path / "b"), _zoo(tmp_path / "c", seed=8)
    for task in a.tasks:
        assert all(torch.equal(a.task_vectors[task][n], b.task_vectors[task][n]) for n in a.base_tensors)
    assert a.base.read_bytes() == b.base.read_bytes() and a.tasks["x1"].read_bytes() == b.tasks["x1"].read_bytes()
    assert not torch.equal(a.base_tensors["w"], c.base_tensors["w"])


def test_zoo_low_rank_divisor_scales_only_the_low_rank_part(tmp_path):
    one = _zoo(tmp_path / "a", noise_scale=0.0)
    two = _zoo(tmp_path / "b", noise_scale=0.0, low_rank_divisor=2.0)
    torch.testing.assert_close(two.task_vectors["x0"]["w"], one.task_vectors["x0"]["w"] / 2, rtol=1e-4, atol=1e-6)
    assert torch.equal(two.task_vectors["x0"]["b"], one.task_vectors["x0"]["b"])


def test_zoo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="one shard"):
        _zoo(tmp_path / "a", sharded={"s": 10**6})
    with pytest.raises(ValueError, match="not tasks"):
        _zoo(tmp_path / "b", sharded={"nope": 100})
    with pytest.raises(ValueError, match="family"):
        _zoo(tmp_path / "c", n_families=1)
    with pytest.raises(ValueError, match="frozen"):
        _zoo(tmp_path / "d", frozen={"w": torch.zeros(12, 8)})


def test_torch_threads_sets_and_restores_the_count():
    """tvbase.devices.torch_threads: the block runs with n threads, the old count comes back even
    after an error, and None leaves the setting alone."""
    import torch

    from tvbase.devices import torch_threads

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(target):
            assert torch.get_num_threads() == target
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
