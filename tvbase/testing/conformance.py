"""One storage conformance suite, run against every kind of store location.

In the manner of zarr-python's ``zarr.testing.store``: subclass :class:`StoreConformance` in a
test module and give it a ``location`` fixture that returns a new, unused store location of
the kind under test (a directory path, ``memory://NAME``, ...). The suite also needs a ``zoo``
fixture: an object with ``base`` (the base checkpoint's path), ``tasks`` (dict task name ->
fine-tune path, at least four tasks) and ``task_vectors`` (dict task name -> {tensor name:
float32 fine-tune minus base}), such as ``tvbase.testing.zoo``'s synthetic zoos.

Every test goes through the public ``Store`` API, so a location passes when the whole store
works on it: create, ingest, get, compose, rm, compact, verify, history, and a second writer
refused while the first one writes (by the location's lock, or at commit by Icechunk's
conflict detection).
"""

import pytest

from tvbase import FitParams, Store
from tvbase.errors import AlreadyExistsError, NotFoundError, StoreLockedError

from .metrics import relative_error

# Full-rank fp32 factors rebuild every task to float rounding; the budget keeps the test zoo's
# dense tensors within what a store may spend.
EXACT = FitParams(rank=64, bits=32, dense_bits=32, n_clusters=2)
EXACT_TOLERANCE = 1e-5  # relative Frobenius error of a float32 rebuild at full rank
COMPOSE_TOLERANCE = 1e-5  # coefficient-space composition against dense sums of rebuilds


class StoreConformance:
    """The suite. Subclasses define the ``location`` fixture."""

    @pytest.fixture
    def location(self):
        raise NotImplementedError("a conformance test module defines the location fixture")

    @pytest.fixture
    def store(self, location, zoo):
        """A store at ``location`` holding the zoo's first three tasks (one shared fit)."""
        store = Store.create(location, zoo.base, params=EXACT)
        store.ingest({t: zoo.tasks[t] for t in list(zoo.tasks)[:3]}, device="cpu", progress=False)
        return store

    def test_create_then_open(self, location, zoo):
        created = Store.create(location, zoo.base, params=EXACT)
        opened = Store.open(location)
        assert opened.version == created.version and opened.tasks == []
        assert opened.meta["params"]["rank"] == EXACT.rank
        with pytest.raises(AlreadyExistsError):
            Store.create(location, zoo.base)

    def test_open_missing_is_not_found(self, location):
        with pytest.raises(NotFoundError, match="no tvbase store"):
            Store.open(location)

    def test_ingest_then_get(self, store, zoo):
        assert store.tasks == sorted(list(zoo.tasks)[:3])
        reopened = Store.open(store.path)
        for task in reopened.tasks:
            assert relative_error(reopened.get(task, device="cpu"), zoo.task_vectors[task]) < EXACT_TOLERANCE

    def test_compose_equals_sum_of_gets(self, store):
        a, b, c = store.tasks
        coefficients = {a: 0.7, b: -0.5, c: 1.0}
        composed = store.compose(coefficients, device="cpu")
        dense = {name: sum(alpha * store.get(t, device="cpu")[name] for t, alpha in coefficients.items()) for name in composed}
        assert relative_error(composed, dense) < COMPOSE_TOLERANCE

    def test_rm_removes_one_task_and_keeps_the_others(self, store):
        removed, *kept = store.tasks
        before = {t: store.get(t, device="cpu") for t in kept}
        store.rm([removed])
        reopened = Store.open(store.path)
        assert reopened.tasks == kept
        for t in kept:
            assert relative_error(reopened.get(t, device="cpu"), before[t]) < EXACT_TOLERANCE
        with pytest.raises(NotFoundError):
            reopened.get(removed)

    def test_later_ingest_then_compact(self, store, zoo):
        later = list(zoo.tasks)[3]
        store.ingest({later: zoo.tasks[later]}, device="cpu", progress=False)
        row = {r["name"]: r for r in store.ls()}[later]
        assert row["kind"] == "projected" and str(row["cluster"]) in store.meta["clusters"]  # joined a stored cluster
        store.compact(device="cpu", progress=False)
        reopened = Store.open(store.path)
        assert {r["kind"] for r in reopened.ls()} == {"shared"}
        assert reopened.info()["reclaimable_bytes"] == 0
        for task in reopened.tasks:
            assert relative_error(reopened.get(task, device="cpu"), zoo.task_vectors[task]) < EXACT_TOLERANCE

    def test_verify_passes(self, store):
        report = Store.open(store.path).verify()
        assert report["ok"], report["problems"]
        assert report["checked"]["tasks"] == 3 and report["checked"]["index_rows"] > 0

    def test_history_reads_old_versions_and_gc_expires_them(self, store):
        first = store.version
        removed = store.tasks[0]
        store.rm([removed])
        log = Store.open(store.path).log()
        assert [entry["metadata"]["op"] for entry in log] == ["rm", "ingest", "init"]
        old = Store.open(store.path, at=first[:10])
        assert removed in old.tasks and removed not in Store.open(store.path).tasks
        assert Store.open(store.path).gc(keep=1) == 2
        assert [entry["metadata"]["op"] for entry in Store.open(store.path).log()] == ["rm"]

    def test_a_second_writer_is_refused_while_one_writes(self, store):
        """Of two overlapping writes exactly one lands; the other gets StoreLockedError."""
        victim = store.tasks[0]
        first, second = Store.open(store.path), Store.open(store.path)
        outcome = []
        try:
            with first._write("overlapping write", {"op": "test"}) as (_, meta):
                meta["note"] = "written by the first writer"
                try:
                    second.rm([victim])  # a lock refuses it here; without one it wins...
                    outcome.append("second committed")
                except StoreLockedError:
                    outcome.append("second refused")
            outcome.append("first committed")
        except StoreLockedError:  # ...and the first writer's commit conflicts
            outcome.append("first refused")
        assert outcome in (["second refused", "first committed"], ["second committed", "first refused"])
        head = Store.open(store.path)
        messages = [entry["message"] for entry in head.log()]
        assert ("overlapping write" in messages) == (outcome[-1] == "first committed")
        assert (f"rm {victim}" in messages) == (outcome[0] == "second committed")
        assert (victim in head.tasks) == (outcome[0] == "second refused")
        assert head.verify()["ok"]
