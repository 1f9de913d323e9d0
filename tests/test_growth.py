"""Tasks added to a fitted store: they join the stored cluster whose bases capture them (a core
on its bases plus a per-task residual), survive rm and compact, and lose no race."""

import shutil

import pytest

from tvbase import FitParams, Store
from tvbase.errors import CommitConflictError
from tvbase.methods.tucker import ProjectedTucker
from tvbase.testing.metrics import relative_error
from tvbase.testing.zoo import build_synthetic_zoo

# a vocabulary-shaped matrix, square and wide layers, a dense tensor; two families of tasks
SHAPES = {"embed.weight": (1000, 48), "l0.weight": (96, 48), "l1.weight": (48, 96), "l2.weight": (64, 64), "norm.weight": (48,)}
FIRST = {f"t{i}": i % 2 for i in range(6)}
LATER = {"u0": 0, "u1": 1}  # one more task of each family
OUTSIDER = {"v0": 2}  # a task of a family no stored cluster holds
BUDGET = 0.1


@pytest.fixture(scope="module")
def growth_zoo(tmp_path_factory):
    return build_synthetic_zoo(tmp_path_factory.mktemp("growth-zoo"), SHAPES, {**FIRST, **LATER, **OUTSIDER}, seed=5, noise_scale=0.001)


@pytest.fixture(scope="module")
def fitted(growth_zoo, tmp_path_factory):
    """A store of FIRST (the shared fit, one cluster per family); tests copy it."""
    store = Store.create(tmp_path_factory.mktemp("fitted") / "store", growth_zoo.base, params=FitParams(budget=BUDGET))
    store.ingest({t: growth_zoo.tasks[t] for t in FIRST}, device="cpu", progress=False)
    return store


@pytest.fixture
def store(fitted, tmp_path):
    shutil.copytree(fitted.path, tmp_path / "store")
    return Store.open(tmp_path / "store")


def _rows(store):
    return {r["name"]: r for r in store.ls()}


def _growth(store, before):
    return store.info()["factor_bytes"] - before


def test_a_later_task_joins_its_familys_cluster_and_the_metadata_says_so(store, growth_zoo):
    store.ingest({t: growth_zoo.tasks[t] for t in LATER}, device="cpu", progress=False)
    rows = _rows(store)
    for later, family in LATER.items():
        sibling = next(t for t, f in FIRST.items() if f == family)
        assert rows[later]["kind"] == "projected" and rows[later]["cluster"] == rows[sibling]["cluster"], rows[later]
        assert later in store.meta["clusters"][str(rows[later]["cluster"])]["tasks"]
        assert rows[later]["rel_error"] == pytest.approx(relative_error(store.get(later, device="cpu"), growth_zoo.task_vectors[later]), rel=1e-3)
    assert store.verify()["ok"]
    # the two families' clusters are still the only ones: a later task writes no bases
    assert len(store.meta["clusters"]) == 2


def test_a_later_task_keeps_a_core_only_where_it_beats_its_own_factors(tmp_path):
    """A core on a stored basis costs its whole r_U x r_V. A later task that is one rank-1 change
    in directions of its own gets little from a rank-24 basis for those bytes: at a budget that
    buys about its rank-1 factors it is stored on its own, as a per-task SVD stores it (before,
    a share of the budget bought every core it could pay for). A task of a stored family keeps
    its cores (the tests above and below)."""
    import torch
    from safetensors.torch import save_file

    zoo = build_synthetic_zoo(tmp_path / "zoo", {"w": (128, 128)}, {f"t{i}": 0 for i in range(4)}, seed=1, rank=24)
    store = Store.create(tmp_path / "store", zoo.base, params=FitParams(budget=0.05))
    store.ingest(zoo.tasks, device="cpu", progress=False)
    gen = torch.Generator().manual_seed(2)
    change = 0.05 * torch.randn(128, 1, generator=gen) @ torch.randn(1, 128, generator=gen)
    save_file({"w": zoo.base_tensors["w"] + change}, tmp_path / "later.safetensors")
    svd = Store.open(shutil.copytree(store.path, tmp_path / "svd"))
    tight = FitParams(budget=0.01)
    store.ingest({"x": tmp_path / "later.safetensors"}, params=tight, device="cpu", progress=False)
    svd.ingest({"x": tmp_path / "later.safetensors"}, params=tight, device="cpu", progress=False, method="svd")
    row = _rows(store)["x"]
    assert row["kind"] == "svd" and row["cluster"] is None, row
    assert row["rel_error"] == pytest.approx(_rows(svd)["x"]["rel_error"], rel=0.01) and row["rel_error"] < 0.2
    assert row["rel_error"] == pytest.approx(relative_error(store.get("x", device="cpu"), {"w": change}), rel=1e-3)


def test_an_outsider_task_is_stored_no_worse_than_on_its_own(store, growth_zoo, tmp_path):
    """A task of no stored family, where small matrices' bases still capture some of it: each
    matrix keeps the option that costs the task least, so it does no worse than a per-task SVD
    at about the same bytes (here it keeps some cores and does better)."""
    svd = Store.open(shutil.copytree(store.path, tmp_path / "svd"))
    before = store.info()["factor_bytes"]
    store.ingest({"v0": growth_zoo.tasks["v0"]}, device="cpu", progress=False)
    svd.ingest({"v0": growth_zoo.tasks["v0"]}, device="cpu", progress=False, method="svd")
    chosen, alone = _rows(store)["v0"], _rows(svd)["v0"]
    assert _growth(store, before) <= 1.02 * _growth(svd, before)
    assert chosen["rel_error"] <= alone["rel_error"] * 1.01, (chosen, alone)


def test_a_projected_task_beats_a_per_task_svd_and_nears_the_joint_fit_at_equal_bytes(store, growth_zoo, tmp_path):
    before = store.info()["factor_bytes"]
    store.ingest({"u0": growth_zoo.tasks["u0"]}, device="cpu", progress=False)
    projected, projected_bytes = _rows(store)["u0"]["rel_error"], _growth(store, before)

    # a per-task SVD given at least as many payload bytes (the budget counts compressed bytes)
    store.rm(["u0"])
    before = store.info()["factor_bytes"]
    store.ingest({"u0": growth_zoo.tasks["u0"]}, params=FitParams(budget=1.2 * BUDGET), device="cpu", progress=False, method="svd")
    svd, svd_bytes = _rows(store)["u0"]["rel_error"], _growth(store, before)
    assert _rows(store)["u0"]["kind"] == "svd"
    assert projected_bytes <= svd_bytes and projected < 0.5 * svd, (projected, projected_bytes, svd, svd_bytes)

    joint = Store.create(tmp_path / "joint", growth_zoo.base, params=FitParams(budget=BUDGET))
    joint.ingest({t: growth_zoo.tasks[t] for t in [*FIRST, "u0"]}, device="cpu", progress=False)
    joint_row = _rows(joint)["u0"]
    # at the bytes the joint fit gives the task (its own factors and its share of the bases)
    store.rm(["u0"])
    params = FitParams(budget=BUDGET * joint_row["stored_bytes"] / projected_bytes)
    before = store.info()["factor_bytes"]
    store.ingest({"u0": growth_zoo.tasks["u0"]}, params=params, device="cpu", progress=False)
    assert _growth(store, before) <= 1.05 * joint_row["stored_bytes"]
    assert _rows(store)["u0"]["rel_error"] <= 1.1 * joint_row["rel_error"], (_rows(store)["u0"], joint_row)


def test_rm_of_the_fitted_tasks_keeps_the_cluster_of_a_task_that_joined_it(store, growth_zoo):
    store.ingest({"u0": growth_zoo.tasks["u0"]}, device="cpu", progress=False)
    cluster = _rows(store)["u0"]["cluster"]
    before = store.get("u0", device="cpu")
    siblings = [t for t, f in FIRST.items() if f == 0]
    store.rm(siblings)
    reopened = Store.open(store.path)
    assert str(cluster) in reopened.meta["clusters"] and reopened.meta["clusters"][str(cluster)]["tasks"] == ["u0"]
    assert relative_error(reopened.get("u0", device="cpu"), before) < 1e-6
    assert reopened.verify()["ok"]
    reopened.rm(["u0"])  # the last task of the cluster: its bases go with it
    assert str(cluster) not in Store.open(store.path).meta["clusters"] and Store.open(store.path).verify()["ok"]


def test_compact_refits_a_task_that_joined_into_the_shared_fit(store, growth_zoo):
    store.ingest({t: growth_zoo.tasks[t] for t in LATER}, device="cpu", progress=False)
    store.compact(device="cpu", progress=False)
    rows = _rows(Store.open(store.path))
    assert {r["kind"] for r in rows.values()} == {"shared"} and set(rows) == {*FIRST, *LATER}
    for t in LATER:
        assert relative_error(store.get(t, device="cpu"), growth_zoo.task_vectors[t]) == pytest.approx(rows[t]["rel_error"], rel=1e-3)


def test_a_cluster_removed_during_the_fit_refuses_the_ingest_whole_and_wait_runs_it_again(store, growth_zoo, monkeypatch):
    real_fit, removed = ProjectedTucker.fit, []
    siblings = [t for t, f in FIRST.items() if f == 0]

    def fit_while_another_writer_removes_the_cluster(self, *args, **kwargs):
        if not removed:  # another writer removes every task of the cluster the task will join
            removed.append(Store.open(store.path).rm(siblings))
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(ProjectedTucker, "fit", fit_while_another_writer_removes_the_cluster)
    with pytest.raises(CommitConflictError, match="fitted tasks or clusters"):
        store.ingest({"u0": growth_zoo.tasks["u0"]}, device="cpu", progress=False)
    head = Store.open(store.path)
    assert head.version == removed[0] and "u0" not in head.tasks and head.verify()["ok"]
    # with --wait the ingest runs again on the new head: it joins what is there now
    head.ingest({"u0": growth_zoo.tasks["u0"]}, device="cpu", progress=False, wait=30)
    rows = _rows(Store.open(store.path))
    assert rows["u0"]["cluster"] is None or str(rows["u0"]["cluster"]) in Store.open(store.path).meta["clusters"]
    assert relative_error(head.get("u0", device="cpu"), growth_zoo.task_vectors["u0"]) == pytest.approx(rows["u0"]["rel_error"], rel=1e-3)


def test_the_project_method_stores_each_task_on_its_own_where_no_basis_is_stored(growth_zoo, tmp_path):
    store = Store.create(tmp_path / "store", growth_zoo.base, params=FitParams(budget=BUDGET))
    store.ingest({t: growth_zoo.tasks[t] for t in LATER}, device="cpu", progress=False, method="project")
    assert {(r["kind"], r["cluster"]) for r in store.ls()} == {("svd", None)}
    assert store.meta["clusters"] == {}


def test_the_memory_plan_counts_the_stored_bases(fitted):
    from tvbase.operations import _stored_bases

    bases = _stored_bases(fitted._snapshot)
    held = sum(b.nbytes for tensors in bases.values() for b in tensors.values())
    assert held > 0 and set(bases) == {int(c) for c in fitted.meta["clusters"]}
    alone = ProjectedTucker(FitParams()).planned_peak_bytes(fitted.shapes, 1)
    assert ProjectedTucker(FitParams(), bases=bases).planned_peak_bytes(fitted.shapes, 1) == alone + held
