"""Reads multiply integer-coded factors in bfloat16 where the device has units for it and the
tasks' recorded errors dwarf the rounding (tvbase.reconstruct.BF16_MIN_REL_ERROR)."""

import pytest
import torch

import tvbase.devices
from tvbase.codec.factors import SharedBasis, TaskTensor
from tvbase.codec.quantize import quantize
from tvbase.devices import bf16_products
from tvbase.methods import FitParams
from tvbase.reconstruct import BF16_MIN_REL_ERROR, rebuild_tensor
from tvbase.store import Store
from tvbase.testing.metrics import relative_error


def _terms(bits, seed=0):
    """Two tasks of one cluster (a shared basis and cores) with per-task factors, at ``bits``."""
    gen = torch.Generator().manual_seed(seed)
    m, n, r, q = 300, 200, 12, 6
    basis = SharedBasis(U=quantize(torch.randn(m, r, generator=gen), bits), V=quantize(torch.randn(n, r, generator=gen), bits))
    return [
        (alpha, basis, TaskTensor(core=quantize(torch.randn(r, r, generator=gen), bits),
                                  A=quantize(torch.randn(m, q, generator=gen), bits), B=quantize(torch.randn(n, q, generator=gen), bits)))
        for alpha in (0.7, -0.4)
    ], (m, n)


def test_bf16_products_round_integer_codes_by_a_fraction_of_a_percent():
    terms, shape = _terms(4)
    exact = rebuild_tensor(shape, terms)
    fast = rebuild_tensor(shape, terms, bf16_products=True)
    assert fast.dtype == torch.float32 and fast.shape == shape
    difference = relative_error(fast, exact)
    assert 0 < difference < 5e-3  # rounded (so the bfloat16 path ran), by a fraction of a percent


def test_float_factors_are_never_multiplied_in_bf16():
    terms, shape = _terms(32)
    assert torch.equal(rebuild_tensor(shape, terms, bf16_products=True), rebuild_tensor(shape, terms))


def test_the_environment_turns_bf16_products_off(monkeypatch):
    monkeypatch.setenv("TVBASE_BF16_PRODUCTS", "0")
    assert bf16_products("cpu") is False


def _coarse_and_fine(tmp_path, zoo):
    """A store of tasks fitted coarsely (recorded errors above BF16_MIN_REL_ERROR) and one of
    the same tasks fitted finely (below it)."""
    tasks = {t: zoo.tasks[t] for t in ("a0", "a1", "b0")}
    coarse = Store.create(tmp_path / "coarse", zoo.base, params=FitParams(rank=1, budget=None, n_clusters=1))
    coarse.ingest(tasks, device="cpu", progress=False)
    fine = Store.create(tmp_path / "fine", zoo.base, params=FitParams(budget=0.5))
    fine.ingest(tasks, device="cpu", progress=False)
    return coarse, fine


def test_reads_use_bf16_only_for_coarse_tasks_and_keep_their_recorded_errors(tmp_path, zoo, monkeypatch):
    coarse, fine = _coarse_and_fine(tmp_path, zoo)
    assert min(r["rel_error"] for r in coarse.ls()) >= BF16_MIN_REL_ERROR > max(r["rel_error"] for r in fine.ls())
    reads = {}
    for fast in (False, True):
        monkeypatch.setattr(tvbase.devices, "bf16_products", lambda device, fast=fast: fast)
        reads[fast] = {store: {t: store.get(t, device="cpu") for t in store.tasks} for store in (coarse, fine)}
    for t in fine.tasks:  # fine tasks: float32 products either way
        assert all(torch.equal(reads[True][fine][t][name], reads[False][fine][t][name]) for name in reads[False][fine][t])
    for row in coarse.ls():  # coarse tasks: rounded, and the error the store records still holds
        t = row["name"]
        assert any(not torch.equal(reads[True][coarse][t][name], reads[False][coarse][t][name]) for name in reads[False][coarse][t])
        assert relative_error(reads[True][coarse][t], zoo.task_vectors[t]) == pytest.approx(row["rel_error"], rel=1e-3)
