"""Ingest on a Dask cluster (``--dask``): the same store as a serial ingest, workers that die
mid-ingest, and clusters that cannot be used."""

import contextlib
import os
import signal

import pytest
import torch

from tvbase import FitParams, Store
from tvbase.cli import main
from tvbase.errors import ClusterError, InvalidInputError
from tvbase.testing.metrics import relative_error
from tvbase.testing.zoo import build_synthetic_zoo

distributed = pytest.importorskip("distributed")

# a 1000-row vocabulary matrix (rows kept whole), square and wide layers, dense tensors
SHAPES = {"embed.weight": (1000, 48), "l0.weight": (96, 48), "l0.bias": (96,), "l1.weight": (48, 96),
          "l2.weight": (64, 64), "norm.weight": (48,)}
TASKS = {f"t{i}": i % 2 for i in range(5)}


@pytest.fixture(scope="module")
def dask_zoo(tmp_path_factory):
    return build_synthetic_zoo(tmp_path_factory.mktemp("dask-zoo"), SHAPES, TASKS, seed=11, noise_scale=0.001)


@contextlib.contextmanager
def one_torch_thread():
    """Serial and cluster fits give equal stores at equal torch thread counts (the driver combines,
    the workers compute; each local:2 worker has one thread on two cores): the rounding of
    another count can move a rank at a tie."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def serial(dask_zoo, tmp_path_factory):
    """The store a serial ingest makes."""
    store = Store.create(tmp_path_factory.mktemp("serial") / "store", dask_zoo.base, params=FitParams(budget=0.2))
    with one_torch_thread():
        store.ingest(dask_zoo.tasks, device="cpu", progress=False)
    return store


def local_cluster():
    """Two worker processes with one torch thread each, as the serial store was made."""
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                    silence_logs=40, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        yield c


def _threads_per_worker():
    return max(1, (os.cpu_count() or 1) // 2)


def assert_same_store(store, serial, dask_zoo):
    """Same tasks, kinds and clusters as the serial store, and every rebuild within 1e-5."""
    got, want = {r["name"]: r for r in store.ls()}, {r["name"]: r for r in serial.ls()}
    assert got.keys() == want.keys() == set(TASKS)
    assert {t: (r["cluster"], r["kind"]) for t, r in got.items()} == {t: (r["cluster"], r["kind"]) for t, r in want.items()}
    for task in TASKS:
        rebuilt = store.get(task, device="cpu")
        assert relative_error(rebuilt, serial.get(task, device="cpu")) < 1e-5, task
        # and it is a fit of the task, not a copy of the serial store
        assert relative_error(rebuilt, dask_zoo.task_vectors[task]) == pytest.approx(got[task]["rel_error"], rel=1e-3)


@pytest.mark.skipif(_threads_per_worker() != 1, reason="local:2 workers get one torch thread only on a 2-core machine")
def test_local_cluster_ingest_gives_the_serial_store(dask_zoo, serial, tmp_path):
    store = Store.create(tmp_path / "store", dask_zoo.base, params=FitParams(budget=0.2))
    with one_torch_thread():
        store.ingest(dask_zoo.tasks, device="cpu", progress=False, dask="local:2")
    assert_same_store(store, serial, dask_zoo)


def test_existing_cluster_ingest_gives_the_serial_store_and_the_cli_takes_its_address(dask_zoo, serial, cluster, tmp_path):
    store = Store.create(tmp_path / "store", dask_zoo.base, params=FitParams(budget=0.2))
    listing = tmp_path / "tasks.txt"
    listing.write_text("".join(f"{t}={p}\n" for t, p in dask_zoo.tasks.items()))
    with one_torch_thread():
        code = main(["ingest", "-q", str(store.path), "--list", str(listing), "--device", "cpu", "--dask", cluster.scheduler_address])
    assert code == 0
    assert_same_store(Store.open(store.path), serial, dask_zoo)


def test_a_task_joining_the_stored_clusters_on_a_cluster_gives_the_serial_store(dask_zoo, cluster, tmp_path):
    """A later ingest on the workers: the stored bases travel with the items, the cores come back."""
    first, later = [t for t in TASKS if t != "t4"], "t4"
    stores = {}
    for where in ("serial", cluster.scheduler_address):
        store = stores[where] = Store.create(tmp_path / str(len(stores)), dask_zoo.base, params=FitParams(budget=0.2))
        with one_torch_thread():
            store.ingest({t: dask_zoo.tasks[t] for t in first}, device="cpu", progress=False)
            store.ingest({later: dask_zoo.tasks[later]}, device="cpu", progress=False,
                         dask=None if where == "serial" else where)
    got, want = ({r["name"]: r for r in s.ls()}[later] for s in (stores[cluster.scheduler_address], stores["serial"]))
    assert got["kind"] == want["kind"] == "projected" and got["cluster"] == want["cluster"]
    rebuilt = stores[cluster.scheduler_address].get(later, device="cpu")
    assert relative_error(rebuilt, stores["serial"].get(later, device="cpu")) < 1e-5
    assert relative_error(rebuilt, dask_zoo.task_vectors[later]) == pytest.approx(got["rel_error"], rel=1e-3)


def _kill_a_worker_mid_ingest(client, marker, after=10):
    """Install a worker plugin that SIGKILLs the worker process it runs in when the worker starts
    executing its ``after + 1``-th item of the fit: the item is then surely running there. Once:
    the worker writes ``marker`` first, and a restarted worker finds it."""

    class KillOnce(distributed.WorkerPlugin):  # local, so that it is pickled by value for the workers
        def setup(self, worker):
            self.started = 0

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and "_run_item" in str(key):
                self.started += 1
                if self.started > after and not os.path.exists(marker):
                    open(marker, "w").close()  # noqa: SIM115 (created, never written)
                    os.kill(os.getpid(), signal.SIGKILL)

    client.register_plugin(KillOnce(), name="kill-once")


def test_a_worker_killed_mid_ingest_has_its_work_retried(dask_zoo, serial, tmp_path):
    marker = tmp_path / "killed"
    with local_cluster() as cluster, distributed.Client(cluster) as client:
        _kill_a_worker_mid_ingest(client, str(marker))
        store = Store.create(tmp_path / "store", dask_zoo.base, params=FitParams(budget=0.2))
        with one_torch_thread():
            store.ingest(dask_zoo.tasks, device="cpu", progress=False, dask=cluster.scheduler_address)
    assert marker.exists(), "no worker was killed"
    assert_same_store(Store.open(store.path), serial, dask_zoo)


def test_work_lost_more_often_than_retried_fails_cleanly(dask_zoo, tmp_path, snapshot_state):
    import dask

    marker = tmp_path / "killed"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), local_cluster() as cluster, \
            distributed.Client(cluster) as client:
        _kill_a_worker_mid_ingest(client, str(marker))
        store = Store.create(tmp_path / "store", dask_zoo.base, params=FitParams(budget=0.2))
        before = snapshot_state(store.path)
        with pytest.raises(ClusterError, match="nothing was written"):
            store.ingest(dask_zoo.tasks, device="cpu", progress=False, dask=cluster.scheduler_address)
    assert marker.exists()
    assert snapshot_state(store.path) == before


@pytest.mark.parametrize(("address", "error", "message"), [
    ("local:0", InvalidInputError, "positive number of workers"),
    ("somewhere", InvalidInputError, "scheduler address such as"),
    ("tcp://127.0.0.1:9", ClusterError, "cannot reach the Dask scheduler"),
])
def test_an_unusable_cluster_is_refused_and_the_store_unchanged(dask_zoo, tmp_path, snapshot_state, address, error, message):
    store = Store.create(tmp_path / "store", dask_zoo.base, params=FitParams(budget=0.2))
    before = snapshot_state(store.path)
    with pytest.raises(error, match=message):
        store.ingest(dask_zoo.tasks, device="cpu", progress=False, dask=address)
    assert snapshot_state(store.path) == before


def test_dask_with_a_method_that_fits_in_process_only_is_refused(dask_zoo, tmp_path):
    store = Store.create(tmp_path / "store", dask_zoo.base, params=FitParams(budget=0.2))
    with pytest.raises(InvalidInputError, match="fits in this process only"):
        store.ingest(dask_zoo.tasks, device="cpu", progress=False, method="pca", dask="local:1")


def test_sparse_residuals_on_a_cluster_give_the_serial_store(dask_zoo, cluster, tmp_path, monkeypatch):
    """The workers sample the residual at the mask the driver hands them; the driver sets the values."""
    from tvbase.methods import tucker

    monkeypatch.setattr(tucker, "SPARSE_MIN_SIDE", 48)  # decided in the driver: this zoo's matrices are narrow
    params = FitParams(budget=0.2, sparse_share=0.5)
    serial = Store.create(tmp_path / "serial", dask_zoo.base, params=params)
    store = Store.create(tmp_path / "store", dask_zoo.base, params=params)
    with one_torch_thread():
        serial.ingest(dask_zoo.tasks, device="cpu", progress=False)
        store.ingest(dask_zoo.tasks, device="cpu", progress=False, dask=cluster.scheduler_address)
    assert all("sparse" in store.meta["tasks"][t] for t in TASKS)
    assert_same_store(store, serial, dask_zoo)
