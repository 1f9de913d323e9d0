"""The short version of ``python -m benchmarks.versus_010``: a micro BERT layout, 2 tasks, the
streamed fit against 0.1.0 exported from git history and run from its own folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for `benchmarks`

from benchmarks import scale, versus_010  # noqa: E402

has_old = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{versus_010.OLD}^{{commit}}"], capture_output=True).returncode == 0
pytestmark = pytest.mark.skipif(not has_old, reason="needs a git clone holding 0.1.0's commit")


def test_versus_010_runs_both_versions_and_caches_the_old_figures(tmp_path, monkeypatch):
    micro = scale._bert(512, 64, 1, 128, 32, head=True, name="micro", description="micro BERT (tests)")
    monkeypatch.setitem(scale.LAYOUTS, "micro", micro)
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Measured results\n")
    cache, out = tmp_path / "cache", tmp_path / "out"
    versus_010.main(["--layout", "micro", "--tasks", "2", "--cache", str(cache), "--out", str(out),
                     "--results-md", str(results_md)])
    data = json.loads((out / "versus_010.json").read_text())
    for label in ("old", "new"):
        run = data[label]
        assert sorted(run["rel_error"]) == ["t00", "t01"]
        assert all(0 < e < 1 for e in run["rel_error"].values())
        # measured here from the rebuilt files; each version recorded its own estimate at ingest
        assert all(abs(run["rel_error"][t] - run["own_rel_error"][t]) < 1e-3 for t in run["rel_error"])
        assert run["disk_bytes"] > 0 and run["ingest_s"] > 0
    assert data["old"]["commands"][0]["argv"].startswith("python -m tvbase.cli init")
    assert data["mean_error_ratio"] == pytest.approx(
        sum(data["new"]["rel_error"].values()) / sum(data["old"]["rel_error"].values()))
    cached = list(cache.glob(f"versus_010-{versus_010.OLD}-micro-T2-seed0-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["rel_error"] == data["old"]["rel_error"]
    assert "versus-010:start" in results_md.read_text()
