"""History: rm is a commit like any other, and `tvbase gc --keep N` expires old versions safely."""

import pytest
import torch

from tvbase.cli import main
from tvbase.errors import InvalidInputError, NotFoundError
from tvbase.store import Store


def _disk_bytes(path):
    return sum(f.stat().st_size for f in (path / "repo").rglob("*") if f.is_file())


def test_rm_is_a_logged_commit(populated_copy, capsys):
    before = Store.open(populated_copy).log()
    assert main(["rm", str(populated_copy), "a0"]) == 0
    after = Store.open(populated_copy).log()
    assert len(after) == len(before) + 1
    assert after[0]["message"] == "rm a0" and after[0]["metadata"]["op"] == "rm"
    capsys.readouterr()
    assert main(["log", str(populated_copy)]) == 0
    assert "rm a0" in capsys.readouterr().out
    # the version before rm still has the task
    assert "a0" in Store.open(populated_copy, at=before[0]["id"]).tasks


def test_gc_keeps_the_newest_versions_and_frees_space(populated_copy, capsys):
    store = Store.open(populated_copy)
    store.rm(["a0"])
    store.rm(["b1"])
    store.compact(progress=False)
    history = store.log()
    expected = {t: store.get(t, device="cpu") for t in store.tasks}
    disk_before = _disk_bytes(populated_copy)

    assert main(["gc", str(populated_copy), "--keep", "2"]) == 0
    assert "expired" in capsys.readouterr().out
    store = Store.open(populated_copy)
    kept = store.log()
    assert [v["id"] for v in kept] == [v["id"] for v in history[:2]]
    with pytest.raises(NotFoundError):
        Store.open(populated_copy, at=history[-1]["id"])
    for task, tensors in expected.items():
        for name, tensor in store.get(task, device="cpu").items():
            assert torch.equal(tensor, tensors[name])
    assert Store.open(populated_copy, at=kept[1]["id"]).verify()["ok"]
    assert store.verify()["ok"]
    assert _disk_bytes(populated_copy) < disk_before  # the dropped versions' chunks are gone


def test_gc_keep_must_be_positive(populated_copy, snapshot_state, capsys):
    before = snapshot_state(populated_copy)
    with pytest.raises(InvalidInputError, match="--keep"):
        Store.open(populated_copy).gc(0)
    assert main(["gc", str(populated_copy), "--keep", "0"]) == 4
    assert snapshot_state(populated_copy) == before


def test_info_tells_this_versions_bytes_from_historys(populated_copy, capsys):
    store = Store.open(populated_copy)
    before = store.info()
    assert 0 < before["version_disk_bytes"] <= before["disk_bytes"]
    assert before["history_bytes"] == before["disk_bytes"] - before["version_disk_bytes"]
    store.compact(progress=False)  # rewrites the payload: the old one becomes history
    grown = store.info()
    assert grown["history_bytes"] > before["history_bytes"] + before["version_disk_bytes"] // 2
    assert main(["info", str(populated_copy)]) == 0
    out = capsys.readouterr().out
    assert "this version's arrays" in out and "history" in out
    store.gc(1)
    assert store.info()["history_bytes"] < grown["history_bytes"]


def test_compact_gc_expires_old_versions_in_the_same_step(populated_copy, capsys):
    assert len(Store.open(populated_copy).log()) == 3
    assert main(["compact", str(populated_copy), "-q", "--device", "cpu", "--gc", "1"]) == 0
    log = Store.open(populated_copy).log()
    assert [v["metadata"]["op"] for v in log] == ["compact"]
    assert "expired 3 old version(s)" in capsys.readouterr().err


def test_compact_gc_must_be_positive_before_any_work(populated_copy, snapshot_state):
    before = snapshot_state(populated_copy)
    assert main(["compact", str(populated_copy), "-q", "--device", "cpu", "--gc", "0"]) == 4
    assert snapshot_state(populated_copy) == before
