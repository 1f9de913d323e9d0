"""A store written by format version 1 must stay readable (like icechunk's test_can_read_old).

Tolerances only allow for a different BLAS summing in another order.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvbase import FormatVersionError, Store

DATA = Path(__file__).parent / "data"


@pytest.fixture()
def old_store(tmp_path):
    path = tmp_path / "store-v1"
    shutil.copytree(DATA / "store-v1", path)
    return path


def test_format_v1_store_rebuilds_as_written(old_store):
    expected = load_file(DATA / "store-v1-expected.safetensors")
    store = Store.open(old_store)
    assert store.meta["format_version"] == 1
    assert store.tasks == ["t0", "t1", "t2", "t3"]
    for task in store.tasks:
        for name, tensor in store.get(task, device="cpu").items():
            torch.testing.assert_close(tensor, expected[f"{task}/{name}"], rtol=1e-6, atol=1e-7)
    for name, tensor in store.compose({"t0": 0.5, "t3": -1.0}, device="cpu").items():
        torch.testing.assert_close(tensor, expected[f"compose/{name}"], rtol=1e-6, atol=1e-7)
    assert store.verify()["ok"]


def test_newer_format_is_refused(old_store, monkeypatch):
    import tvbase.format as store_module

    monkeypatch.setattr(store_module, "FORMAT_VERSION", 0)
    with pytest.raises(FormatVersionError, match="newer than this tvbase"):
        Store.open(old_store)
