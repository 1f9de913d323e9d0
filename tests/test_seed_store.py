"""The Task Vector Bases seed methods as ingest methods: stored in the same store, rebuilt and composed."""

import pytest

from tvbase.cli import main
from tvbase.errors import InvalidInputError
from tvbase.store import Store

METHODS = ["pca", "autoencoder", "cluster-merge"]
TASKS = ["a0", "a1", "a2", "b0", "b1"]


@pytest.mark.parametrize("method", METHODS)
def test_seed_method_is_exact_at_full_rank(method, fresh_store, zoo, rel_error):
    fresh_store.ingest({t: zoo.tasks[t] for t in TASKS}, method=method, n_components=len(TASKS), progress=False)
    for task in TASKS:
        rebuilt = fresh_store.get(task, device="cpu")
        for name, tensor in zoo.task_vectors[task].items():
            if tensor.abs().max() > 0:  # the integer buffer's delta is 0
                assert rel_error(rebuilt[name], tensor) <= 1e-5, (method, task, name)
        assert fresh_store.ls()[fresh_store.tasks.index(task)]["kind"] == method
    assert fresh_store.verify()["ok"]


@pytest.mark.parametrize("method", METHODS)
def test_seed_composition_equals_dense_sum(method, fresh_store, zoo):
    fresh_store.ingest({t: zoo.tasks[t] for t in TASKS}, method=method, progress=False)
    coefficients = {"a0": 0.7, "b1": -0.4, "a2": 0.25}
    composed = fresh_store.compose(coefficients, device="cpu")
    singles = {t: fresh_store.get(t, device="cpu") for t in coefficients}
    for name, tensor in composed.items():
        dense = sum(alpha * singles[t][name] for t, alpha in coefficients.items())
        scale = max(float(dense.abs().max()), 1e-12)
        assert float((tensor - dense).abs().max()) / scale <= 1e-5, (method, name)


def test_seed_basis_with_fewer_components_stores_less(fresh_store, zoo):
    fresh_store.ingest({t: zoo.tasks[t] for t in TASKS}, method="pca", n_components=2, progress=False)
    cluster = next(iter(fresh_store.meta["clusters"].values()))
    assert cluster["method"] == "pca" and cluster["n_components"] == 2
    # PCA stores the mean plus 2 basis vectors for 5 tasks at fp32: 3/5 of raw
    assert fresh_store.info()["factor_storage"] == pytest.approx(3 / 5, rel=0.01)
    assert all(len(fresh_store.meta["tasks"][t]["coefficients"]) == 2 for t in TASKS)


def test_autoencoder_records_loss_above_its_spectral_bound(fresh_store, zoo):
    fresh_store.ingest({t: zoo.tasks[t] for t in TASKS}, method="autoencoder", progress=False)
    cluster = next(iter(fresh_store.meta["clusters"].values()))
    assert cluster["loss"] >= cluster["lower_bound"] * (1 - 1e-9)
    assert cluster["loss"] <= 1.5 * cluster["lower_bound"] + 1e-9


def test_unknown_method_lists_the_choices(fresh_store, zoo, snapshot_state):
    before = snapshot_state(fresh_store.path)
    with pytest.raises(InvalidInputError, match="pca, autoencoder, cluster-merge"):
        fresh_store.ingest({"a0": zoo.tasks["a0"]}, method="svd-magic")
    assert snapshot_state(fresh_store.path) == before


def test_cli_method_flag(tmp_path, zoo, capsys):
    store = tmp_path / "s"
    assert main(["init", str(store), "--base", str(zoo.base), "--budget", "50%"]) == 0
    items = [f"{t}={zoo.tasks[t]}" for t in TASKS]
    assert main(["ingest", str(store), *items, "--method", "cluster-merge", "--components", "2", "-q"]) == 0
    capsys.readouterr()
    assert main(["ls", str(store), "--json"]) == 0
    assert "cluster-merge" in capsys.readouterr().out
    # a later tvbase ingest next to the seed tasks is stored as per-task SVD, and compact refits all
    assert main(["ingest", str(store), f"c_new={zoo.tasks['c_new']}", "-q"]) == 0
    assert main(["compact", str(store), "-q"]) == 0
    kinds = {t["kind"] for t in Store.open(store).ls()}
    assert kinds == {"shared"}
