"""The store: create/open, ingest, get, compose, history, rm/compact, validation, the writer lock.

Every error case checks with ``snapshot_state`` that the failed call left the Icechunk
repository byte for byte as it was.
"""

import os
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvbase.arithmetic import parse_expression
from tvbase.cli import main
from tvbase.errors import (
    AlreadyExistsError,
    BaseMismatchError,
    InvalidInputError,
    NotFoundError,
    StoreLockedError,
    TvbaseWarning,
)
from tvbase.io.checkpoint import Checkpoint
from tvbase.methods import FitParams
from tvbase.names import validate_task_name
from tvbase.repository import WriterLock
from tvbase.store import Store
from tvbase.testing.metrics import relative_error

# Loose "it rebuilt the right thing" bound for stores with the default (int4) factors: a wrong or
# missing tensor gives ~1; tight bounds live in test_factorize.py (fp32 / pinned bits).
SANITY_ERROR = 0.25


# -- create / open -------------------------------------------------------------------------------
def test_create_and_open(tmp_path, zoo):
    path = tmp_path / "s"
    store = Store.create(path, zoo.base, params=FitParams(budget=0.5))
    assert store.tasks == []
    assert (path / "repo").is_dir()
    reopened = Store.open(path)
    assert reopened.version == store.version
    assert reopened.shapes == {name: tuple(t.shape) for name, t in zoo.base_tensors.items()}
    assert reopened.meta["params"]["budget"] == 0.5
    info = reopened.info()
    assert info["tasks"] == 0 and info["factor_bytes"] == 0 and info["reclaimable_bytes"] == 0
    assert info["base"]["tensors"] == len(zoo.base_tensors)


def test_create_refuses_existing_store(fresh_store, zoo, snapshot_state):
    before = snapshot_state(fresh_store.path)
    with pytest.raises(AlreadyExistsError, match="already exists"):
        Store.create(fresh_store.path, zoo.base)
    assert snapshot_state(fresh_store.path) == before


def test_create_into_empty_directory(tmp_path, zoo):
    (tmp_path / "empty").mkdir()
    assert Store.create(tmp_path / "empty", zoo.base).tasks == []


def test_open_missing_store(tmp_path):
    with pytest.raises(NotFoundError, match="no tvbase store") as info:
        Store.open(tmp_path / "nowhere")
    assert isinstance(info.value, KeyError)  # not-found errors are also KeyErrors
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotFoundError):
        Store.open(tmp_path / "file")


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        (FitParams(rank=0), "rank must be a positive integer"),
        (FitParams(budget=1.5), "budget must be a fraction"),
        (FitParams(bits=3), "bits must be one of"),
        (FitParams(task_weight=float("nan")), "task_weight must be a number in"),
        (FitParams(tensor_weight="0.5"), "tensor_weight must be a number in"),
        (FitParams(task_weight=9), "task_weight must be a number in"),
        (FitParams(sketch_dim=0), "sketch_dim must be a positive integer"),
    ],
)
def test_create_validates_params(tmp_path, zoo, params, phrase):
    with pytest.raises(InvalidInputError, match=phrase):
        Store.create(tmp_path / "s", zoo.base, params=params)
    assert not (tmp_path / "s" / "repo").exists()


# -- get -----------------------------------------------------------------------------------------
def test_get_matches_base_shapes_and_dtype(populated, zoo):
    store = Store.open(populated["path"])
    assert store.tasks == sorted(zoo.first + zoo.later)
    for task in store.tasks:
        tv = store.get(task, device="cpu")
        assert list(tv) == list(store.meta["tensors"])
        assert set(tv) == set(zoo.base_tensors)
        for name, tensor in tv.items():
            assert tensor.shape == zoo.base_tensors[name].shape, (task, name)
            assert tensor.dtype == torch.float32
            assert torch.isfinite(tensor).all()
        # the untouched integer buffer has a zero task vector
        assert float(tv["position_ids"].abs().max()) <= 1e-6
        assert relative_error(tv, zoo.task_vectors[task]) < SANITY_ERROR


def test_sharded_finetune_equals_single_file_fit(populated, zoo):
    """The sharded directory fine-tune was read completely (all shards, via the index)."""
    store = Store.open(populated["path"])
    tv = store.get("a_sharded", device="cpu")
    assert relative_error(tv, zoo.task_vectors["a_sharded"]) < SANITY_ERROR


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_get_dtype(populated, dtype, rel_error):
    store = Store.open(populated["path"])
    full = store.get("a0", device="cpu")
    low = store.get("a0", device="cpu", dtype=dtype)
    eps = torch.finfo(dtype).eps
    for name in full:
        assert low[name].dtype == dtype
        assert rel_error(low[name].float(), full[name]) <= 2 * eps, name


def test_get_unknown_task(populated):
    store = Store.open(populated["path"])
    with pytest.raises(NotFoundError, match="did you mean 'a_sharded'"):
        store.get("a_shardd")


# -- composition ---------------------------------------------------------------------------------
def test_composition_equals_dense_sum(populated, rel_error):
    store = Store.open(populated["path"])
    rows = {r["name"]: r for r in store.ls()}
    # preconditions that make this test meaningful: two clusters, and a later task that joined one
    assert rows["a0"]["cluster"] == rows["a1"]["cluster"] == rows["a_sharded"]["cluster"]
    assert rows["b0"]["cluster"] == rows["b1"]["cluster"] != rows["a0"]["cluster"]
    assert rows["c_new"]["kind"] == "projected" and rows["c_new"]["cluster"] == rows["b0"]["cluster"]
    expression = "0.7*a0 + 0.5*a1 - 1.2*b0 + 0.3*b1 + 0.9*c_new - 0.4*a_sharded"
    coefficients = parse_expression(expression, known=store.tasks)
    composed = store.compose(coefficients, device="cpu")
    singles = {t: store.get(t, device="cpu") for t in coefficients}
    for name, tensor in composed.items():
        dense = sum(alpha * singles[t][name].double() for t, alpha in coefficients.items())
        assert tensor.shape == dense.shape
        assert rel_error(tensor, dense) <= 1e-5, name


def test_composition_that_cancels_is_zero(populated):
    store = Store.open(populated["path"])
    composed = store.compose(parse_expression("a0 - a0 + 2*c_new - c_new*2"), device="cpu")
    scale = max(float(t.abs().max()) for t in store.get("a0", device="cpu").values())
    for name, tensor in composed.items():
        assert float(tensor.abs().max()) <= 1e-6 * scale, name


def test_compose_unknown_task(populated):
    store = Store.open(populated["path"])
    with pytest.raises(NotFoundError):
        store.compose({"a0": 1.0, "nope": 0.5})


# -- history -------------------------------------------------------------------------------------
def test_log_lists_init_and_every_write_newest_first(populated, zoo):
    store = Store.open(populated["path"])
    log = store.log()
    versions = populated["versions"]
    assert [e["id"] for e in log[:3]] == [versions["later"], versions["first"], versions["init"]]
    assert log[0]["message"] == "ingest c_new"
    assert log[1]["message"] == "ingest " + ", ".join(zoo.first)
    assert log[2]["message"].startswith("init store for base base.safetensors")
    assert [e["metadata"]["op"] for e in log[:3]] == ["ingest", "ingest", "init"]
    assert log[0]["metadata"]["tasks"] == zoo.later
    assert all(e["time"] for e in log)
    assert log[0]["time"] >= log[1]["time"] >= log[2]["time"]


def test_every_logged_version_opens(populated):
    store = Store.open(populated["path"])
    for entry in store.log():
        Store.open(populated["path"], at=entry["id"])  # must not raise
    assert store.log()[-1]["metadata"]["op"] == "init"


def test_open_at_old_version_sees_old_tasks(populated, zoo):
    path, versions = populated["path"], populated["versions"]
    head = Store.open(path)
    assert Store.open(path, at=versions["init"]).tasks == []
    first = Store.open(path, at=versions["first"])
    assert first.version == versions["first"]
    assert first.tasks == sorted(zoo.first)
    with pytest.raises(NotFoundError):
        first.get("c_new")
    # snapshots are immutable: an old version rebuilds a task exactly as the head does
    old, new = first.get("a0", device="cpu"), head.get("a0", device="cpu")
    assert all(torch.equal(old[n], new[n]) for n in old)


def test_open_at_unique_prefix(populated):
    path, versions = populated["path"], populated["versions"]
    ids = [e["id"] for e in Store.open(path).log()]
    target = versions["first"]
    n = next(k for k in range(1, len(target) + 1) if sum(i.startswith(target[:k]) for i in ids) == 1)
    prefix = target[: max(n, 6)]
    assert Store.open(path, at=prefix).version == target
    assert Store.open(path, at=prefix.lower()).version == target
    with pytest.raises(NotFoundError, match="no version"):
        Store.open(path, at="Z" * 20)
    with pytest.raises(NotFoundError):
        Store.open(path, at="")


# -- rm and compact ------------------------------------------------------------------------------
def test_rm_and_compact(tmp_path, zoo):
    params = FitParams(budget=0.9, bits=32, dense_bits=32, n_clusters=2)
    store = Store.create(tmp_path / "s", zoo.base, params=params)
    store.ingest({t: zoo.tasks[t] for t in zoo.first}, device="cpu", progress=False)
    store.ingest({t: zoo.tasks[t] for t in zoo.later}, device="cpu", progress=False)
    before_rm = store.version
    assert store.info()["reclaimable_bytes"] == 0
    pre = {t: store.get(t, device="cpu") for t in store.tasks}

    version = store.rm(["b1"])
    assert version == store.version != before_rm
    assert Store.open(store.path).version == version
    assert "b1" not in store.tasks and len(store.tasks) == 6
    log = store.log()
    assert log[0]["id"] == version and log[0]["message"] == "rm b1"
    assert log[0]["metadata"]["op"] == "rm" and log[0]["metadata"]["tasks"] == ["b1"]
    info = store.info()
    assert info["reclaimable_bytes"] > 0
    assert info["payload_bytes"] == info["factor_bytes"] + info["reclaimable_bytes"]
    with pytest.raises(NotFoundError):
        store.get("b1")
    # the other tasks are untouched by rm
    a0 = store.get("a0", device="cpu")
    assert all(torch.equal(a0[n], pre["a0"][n]) for n in a0)

    compacted = store.compact(device="cpu", progress=False)
    assert compacted == store.version != version
    assert store.log()[0]["message"] == "compact"
    info = store.info()
    assert info["reclaimable_bytes"] == 0
    assert info["payload_bytes"] == info["factor_bytes"]
    assert info["factor_storage"] <= 0.9 + 0.005
    assert store.tasks == sorted(t for t in zoo.first + zoo.later if t != "b1")
    assert {r["kind"] for r in store.ls()} == {"shared"}  # the SVD task joined a cluster
    for task in store.tasks:
        assert relative_error(store.get(task, device="cpu"), pre[task]) < 0.02, task
    # the version before rm still holds b1 and rebuilds everything exactly as before
    old = Store.open(store.path, at=before_rm)
    for task in ("b1", "a0", "c_new"):
        tv = old.get(task, device="cpu")
        assert all(torch.equal(tv[n], pre[task][n]) for n in tv), task


@pytest.mark.parametrize("originals", ["kept", "deleted"])
def test_compact_does_not_understate_error(originals, tmp_path, zoo):
    """After compact, ls()'s rel_error still bounds the error against the original fine-tune.

    With the originals on disk compact refits from them; without, it refits the stored rebuilds
    and must not report the (smaller) error against those rebuilds.
    """
    sources = tmp_path / "ckpts"
    items = {}
    for task in zoo.first + zoo.later:
        src, dest = zoo.tasks[task], sources / zoo.tasks[task].name
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            dest.parent.mkdir(exist_ok=True)
            shutil.copy(src, dest)
        items[task] = dest
    # 40%: the budget counts the store on disk, and bookkeeping is ~15% of raw on this tiny zoo
    store = Store.create(tmp_path / "s", zoo.base, params=FitParams(budget=0.4, n_clusters=2))
    store.ingest({t: items[t] for t in zoo.first}, device="cpu", progress=False)
    store.ingest({t: items[t] for t in zoo.later}, device="cpu", progress=False)
    if originals == "deleted":
        shutil.rmtree(sources)
    store.compact(device="cpu", progress=False)
    for r in store.ls():
        actual = relative_error(store.get(r["name"], device="cpu"), zoo.task_vectors[r["name"]])
        assert r["rel_error"] >= 0.9 * actual, (r["name"], r["rel_error"], actual)
        assert r["rel_error"] < SANITY_ERROR


def test_rm_every_task_then_ingest_again(populated_copy, zoo):
    store = Store.open(populated_copy)
    store.rm(store.tasks)
    info = store.info()
    assert store.tasks == [] and info["clusters"] == 0 and info["factor_bytes"] == 0
    store.ingest({t: zoo.tasks[t] for t in ("a0", "a1", "b0")}, device="cpu", progress=False)
    assert {r["kind"] for r in store.ls()} == {"shared"}  # an empty store gets a shared fit again
    assert relative_error(store.get("a1", device="cpu"), zoo.task_vectors["a1"]) < SANITY_ERROR


def test_rm_unknown_task(populated_copy, snapshot_state):
    before = snapshot_state(populated_copy)
    store = Store.open(populated_copy)
    with pytest.raises(NotFoundError, match="did you mean 'a0'"):
        store.rm(["a00"])
    with pytest.raises(NotFoundError, match="nope"):
        store.rm(["a0", "nope"])  # nothing is removed when one name is unknown
    assert snapshot_state(populated_copy) == before
    assert "a0" in Store.open(populated_copy).tasks


def test_rm_through_stale_handle(populated_copy, snapshot_state):
    stale, current = Store.open(populated_copy), Store.open(populated_copy)
    current.rm(["b1"])
    before = snapshot_state(populated_copy)
    with pytest.raises(NotFoundError):
        stale.rm(["b1"])
    assert snapshot_state(populated_copy) == before


# -- errors leave the store exactly as it was ----------------------------------------------------
def test_snapshot_state_sees_reads_as_no_change_and_commits_as_change(populated_copy, zoo, snapshot_state):
    """The helper the error tests rely on: reading changes nothing, a commit changes both parts."""
    before = snapshot_state(populated_copy)
    store = Store.open(populated_copy)
    store.get("a0", device="cpu")
    store.ls(), store.info(), store.log()
    assert snapshot_state(populated_copy) == before
    store.rm(["a0"])
    after = snapshot_state(populated_copy)
    assert after[0] != before[0] and after[1] != before[1]


def _variant(zoo, directory, kind):
    """A broken fine-tune of the fp32 zoo; returns its path."""
    tensors = zoo.tensors("c_new")
    path = directory / f"{kind}.safetensors"
    if kind == "missing_tensor":
        del tensors["head.weight"]
    elif kind == "extra_tensor":
        tensors["extra.weight"] = torch.zeros(3, 3)
    elif kind == "wrong_shape":
        tensors["l1.weight"] = torch.zeros(32, 17)
    elif kind == "wrong_dtype":  # a float precision may differ, float against integer may not
        tensors["l1.weight"] = tensors["l1.weight"].to(torch.int32)
    elif kind == "changed_buffer":
        tensors["position_ids"] = tensors["position_ids"].flip(0)
    elif kind == "nan":
        tensors["l1.weight"][3, 4] = float("nan")
    elif kind == "inf":
        tensors["conv.weight"][1, 2, 0, 0] = float("-inf")
    elif kind in ("pickle_bin", "pickle_pt"):
        path = directory / ("model.bin" if kind == "pickle_bin" else "model.pt")
        torch.save(tensors, path)
        return path
    elif kind == "missing_file":
        return directory / "does-not-exist.safetensors"
    save_file(tensors, path)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
    return path


BAD_CHECKPOINTS = {
    "missing_tensor": (BaseMismatchError, "missing tensor"),
    "extra_tensor": (BaseMismatchError, "extra tensor"),
    "wrong_shape": (BaseMismatchError, "shape mismatch"),
    "wrong_dtype": (BaseMismatchError, "dtype mismatch"),
    "changed_buffer": (BaseMismatchError, "1 non-float tensor: 'position_ids' \\(I64\\) differs"),
    "nan": (InvalidInputError, "NaN/Inf"),
    "inf": (InvalidInputError, "NaN/Inf"),
    "truncated": (InvalidInputError, "truncated"),
    "pickle_bin": (InvalidInputError, "pickle"),
    "pickle_pt": (InvalidInputError, "pickle"),
    "missing_file": (NotFoundError, "does not exist"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_leaves_store_unchanged(kind, populated_copy, zoo, tmp_path, snapshot_state):
    error, message = BAD_CHECKPOINTS[kind]
    bad = _variant(zoo, tmp_path, kind)
    before = snapshot_state(populated_copy)
    store = Store.open(populated_copy)
    # a good checkpoint next to the bad one: nothing at all may be committed
    with pytest.raises(error, match=message) as info:
        store.ingest({"good": zoo.tasks["a2"], "bad": bad}, device="cpu", progress=False)
    if error is not NotFoundError:
        assert "'bad'" in str(info.value) or str(bad) in str(info.value)  # names the culprit
    assert snapshot_state(populated_copy) == before
    assert "good" not in Store.open(populated_copy).tasks


@pytest.mark.parametrize("kind", ["nan", "wrong_shape"])
def test_bad_checkpoint_in_first_ingest(kind, fresh_store, zoo, tmp_path, snapshot_state):
    """The shared-fit path (empty store) refuses bad input before committing too."""
    error, message = BAD_CHECKPOINTS[kind]
    bad = _variant(zoo, tmp_path, kind)
    before = snapshot_state(fresh_store.path)
    with pytest.raises(error, match=message):
        fresh_store.ingest({"a0": zoo.tasks["a0"], "a1": zoo.tasks["a1"], "bad": bad}, device="cpu", progress=False)
    assert snapshot_state(fresh_store.path) == before
    assert Store.open(fresh_store.path).tasks == []


def test_duplicate_task_name_in_store(populated_copy, zoo, snapshot_state):
    before = snapshot_state(populated_copy)
    with pytest.raises(AlreadyExistsError, match="'a0' already exists"):
        Store.open(populated_copy).ingest({"z": zoo.tasks["c_new"], "a0": zoo.tasks["c_new"]}, progress=False)
    assert snapshot_state(populated_copy) == before


def test_duplicate_task_name_in_one_command(populated_copy, zoo, snapshot_state, capsys):
    before = snapshot_state(populated_copy)
    path = str(zoo.tasks["c_new"])
    code = main(["ingest", str(populated_copy), f"x={path}", f"x={zoo.tasks['a0']}", "-q", "--device", "cpu"])
    assert code == 5  # AlreadyExistsError
    assert capsys.readouterr().err.startswith("tvbase: error: task name 'x' is given twice")
    assert snapshot_state(populated_copy) == before


def test_same_content_under_a_new_name_warns_and_is_ingested(populated_copy, zoo):
    store = Store.open(populated_copy)
    with pytest.warns(TvbaseWarning) as caught:
        store.ingest({"again": zoo.tasks["a0"], "fresh": zoo.tasks["c_new"], "twice": zoo.tasks["c_new"]},
                     device="cpu", progress=False)  # fmt: skip
    ours = [w for w in caught if w.category is TvbaseWarning]
    messages = sorted(str(w.message) for w in ours)
    assert len(messages) == 3  # c_new is stored too; the second copy in this ingest is named after the first
    assert messages[0].startswith("task 'again' has the same content as stored task 'a0' (content hash ")
    assert messages[1].startswith("task 'fresh' has the same content as stored task 'c_new'")
    assert messages[2].startswith("task 'twice' has the same content as stored task 'c_new'")
    assert {"again", "fresh", "twice"} <= set(Store.open(populated_copy).tasks)
    assert {w.filename for w in ours} == {__file__}  # the warnings point at the caller of Store.ingest


def test_a_refused_ingest_does_not_warn_of_same_content(populated_copy, zoo, snapshot_state, recwarn):
    before = snapshot_state(populated_copy)
    with pytest.raises(AlreadyExistsError):
        Store.open(populated_copy).ingest({"again": zoo.tasks["a0"], "a0": zoo.tasks["a0"]}, progress=False)
    with WriterLock(populated_copy / "writer.lock"), pytest.raises(StoreLockedError):
        Store.open(populated_copy).ingest({"again": zoo.tasks["a0"]}, device="cpu", progress=False)
    assert not [w for w in recwarn if w.category is TvbaseWarning]
    assert snapshot_state(populated_copy) == before


def test_same_content_within_one_ingest_warns_through_the_cli(fresh_store, zoo, capsys):
    code = main(["ingest", str(fresh_store.path), f"x={zoo.tasks['a0']}", f"y={zoo.tasks['a0']}",
                 f"z={zoo.tasks['b0']}", "-q", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    with Checkpoint.open(zoo.tasks["a0"]) as checkpoint:
        digest = checkpoint.fingerprint()["hash"][:12]
    assert err.splitlines() == [  # one line, no file name or source line as Python's default shows
        f"tvbase: warning: task 'y' has the same content as task 'x' of this ingest (content hash {digest}...); "
        "it was ingested all the same, under its own name: `tvbase rm STORE y` removes it if that was a mistake"
    ]
    assert Store.open(fresh_store.path).tasks == ["x", "y", "z"]


BAD_NAMES = ["../x", "a/b", "", "..", ".hidden", "-x", "a\nb", "n" * 200, "a b", "x;rm"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_bad_task_names(name, populated_copy, zoo, snapshot_state):
    before = snapshot_state(populated_copy)
    with pytest.raises(InvalidInputError, match="task name"):
        Store.open(populated_copy).ingest({name: zoo.tasks["c_new"]}, progress=False)
    assert snapshot_state(populated_copy) == before


@pytest.mark.parametrize("name", ["a", "A_1", "llama-3.1-chat", "_x", "v2.0_b-c"])
def test_good_task_names(name):
    assert validate_task_name(name) == name
    assert parse_expression(f"0.5*{name}", known=[name]) == {name: 0.5}


@pytest.mark.parametrize("name", ["7b", "abc-", "abc."])
def test_every_valid_task_name_can_be_used_in_an_expression(name):
    try:
        validate_task_name(name)
    except InvalidInputError:
        return  # refused at ingest: consistent
    assert parse_expression(name, known=[name]) == {name: 1.0}


@pytest.mark.parametrize("budget", ["0%", "150%", "abc", "100%", "-3%", "nan"])
def test_budget_out_of_range_via_cli(budget, populated_copy, zoo, snapshot_state, capsys):
    before = snapshot_state(populated_copy)
    code = main(["ingest", str(populated_copy), f"x={zoo.tasks['c_new']}", f"--budget={budget}", "-q"])
    assert code == 4
    err = capsys.readouterr().err
    assert err.startswith("tvbase: error: budget") and repr(budget) in err
    assert snapshot_state(populated_copy) == before


def test_budget_too_small_for_dense_tensors(populated_copy, zoo, snapshot_state):
    before = snapshot_state(populated_copy)
    with pytest.raises(InvalidInputError, match="too small"):
        Store.open(populated_copy).ingest({"x": zoo.tasks["c_new"]}, params=FitParams(budget=0.01), progress=False)
    assert snapshot_state(populated_copy) == before


def test_unknown_device(populated_copy, zoo, snapshot_state):
    before = snapshot_state(populated_copy)
    with pytest.raises(InvalidInputError, match="unknown device 'tpu0'"):
        Store.open(populated_copy).ingest({"x": zoo.tasks["c_new"]}, device="tpu0", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA"):
            Store.open(populated_copy).ingest({"x": zoo.tasks["c_new"]}, device="cuda", progress=False)
    assert snapshot_state(populated_copy) == before


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_unavailable_device_is_refused(device, populated_copy, zoo, snapshot_state):
    before = snapshot_state(populated_copy)
    with pytest.raises(InvalidInputError):
        Store.open(populated_copy).ingest({"x": zoo.tasks["c_new"]}, device=device, progress=False)
    assert snapshot_state(populated_copy) == before


def test_empty_ingest(populated_copy, snapshot_state):
    before = snapshot_state(populated_copy)
    with pytest.raises(InvalidInputError, match="nothing to ingest"):
        Store.open(populated_copy).ingest({})
    assert snapshot_state(populated_copy) == before


def test_moved_base(tmp_path, zoo):
    """A base that is no longer where init found it: NotFoundError naming --base; then --base works."""
    base = tmp_path / "base.safetensors"
    base.write_bytes(zoo.base.read_bytes())
    # 90%: one tiny task, and the budget also pays for the store's own files
    store = Store.create(tmp_path / "s", base, params=FitParams(budget=0.9))
    moved = tmp_path / "moved.safetensors"
    base.rename(moved)
    with pytest.raises(NotFoundError, match="--base"):
        store.ingest({"a0": zoo.tasks["a0"]}, device="cpu", progress=False)
    with pytest.raises(InvalidInputError, match="content hash differs"):
        store.ingest({"a0": zoo.tasks["a0"]}, base=zoo.tasks["a1"], device="cpu", progress=False)
    store.ingest({"a0": zoo.tasks["a0"]}, base=moved, device="cpu", progress=False)
    assert store.tasks == ["a0"]


# -- the writer lock -----------------------------------------------------------------------------
def test_writer_lock(populated_copy, zoo, snapshot_state):
    before = snapshot_state(populated_copy)
    store = Store.open(populated_copy)
    item = {"x": zoo.tasks["c_new"]}
    with WriterLock(populated_copy / "writer.lock"):
        with pytest.raises(StoreLockedError) as info:
            store.ingest(item, device="cpu", progress=False)
        assert re.search(rf"\b{os.getpid()}\b", str(info.value)), "the message names the holder's pid"
        assert "--wait" in str(info.value)
        start = time.monotonic()
        with pytest.raises(StoreLockedError):
            store.ingest(item, device="cpu", progress=False, wait=0.5)
        elapsed = time.monotonic() - start
        assert 0.5 <= elapsed < 5.0
        with pytest.raises(StoreLockedError):
            store.rm(["a0"])
        with pytest.raises(StoreLockedError):
            store.compact(device="cpu", progress=False)
        assert snapshot_state(populated_copy) == before
    # released: the same handle now succeeds, and the lock file no longer names a holder
    store.ingest(item, device="cpu", progress=False)
    assert "x" in Store.open(populated_copy).tasks
    lock_file = populated_copy / "writer.lock"
    assert not lock_file.exists() or lock_file.read_text() == ""


def test_writer_lock_wait_succeeds_when_released(populated_copy, zoo):
    """A writer with --wait gets the lock once the holder lets go."""
    import threading

    lock = WriterLock(populated_copy / "writer.lock")
    lock.__enter__()
    timer = threading.Timer(0.3, lock.__exit__, args=(None, None, None))
    timer.start()
    try:
        Store.open(populated_copy).rm(["b1"], wait=5.0)
    finally:
        timer.join()
    assert "b1" not in Store.open(populated_copy).tasks


# -- bf16 ----------------------------------------------------------------------------------------
def test_bf16_store(tmp_path, zoo):
    store = Store.create(tmp_path / "s", zoo.bf16_base, params=FitParams(budget=0.5))
    assert store.meta["base"]["tensors"]["l1.weight"]["dtype"] == "BF16"
    store.ingest(zoo.bf16_tasks, device="cpu", progress=False)
    for task in zoo.bf16_tasks:
        tv = store.get(task, device="cpu")
        assert all(t.dtype == torch.float32 for t in tv.values())
        assert relative_error(tv, zoo.bf16_task_vectors[task]) < 0.2
    # an fp32 fine-tune of the bf16 base: its task vector is computed in fp32
    store.ingest({"fp32": zoo.tasks["a0"]}, device="cpu", progress=False)
    tuned = load_file(zoo.tasks["a0"])
    base = load_file(zoo.bf16_base)
    expected = {name: tuned[name].float() - base[name].float() for name in base}
    assert relative_error(store.get("fp32", device="cpu"), expected) < 0.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ingest_and_rebuild_on_cuda_keep_what_the_cpu_does(tmp_path, zoo):
    """The fit and the rebuild on CUDA: every task's error as on the CPU (within the randomized
    fit's rounding, not bit for bit), and a CUDA rebuild of the CUDA store equal to its CPU one."""
    tasks = dict(list(zoo.tasks.items())[:4])
    stores = {}
    for device in ("cpu", "cuda"):
        stores[device] = Store.create(tmp_path / device, zoo.base, params=FitParams(budget=0.5, n_clusters=2))
        stores[device].ingest(tasks, device=device, progress=False)
    recorded = {r["name"]: r["rel_error"] for r in stores["cuda"].ls()}
    for t in tasks:
        on_cuda = stores["cuda"].get(t, device="cuda")
        assert all(v.device.type == "cuda" for v in on_cuda.values())
        on_cuda = {k: v.cpu() for k, v in on_cuda.items()}
        # bfloat16 products round by at most sqrt(2 * BF16_ERROR_SHARE) < 0.05 of the recorded error
        assert relative_error(on_cuda, stores["cuda"].get(t, device="cpu")) <= 1e-4 + 0.05 * recorded[t]
        errors = [relative_error(stores[d].get(t, device="cpu"), zoo.task_vectors[t]) for d in ("cpu", "cuda")]
        assert errors[1] == pytest.approx(errors[0], rel=0.05)
