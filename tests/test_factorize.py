"""Factorization through the store: budgets, error against budget, exactness at full rank, and
the rank allocator (tvbase.methods.budget)."""

import itertools

import numpy as np
import pytest
import torch

from tvbase.methods.budget import allocate_ranks, cumulative, uniform_ranks
from tvbase.methods import FitParams
from tvbase.store import Store
from tvbase.testing.metrics import relative_error


def _build(tmp_path, zoo, params):
    """Store with zoo.first (shared fit) then zoo.later (projected); returns (store, info after first)."""
    store = Store.create(tmp_path / f"store-{params.budget}-{params.rank}", zoo.base, params=params)
    store.ingest({t: zoo.tasks[t] for t in zoo.first}, device="cpu", progress=False)
    after_first = store.info()
    store.ingest({t: zoo.tasks[t] for t in zoo.later}, device="cpu", progress=False)
    return store, after_first


# -- budgets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.25, 0.4, 0.6])
def test_budget_respected(tmp_path, zoo, budget):
    """The budget counts the store on disk: compressed payload, offset table, metadata."""
    store, first = _build(tmp_path, zoo, FitParams(budget=budget, n_clusters=2))
    assert first["tasks"] == len(zoo.first)
    # the first (shared) fit: the whole store directory stays within the budget...
    assert first["disk_bytes"] <= budget * first["raw_fp32_bytes"]
    # ...and uses it (bookkeeping alone is ~12% of raw on this tiny zoo): not a trivially small store
    assert first["disk_bytes"] >= 0.9 * budget * first["raw_fp32_bytes"]
    # the later ingest (projected onto the stored bases): the new task's own factor bytes stay within the budget too
    info = store.info()
    new_bytes = info["factor_bytes"] - first["factor_bytes"]
    raw_new = info["raw_fp32_bytes"] - first["raw_fp32_bytes"]
    assert raw_new == len(zoo.later) * first["raw_fp32_bytes"] // len(zoo.first)
    assert 0 < new_bytes <= budget * raw_new
    rows = {r["name"]: r for r in store.ls()}
    for t in zoo.later:
        assert rows[t]["kind"] == "projected" and rows[t]["cluster"] == rows["b0"]["cluster"]  # c_new is of family b
        assert rows[t]["storage"] <= budget
    # the ls byte accounting adds up to the live factor bytes
    assert sum(r["stored_bytes"] for r in rows.values()) == pytest.approx(info["factor_bytes"], abs=len(rows))
    # without its history, the store holding every task is within the budget of all of them
    store.gc(keep=1)
    assert store.info()["disk_bytes"] <= budget * info["raw_fp32_bytes"]


def test_larger_budget_lowers_error(tmp_path, zoo):
    # bits pinned: this is about rank allocation; with int4 factors the quantization error of
    # the per-task factors (~10% on this zoo) dominates whatever the rank
    errors = {}
    for budget in (0.3, 0.7):
        store, _ = _build(tmp_path, zoo, FitParams(budget=budget, bits=8, dense_bits=16, n_clusters=2))
        rows = store.ls()
        errors[budget] = {
            "shared": np.mean([r["rel_error"] for r in rows if r["kind"] == "shared"]),
            "projected": np.mean([r["rel_error"] for r in rows if r["kind"] == "projected"]),
        }
    for kind in ("shared", "projected"):
        assert errors[0.7][kind] < 0.8 * errors[0.3][kind], errors
    # the zoo is low rank + 4% noise: a 70% budget (bookkeeping is ~20% of it here) must get close
    assert errors[0.7]["shared"] < 0.02


def test_recorded_rel_error_is_the_actual_error(populated, zoo):
    """ls()'s rel_error is ||get(t) - tau_t|| / ||tau_t|| against the true task vector."""
    store = Store.open(populated["path"])
    rows = store.ls()
    assert {r["kind"] for r in rows} == {"shared", "projected"}
    for r in rows:
        actual = relative_error(store.get(r["name"], device="cpu"), zoo.task_vectors[r["name"]])
        assert r["rel_error"] == pytest.approx(actual, rel=1e-3, abs=1e-6), r["name"]
        assert 0 < actual < 0.25  # loose: default int4 factors


def test_full_rank_fp32_is_exact(tmp_path, zoo, rel_error):
    """rank >= every matrix side, fp32 factors and dense tensors: every task rebuilds exactly."""
    store, _ = _build(tmp_path, zoo, FitParams(rank=64, bits=32, dense_bits=32, n_clusters=2))
    kinds = {r["name"]: r["kind"] for r in store.ls()}
    assert {kinds[t] for t in zoo.first} == {"shared"}
    assert {kinds[t] for t in zoo.later} == {"projected"}
    for task in zoo.first + zoo.later:
        rebuilt = store.get(task, device="cpu")
        for name, true in zoo.task_vectors[task].items():
            assert rebuilt[name].shape == true.shape
            assert rel_error(rebuilt[name], true) <= 1e-5, (task, name)
    for r in store.ls():
        assert r["rel_error"] <= 1e-5


# -- the rank allocator --------------------------------------------------------------------------
def _random_concave(rng, max_rank=10, step_cost=None):
    """(cost, gain) of one item: non-decreasing cost, concave non-decreasing gain."""
    r = int(rng.integers(1, max_rank + 1))
    steps = rng.uniform(1, 50, size=r) if step_cost is None else np.full(r, float(step_cost))
    cost = np.concatenate([[rng.uniform(0, 20) if step_cost is None else 0.0], steps]).cumsum()
    gain = cumulative(np.sort(rng.exponential(1.0, size=r))[::-1])  # decreasing increments
    return cost, gain


def _spent(curves, ranks):
    return sum(float(cost[r]) for (cost, _), r in zip(curves, ranks))


def test_allocate_ranks_never_exceeds_budget_and_is_maximal():
    rng = np.random.default_rng(0)
    for _ in range(300):
        curves = [_random_concave(rng) for _ in range(int(rng.integers(1, 7)))]
        floor = sum(float(c[0]) for c, _ in curves)
        top = sum(float(c[-1]) for c, _ in curves)
        budget = float(rng.uniform(floor, top * 1.1))
        ranks = allocate_ranks(curves, budget)
        assert len(ranks) == len(curves)
        assert all(0 <= r < len(c) for r, (c, _) in zip(ranks, curves))
        spent = _spent(curves, ranks)
        assert spent <= budget + 1e-9
        # greedy stops only when no item can take one more step within the budget
        for r, (cost, _) in zip(ranks, curves):
            if r + 1 < len(cost):
                assert spent + (cost[r + 1] - cost[r]) > budget - 1e-9


def test_allocate_ranks_prefers_high_gain_item():
    cost = np.arange(9, dtype=np.float64) * 10  # 10 bytes per rank step, up to rank 8
    low = cumulative([1.0 / k for k in range(1, 9)])
    high = cumulative([10.0 / k for k in range(1, 9)])
    # 3 steps fit; every step of the high item beats the best step of the low one
    assert allocate_ranks([(cost, low), (cost, high)], 30) == [0, 3]
    assert allocate_ranks([(cost, high), (cost, low)], 30) == [3, 0]
    # with room for everything, both are taken to full rank
    assert allocate_ranks([(cost, low), (cost, high)], 160) == [8, 8]


def test_allocate_ranks_optimal_for_equal_step_costs():
    """With one byte price per step and concave gains, greedy is exactly optimal."""
    rng = np.random.default_rng(1)
    for _ in range(100):
        curves = [_random_concave(rng, max_rank=4, step_cost=8) for _ in range(int(rng.integers(1, 4)))]
        steps = int(rng.integers(0, 10))
        ranks = allocate_ranks(curves, 8.0 * steps)
        got = sum(g[r] for (_, g), r in zip(curves, ranks))
        best = max(
            sum(g[r] for (_, g), r in zip(curves, combo))
            for combo in itertools.product(*[range(len(c)) for c, _ in curves])
            if sum(combo) <= steps
        )
        assert got == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_allocate_ranks_counts_rank_zero_costs():
    cost = np.array([50.0, 60.0, 70.0])
    gain = np.array([0.0, 1.0, 1.5])
    assert allocate_ranks([(cost, gain), (cost, gain)], 100) == [0, 0]  # 100 bytes are already spent
    assert allocate_ranks([(cost, gain), (cost, gain)], 110) in ([1, 0], [0, 1])
    assert allocate_ranks([(cost, gain)], 0) == [0]


def test_uniform_ranks_caps_at_each_items_maximum():
    curves = [(np.zeros(4), np.zeros(4)), (np.zeros(100), np.zeros(100))]
    assert uniform_ranks(curves, 10) == [3, 10]


def test_fit_deterministic(tmp_path, zoo):
    """Same inputs, same params -> byte-identical factors (seeded clustering, sign-fixed SVD)."""
    a = Store.create(tmp_path / "a", zoo.base, params=FitParams(budget=0.3, n_clusters=2))
    b = Store.create(tmp_path / "b", zoo.base, params=FitParams(budget=0.3, n_clusters=2))
    items = {t: zoo.tasks[t] for t in zoo.first[:4]}
    a.ingest(items, device="cpu", progress=False)
    b.ingest(items, device="cpu", progress=False)
    assert a.info()["factor_bytes"] == b.info()["factor_bytes"]
    assert [(r["cluster"], r["stored_bytes"]) for r in a.ls()] == [(r["cluster"], r["stored_bytes"]) for r in b.ls()]
    for task in items:
        ga, gb = a.get(task, device="cpu"), b.get(task, device="cpu")
        assert all(torch.equal(ga[n], gb[n]) for n in ga), task
