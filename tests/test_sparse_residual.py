"""Sparse residuals: what the factors miss, kept at seeded random entries (tvbase.codec.sparse)."""

import math

import numpy as np
import pytest
import torch

from tvbase import FitParams, Store
from tvbase.cli import main
from tvbase.codec.factors import TaskTensor
from tvbase.codec.quantize import dequantize, quantize, quantize_clipped
from tvbase.codec.sparse import THRESHOLD_BITS, keep_fraction, keep_threshold, positions, tensor_seed
from tvbase.errors import IntegrityError
from tvbase.format import ROLES
from tvbase.reconstruct import rebuild_tensor
from tvbase.testing.metrics import relative_error
from tvbase.testing.zoo import build_synthetic_zoo

# an embedding (a vocabulary matrix) and a narrow matrix (a side under SPARSE_MIN_SIDE), which
# get no sparse residual, two wide matrices and a bias
SHAPES = {"emb.weight": (4096, 8), "w1.weight": (512, 384), "w2.weight": (384, 512), "w2.bias": (384,), "small.weight": (64, 384)}
FAMILIES = {"t0": 0, "t1": 0, "t2": 1, "t3": 1, "late": 0}


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer in plain Python: the reference the format names."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_positions_follow_the_documented_hash():
    seed, threshold = tensor_seed(7, "w1.weight"), keep_threshold(0.3)
    expected = [i for i in range(5000) if _fmix32(i ^ seed) >> (32 - THRESHOLD_BITS) < threshold]
    assert positions(5000, seed, threshold).tolist() == expected


@pytest.mark.parametrize("numel", [0, 1, 5000, 3 * 1024 + 7])
def test_positions_are_the_same_hashed_by_numpy_or_by_torch(numel, monkeypatch):
    """The host path (numpy uint32) and the device path (torch int64, run here on the CPU) pick
    the same entries, across block boundaries and for every seed's top bit."""
    from tvbase.codec import sparse

    monkeypatch.setattr(sparse, "_BLOCK", 1024)  # several blocks of each
    monkeypatch.setattr(sparse, "_DEVICE_BLOCK", 1000)
    for seed in (0, tensor_seed(7, "w1.weight"), 2**32 - 1):
        for threshold in (0, keep_threshold(0.3), 2**THRESHOLD_BITS):
            host = positions(numel, seed, threshold)
            assert host.dtype == torch.int64 and host.device.type == "cpu"
            assert host.tolist() == sparse._device_positions(numel, seed, threshold, "cpu").tolist()
            assert host.tolist() == [i for i in range(numel) if _fmix32(i ^ seed) >> (32 - THRESHOLD_BITS) < threshold]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_positions_hashed_on_cuda_are_those_of_the_cpu():
    seed = tensor_seed(5, "w2.weight")
    on_cuda = positions(5_000_000, seed, keep_threshold(0.2), "cuda")
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), positions(5_000_000, seed, keep_threshold(0.2)))


def test_positions_nest_keep_their_fraction_and_depend_on_the_seed():
    seed = tensor_seed(3, "w1.weight")
    many, few = positions(200_000, seed, keep_threshold(0.1)), positions(200_000, seed, keep_threshold(0.02))
    assert np.isin(few, many).all()  # a smaller threshold keeps a subset
    assert abs(len(many) / 200_000 - 0.1) < 0.005 and abs(len(few) / 200_000 - 0.02) < 0.002
    assert np.all(np.diff(many) > 0) and many[0] >= 0 and many[-1] < 200_000
    other = positions(200_000, tensor_seed(4, "w1.weight"), keep_threshold(0.1))
    assert len(np.intersect1d(many, other)) < 0.2 * len(many)  # independent draws overlap ~10%
    assert tensor_seed(3, "w2.weight") != seed
    assert len(positions(1000, seed, 0)) == 0 and len(positions(1000, seed, keep_threshold(1.0))) == 1000
    assert keep_fraction(keep_threshold(0.25)) == 0.25
    with pytest.raises(ValueError, match="2\\*\\*32"):
        positions(2**32, seed, 1)


def test_clipped_quantization_beats_absmax_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4000, 1, generator=g) * torch.randn(4000, 1, generator=g).exp())  # heavy-tailed
    for bits in (2, 4):
        clipped, plain = quantize_clipped(x, bits), quantize(x, bits)
        assert clipped.nbytes == plain.nbytes
        err = lambda q: float((dequantize(q) - x).square().sum() / x.square().sum())  # noqa: E731
        assert err(clipped) < 0.8 * err(plain)


def test_a_count_that_the_mask_does_not_give_is_an_integrity_error():
    seed, threshold = tensor_seed(1, "w"), keep_threshold(0.2)
    k = len(positions(30 * 20, seed, threshold))
    values = quantize_clipped(torch.randn(k, 1), 2)
    ok = rebuild_tensor((30, 20), [(1.0, None, TaskTensor(sparse=values, sparse_mask=(seed, threshold)))])
    pos = positions(600, seed, threshold)
    assert torch.equal(ok.reshape(-1)[pos], dequantize(values)[:, 0])
    assert int((ok != 0).sum()) <= k and float(ok.reshape(-1)[np.setdiff1d(np.arange(600), pos)].abs().sum()) == 0
    with pytest.raises(IntegrityError, match="pick"):
        rebuild_tensor((30, 20), [(1.0, None, TaskTensor(sparse=values, sparse_mask=(seed, 2 * threshold)))])


@pytest.fixture(scope="module")
def sparse_zoo(tmp_path_factory):
    return build_synthetic_zoo(tmp_path_factory.mktemp("sparse-zoo"), SHAPES, FAMILIES, seed=5, rank=3,
                               delta_scale=0.05, noise_scale=0.02)


def _task_rows(store, task):
    tid = store.meta["tasks"][task]["id"]
    index = store._snapshot.index
    rows = index[(index[:, 0] == 1) & (index[:, 1] == tid)]
    names = store.meta["tensors"]
    return {(names[int(r[2])], ROLES[int(r[3])]) for r in rows}


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory, sparse_zoo):
    path = tmp_path_factory.mktemp("sparse-store") / "store"
    store = Store.create(path, sparse_zoo.base, params=FitParams(budget=0.1, sparse_share=0.2))
    store.ingest({t: sparse_zoo.tasks[t] for t in ("t0", "t1", "t2", "t3")}, progress=False)
    return store


def test_a_sparse_fit_records_its_exact_error_and_stays_in_its_budget(sparse_store, sparse_zoo):
    info = sparse_store.info()
    assert info["disk_bytes"] <= 0.1 * info["raw_fp32_bytes"]
    for t in ("t0", "t1", "t2", "t3"):
        record = sparse_store.meta["tasks"][t]
        assert 0 < keep_fraction(record["sparse"]["threshold"]) < 1
        rows = _task_rows(sparse_store, t)
        assert {("w1.weight", "sparse"), ("w2.weight", "sparse")} <= rows
        assert ("emb.weight", "sparse") not in rows  # a vocabulary matrix keeps rows, not random entries
        assert ("small.weight", "sparse") not in rows  # too narrow for random entries' noise to average out
        measured = relative_error(sparse_store.get(t), sparse_zoo.task_vectors[t])
        assert measured == pytest.approx(record["rel_error"], rel=1e-4)


def test_the_sparse_residual_is_what_the_factors_leave_rescaled(sparse_store, sparse_zoo):
    """At its entries, the stored residual is (tau - the factors' rebuild) / keep, up to 2-bit codes."""
    snap = sparse_store._snapshot
    record = sparse_store.meta["tasks"]["t0"]
    tt = snap._task_tensor("t0", "w1.weight")
    shared = snap._shared(record["cluster"], "w1.weight") if record["cluster"] is not None else None
    factors_only = TaskTensor(core=tt.core, A=tt.A, B=tt.B)
    left = sparse_zoo.task_vectors["t0"]["w1.weight"] - rebuild_tensor((512, 384), [(1.0, shared, factors_only)])
    pos = positions(512 * 384, *tt.sparse_mask)
    target = left.reshape(-1)[pos] / keep_fraction(tt.sparse_mask[1])
    stored = dequantize(tt.sparse)[:, 0]
    assert len(stored) == len(pos) > 0
    assert float(torch.nn.functional.cosine_similarity(stored, target, dim=0)) > 0.8


def test_compose_of_sparse_tasks_is_the_sum_of_their_gets(sparse_store):
    composed = sparse_store.compose({"t0": 0.7, "t2": -0.5})
    a, b = sparse_store.get("t0"), sparse_store.get("t2")
    for name in SHAPES:
        assert torch.allclose(composed[name], 0.7 * a[name] - 0.5 * b[name], atol=1e-5)


def test_a_later_task_gets_a_sparse_residual_too(tmp_path, sparse_store, sparse_zoo):
    import shutil

    shutil.copytree(sparse_store.path, tmp_path / "copy")
    store = Store.open(tmp_path / "copy")
    store.ingest({"late": sparse_zoo.tasks["late"]}, progress=False)
    record = store.meta["tasks"]["late"]
    assert record["kind"] == "projected" and "sparse" in record
    assert ("w1.weight", "sparse") in _task_rows(store, "late")
    assert relative_error(store.get("late"), sparse_zoo.task_vectors["late"]) == pytest.approx(record["rel_error"], rel=1e-4)


def test_a_threshold_that_picks_other_entries_is_found_by_verify_and_refused_by_get(tmp_path, sparse_store):
    import shutil

    shutil.copytree(sparse_store.path, tmp_path / "copy")
    store = Store.open(tmp_path / "copy")
    assert store.verify()["ok"]
    with store._write("tamper with a threshold", {}) as (_, meta):  # a consistent digest, wrong positions
        meta["tasks"]["t1"]["sparse"]["threshold"] *= 2
    report = store.verify()
    assert not report["ok"] and any("task 't1'" in p and "pick" in p for p in report["problems"])
    with pytest.raises(IntegrityError, match="pick"):
        store.get("t1")
    assert torch.isfinite(store.get("t0")["w1.weight"]).all()  # the other tasks still read
    with store._write("tamper with a seed", {}) as (_, meta):
        meta["tasks"]["t2"]["sparse"]["seed"] = -1
    assert any("task 't2'" in p and "out of range" in p for p in store.verify()["problems"])
    with pytest.raises(IntegrityError, match="out of range"):
        store.get("t2")


def test_explicit_ranks_and_a_zero_share_store_no_sparse_residual(tmp_path, sparse_zoo):
    tasks = {t: sparse_zoo.tasks[t] for t in ("t0", "t1", "t2")}
    for i, params in enumerate((FitParams(budget=None, rank=2, sparse_share=0.5), FitParams(budget=0.25, sparse_share=0.0))):
        store = Store.create(tmp_path / f"s{i}", sparse_zoo.base, params=params)
        store.ingest(tasks, progress=False)
        assert all("sparse" not in store.meta["tasks"][t] for t in tasks)
        assert not any(role == "sparse" for t in tasks for _, role in _task_rows(store, t))


def test_ls_says_that_errors_count_the_sparse_noise(sparse_store, capsys):
    assert main(["ls", str(sparse_store.path)]) == 0
    assert "counts the noise of sparse residuals" in capsys.readouterr().out
    assert all(row["sparse"] for row in sparse_store.ls())


def test_the_cli_records_the_sparse_share_and_refuses_a_bad_one(tmp_path, sparse_zoo, capsys):
    assert main(["init", str(tmp_path / "s"), "--base", str(sparse_zoo.base), "--sparse-share", "0.4"]) == 0
    assert Store.open(tmp_path / "s").meta["params"]["sparse_share"] == 0.4
    assert main(["init", str(tmp_path / "bad"), "--base", str(sparse_zoo.base), "--sparse-share", "1.5"]) != 0
    assert "sparse share must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_lora_export_counts_the_sparse_residual_as_left_out(sparse_store):
    """factors() leaves the random entries out; the export measures what it leaves exactly."""
    snap = sparse_store._snapshot
    left, right = snap.factors("w1.weight", {"t0": 1.0}, "cpu")
    full = snap.rebuild("w1.weight", {"t0": 1.0}, "cpu")
    tt = snap._task_tensor("t0", "w1.weight")
    sparse_only = rebuild_tensor((512, 384), [(1.0, None, TaskTensor(sparse=tt.sparse, sparse_mask=tt.sparse_mask))])
    assert snap.has_sparse("w1.weight", ["t0"]) and not snap.has_sparse("emb.weight", ["t0"])
    assert torch.allclose(left @ right.T + sparse_only, full, atol=1e-5)
    assert math.isfinite(float(full.square().sum()))
