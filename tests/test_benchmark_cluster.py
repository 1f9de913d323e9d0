"""The short version of ``python -m benchmarks.cluster``: the tiny layout, 2 tasks, a serial
ingest against one into a store on a moto S3 server and one on a LocalCluster of 1 worker."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("distributed")
pytest.importorskip("moto")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks`

from benchmarks import cluster  # noqa: E402


def test_cluster_benchmark_measures_every_run_and_writes_its_outputs(tmp_path, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP"):
        monkeypatch.setenv(name, "")  # the benchmark sets these for its own server: recorded, so undone after
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Measured results\n")
    cluster.main(["--layout", "tiny", "--tasks", "2", "--workers", "1", "--cache", str(tmp_path / "cache"),
                  "--out", str(tmp_path / "out"), "--results-md", str(results_md)])
    data = json.loads((tmp_path / "out" / "cluster.json").read_text())
    runs = data["runs"]
    assert list(runs) == ["serial, local store", "serial, store on S3", "local:1, local store"]
    for run in runs.values():
        assert run["ingest_s"] > 0 and run["disk_bytes"] > 0
        assert run["same_clusters"]
        assert [t["name"] for t in run["tasks"]] == ["t00", "t01"]
        assert run["over_serial"] == pytest.approx(run["ingest_s"] / runs["serial, local store"]["ingest_s"])
        assert run["driver_s"]["allocation"] >= 0 and run["driver_s"]["range"] >= 0
    table = (tmp_path / "out" / "cluster.md").read_text()
    assert "| local:1, local store |" in table and "| serial, store on S3 |" in table
    assert "<!-- cluster:start -->" in results_md.read_text()
