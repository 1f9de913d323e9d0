"""Reads multiply integer-coded factors in bfloat16 where the device has units for it and the
rounding, measured on probes, keeps the tasks' recorded errors true (tvbase.reconstruct)."""

import pytest
import torch

import tvbase.devices
from tvbase.codec.factors import SharedBasis, TaskTensor
from tvbase.codec.quantize import quantize
from tvbase.devices import bf16_products
from tvbase.methods import FitParams
from tvbase.reconstruct import BF16_ERROR_SHARE, bf16_tolerance, rebuild_tensor
from tvbase.store import Store
from tvbase.testing.metrics import relative_error
from tvbase.testing.zoo import build_synthetic_zoo

# two matrices large enough for bfloat16 products (at least 2**18 entries), a small one and a bias
SHAPES = {"w1.weight": (768, 512), "w2.weight": (512, 768), "small.weight": (64, 48), "w2.bias": (512,)}


def _terms(bits, seed=0):
    """Two tasks of one cluster (a shared basis and cores) with per-task factors, at ``bits``."""
    gen = torch.Generator().manual_seed(seed)
    m, n, r, q = 640, 480, 12, 6  # 307,200 entries: above the float32-only size
    basis = SharedBasis(U=quantize(torch.randn(m, r, generator=gen), bits), V=quantize(torch.randn(n, r, generator=gen), bits))
    return [
        (alpha, basis, TaskTensor(core=quantize(torch.randn(r, r, generator=gen), bits),
                                  A=quantize(torch.randn(m, q, generator=gen), bits), B=quantize(torch.randn(n, q, generator=gen), bits)))
        for alpha in (0.7, -0.4)
    ], (m, n)


def test_bf16_products_round_integer_codes_by_a_fraction_of_a_percent():
    terms, shape = _terms(4)
    exact = rebuild_tensor(shape, terms)
    fast = rebuild_tensor(shape, terms, bf16_tolerance=1.0)
    assert fast.dtype == torch.float32 and fast.shape == shape
    difference = relative_error(fast, exact)
    assert 0 < difference < 5e-3  # rounded (so the bfloat16 path ran), by a fraction of a percent


def test_float_factors_are_never_multiplied_in_bf16():
    terms, shape = _terms(32)
    assert torch.equal(rebuild_tensor(shape, terms, bf16_tolerance=1.0), rebuild_tensor(shape, terms))


def test_a_rounding_beyond_the_tolerance_gives_the_float32_product():
    terms, shape = _terms(4)
    assert torch.equal(rebuild_tensor(shape, terms, bf16_tolerance=1e-6), rebuild_tensor(shape, terms))


def test_a_sum_that_nearly_cancels_is_measured_and_formed_in_float32():
    """Two equal tasks at 1 and -0.99: the result is 1% of each term, so the rounding of the
    per-task factors, stacked term by term, is many times larger relative to it than usual
    (about 5% here against 0.3%), and the probes see it."""
    terms, shape = _terms(4)
    (_, basis, tt), _ = terms
    cancelling = [(1.0, basis, tt), (-0.99, basis, tt)]
    exact = rebuild_tensor(shape, cancelling)
    assert relative_error(rebuild_tensor(shape, cancelling, bf16_tolerance=1.0), exact) > 0.02  # what bf16 would give
    assert torch.equal(rebuild_tensor(shape, cancelling, bf16_tolerance=0.01), exact)


def test_the_tolerance_keeps_recorded_errors_true_to_the_share():
    # rounding d adds to an error e in quadrature: sqrt(e**2 + d**2) / e - 1 <= share for d <= tolerance
    for error in (0.1, 0.2, 0.5):
        d = bf16_tolerance([error, 2 * error])
        assert (error**2 + d**2) ** 0.5 / error - 1 <= BF16_ERROR_SHARE * 1.0001
    assert bf16_tolerance([0.3, 0.01]) is None  # the finest task: bfloat16 could not keep its error
    assert bf16_tolerance([]) is None


def test_the_environment_turns_bf16_products_off(monkeypatch):
    monkeypatch.setenv("TVBASE_BF16_PRODUCTS", "0")
    assert bf16_products("cpu") is False


@pytest.fixture(scope="module")
def large_zoo(tmp_path_factory):
    return build_synthetic_zoo(tmp_path_factory.mktemp("bf16-zoo"), SHAPES, {"a0": 0, "a1": 0, "b0": 1}, seed=3)


def _coarse_and_fine(tmp_path, zoo):
    """A store of tasks fitted coarsely (errors bfloat16 rounding hardly moves) and one of the same
    tasks fitted finely (errors it would move)."""
    coarse = Store.create(tmp_path / "coarse", zoo.base, params=FitParams(rank=1, budget=None, n_clusters=1))
    coarse.ingest(zoo.tasks, device="cpu", progress=False)
    fine = Store.create(tmp_path / "fine", zoo.base, params=FitParams(budget=0.5))
    fine.ingest(zoo.tasks, device="cpu", progress=False)
    return coarse, fine


def _reads(stores, fast, monkeypatch):
    monkeypatch.setattr(tvbase.devices, "bf16_products", lambda device: fast)
    return {store: {t: store.get(t, device="cpu") for t in store.tasks} for store in stores}


def test_reads_use_bf16_only_where_the_recorded_errors_stay_true(tmp_path, large_zoo, monkeypatch):
    coarse, fine = _coarse_and_fine(tmp_path, large_zoo)
    assert bf16_tolerance([r["rel_error"] for r in coarse.ls()]) is not None
    assert bf16_tolerance([r["rel_error"] for r in fine.ls()]) is None
    exact, fast = _reads((coarse, fine), False, monkeypatch), _reads((coarse, fine), True, monkeypatch)
    for t in fine.tasks:  # fine tasks: float32 products either way
        assert all(torch.equal(fast[fine][t][name], exact[fine][t][name]) for name in SHAPES)
    for row in coarse.ls():  # coarse tasks: the large matrices rounded, the small one not
        t = row["name"]
        assert not torch.equal(fast[coarse][t]["w1.weight"], exact[coarse][t]["w1.weight"])
        assert torch.equal(fast[coarse][t]["small.weight"], exact[coarse][t]["small.weight"])
        # and the error the store records still holds
        assert relative_error(fast[coarse][t], large_zoo.task_vectors[t]) == pytest.approx(row["rel_error"], rel=BF16_ERROR_SHARE)
