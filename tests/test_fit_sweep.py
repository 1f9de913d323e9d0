"""benchmarks/fit_sweep.py on a 4-task, one-epoch zoo: outputs, a lossless variant, bad variants."""

import json

import pytest

from benchmarks import fit_sweep
from tvbase.demo.zoo import build_zoo


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-zoo") / "zoo-cnn"
    build_zoo(root, arch="cnn", tasks=["invert", "shift", "vflip", "hflip"], epochs=1, pretrain_epochs=5, progress=False)
    return root


def test_sweep_writes_every_run_and_a_lossless_variant_is_exact(tiny_zoo, tmp_path):
    out = tmp_path / "out"
    argv = ["--zoos", str(tiny_zoo), "--budgets", "0.9", "--variant", "rank=256,bits=32,dense_bits=32", "--variant", "dense_bits=4",
            "--out", str(out), "--name", "sweep"]
    assert fit_sweep.main(argv) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert data["command"].startswith("python -m benchmarks.fit_sweep --zoos")
    assert [r["variant"] for r in data["runs"]] == ["rank=256,bits=32,dense_bits=32", "dense_bits=4"]
    lossless, int4 = (r["summary"] for r in data["runs"])
    # full rank (every matrix has a side <= 256) in fp32: the rebuilt vectors are the task
    # vectors, so every figure is exactly 1
    assert lossless["rel_error"]["max"] < 1e-4
    for key in ("test", "600", "agree"):
        assert lossless[key]["mean"] == lossless[key]["worst"] == 1.0, key
    # int4 loses something, and the store stays within its budget
    assert int4["rel_error"]["mean"] > 1e-3 and 0 < int4["storage_percent"] <= 90.0
    for run in data["runs"]:
        assert set(run["per_task"]) == {"invert", "shift", "vflip", "hflip"}
    table = (out / "sweep.md").read_text()
    assert table.count("| cnn seed 0 | 90%") == 2


@pytest.mark.parametrize("variant", ["budget=0.5", "no_such_field=1"])
def test_bad_variant_is_refused(variant):
    with pytest.raises(SystemExit, match="disallowed FitParams field"):
        fit_sweep.parse_variant(variant)
