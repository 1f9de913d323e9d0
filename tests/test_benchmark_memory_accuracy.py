"""The memory-versus-accuracy benchmark, end to end in its quick configuration, and its baselines.

The quick run builds a 4-task, one-epoch ViT digits zoo (a second or two) and measures one variant
of every method family on it: about 10 CPU-seconds. The CNN path of the benchmark is the same
code; the baselines' handling of conv kernels is checked on toy tensors below.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# `benchmarks` is a top-level folder of the repository, not part of the installed package: make
# it importable under plain `pytest` too (which puts tests/, not the repository root, on sys.path).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import baselines  # noqa: E402
from benchmarks.memory_accuracy import MARK_END, MARK_START, QUICK, run  # noqa: E402

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ARCHS = ("vit",)
BASELINE_FAMILIES = {"raw fp32", "fp16", "int8", "BitDelta", "TSV-C", "TALL masks", "PCA", "Gram AE", "cluster mean"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run into a temporary folder, with a RESULTS.md that has other content around our section."""
    root = tmp_path_factory.mktemp("bench")
    results_md = root / "RESULTS.md"
    results_md.write_text(f"# Results\n\nkept before\n\n{MARK_START}\nold section\n{MARK_END}\n\nkept after\n")
    results = run(archs=ARCHS, cache=root / "cache", out=root / "out", quick=True, results_md=results_md, progress=False)
    return root, results


def test_json_has_every_method_with_valid_fields(quick):
    root, results = quick
    on_disk = json.loads((root / "out" / "memory_accuracy.json").read_text())
    assert on_disk["archs"].keys() == set(ARCHS)
    meta = on_disk["meta"]
    for key in ("command", "date", "device", "dtype", "torch_version", "tvbase_version", "cpu_count", "seed"):
        assert meta[key] is not None, key
    for arch in ARCHS:
        result = on_disk["archs"][arch]
        tasks = result["zoo"]["tasks"]
        methods = result["methods"]
        families = {m["family"] for m in methods}
        assert BASELINE_FAMILIES | {"tvbase"} <= families
        assert sorted(m["params"]["budget"] for m in methods if m["family"] == "tvbase") == sorted(QUICK.budgets)
        for m in methods:
            where = f"{arch} {m['method']}"
            assert m["bytes"] > 0 and 0 < m["storage_percent"] <= 100.0 + 1e-9, where
            assert 0 < m["payload_percent"] <= 100.0 + 1e-9, where
            assert set(m["per_task"]) == set(tasks), where
            for row in m["per_task"].values():
                assert 0.0 <= row["accuracy"] <= 1.0 and row["normalized"] >= 0.0, where
                assert math.isfinite(row["normalized"]) and math.isfinite(row["rel_error"]), where
            assert m["worst_normalized"] == min(r["normalized"] for r in m["per_task"].values()), where
            assert m["worst_normalized"] <= m["mean_normalized"] + 1e-12, where
            assert 0.0 <= m["addition"]["mean_normalized"] and m["addition"]["alpha"] in QUICK.grid, where
            assert 0.0 <= m["negation"]["target_accuracy"] <= 1.0, where
            assert 0.0 <= m["negation"]["control_accuracy"] <= 1.0, where
            assert m["negation"]["alpha"] in QUICK.grid, where
            assert m["build_seconds"] >= 0.0 and m["rebuild_ms"] >= 0.0, where


def test_raw_is_exact_and_fp16_is_close(quick):
    _, results = quick
    for arch, result in results["archs"].items():
        by_family = {m["family"]: m for m in result["methods"]}
        raw = by_family["raw fp32"]
        assert raw["storage_percent"] == 100.0
        assert all(row["normalized"] == 1.0 for row in raw["per_task"].values()), arch
        fp16 = by_family["fp16"]
        assert fp16["storage_percent"] == 50.0
        assert all(abs(row["normalized"] - 1.0) <= 0.01 for row in fp16["per_task"].values()), arch


def test_tvbase_storage_grows_with_budget(quick):
    _, results = quick
    for arch, result in results["archs"].items():
        rows = sorted((m for m in result["methods"] if m["family"] == "tvbase"), key=lambda m: m["params"]["budget"])
        assert len(rows) >= 2
        storage = [m["storage_percent"] for m in rows]
        payload = [m["payload_percent"] for m in rows]
        assert storage == sorted(storage) and len(set(storage)) == len(storage), (arch, storage)
        assert payload == sorted(payload) and len(set(payload)) == len(payload), (arch, payload)
        for m in rows:  # factor bytes stay within the budget
            assert m["payload_percent"] <= 100 * m["params"]["budget"] + 1e-6, (arch, m["method"])


def test_markdown_and_plots_are_written(quick):
    root, results = quick
    table = (root / "out" / "memory_accuracy.md").read_text()
    for arch in ARCHS:
        assert f"### {arch}:" in table
    assert "tvbase 3%" in table and "TSV-C" in table and "python -m benchmarks.memory_accuracy" in table
    text = (root / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nkept before\n\n") and text.endswith("\n\nkept after\n")
    assert "old section" not in text and text.count(MARK_START) == 1 and text.count(MARK_END) == 1
    assert "### vit:" in text
    if HAVE_MATPLOTLIB:
        for arch in ARCHS:
            png = root / "out" / f"memory_accuracy_{arch}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert results["plots"][arch] == str(png)


# --------------------------------------------------------------------------------------------
# The baselines and the coefficient rules on their own
# --------------------------------------------------------------------------------------------


def _toy_task_vectors(n_tasks=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (12, 8), "conv": (4, 2, 3, 3), "b": (12,)}
    return {f"t{i}": {n: 0.1 * torch.randn(*s, generator=gen) for n, s in shapes.items()} for i in range(n_tasks)}


def _error(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in b)


def test_baseline_byte_counts_and_exact_limits():
    tvs = _toy_task_vectors()
    n = sum(x.numel() for x in tvs["t0"].values())  # entries per task
    T = len(tvs)
    assert baselines.Fp32().fit(tvs).nbytes_ == 4 * n * T
    assert baselines.Fp16().fit(tvs).nbytes_ == 2 * n * T
    assert baselines.Int8().fit(tvs).nbytes_ == T * (n + 4 * (12 + 4 + 1))  # codes + per-row scales
    bitdelta = baselines.BitDelta().fit(tvs)
    assert bitdelta.nbytes_ == T * (math.ceil(96 / 8) + 4 + math.ceil(72 / 8) + 4 + 2 * 12)
    tall = baselines.TallMasks(lambdas=(0.4,)).fit(tvs)
    assert tall.nbytes_ == 4 * n + T * (math.ceil(96 / 8) + math.ceil(72 / 8) + math.ceil(12 / 8))
    # PCA with M = T - 1 components and the AE at M = T rebuild exactly (up to float32 storage)
    pca = baselines.CenteredPCA(n_components=T - 1).fit(tvs)
    assert pca.nbytes_ == 4 * (n * T + T * (T - 1))
    for t in tvs:
        assert _error(pca.rebuild(t), tvs[t]) < 1e-5
        assert _error(baselines.Fp32().fit(tvs).rebuild(t), tvs[t]) == 0.0
    tsv = baselines.TsvCompress().fit(tvs)
    assert tsv.ranks_ == {"w": 8 // T, "conv": max(1, 4 // T)}


def test_gram_autoencoder_respects_its_lower_bound():
    tvs = _toy_task_vectors(n_tasks=6)
    ae = baselines.GramAutoencoder(n_bases=3, steps=500, seed=0).fit(tvs)
    assert ae.loss_ >= ae.loss_bound_ * (1 - 1e-9)
    assert ae.loss_ < ae.energy_  # better than no reconstruction at all
    assert ae.nbytes_ == 4 * (3 * sum(x.numel() for x in tvs["t0"].values()) + 3 * 6)


def test_cluster_mean_rebuilds_the_mean_of_each_cluster():
    tvs = _toy_task_vectors(n_tasks=4)
    cm = baselines.ClusterMean(n_clusters=2).fit(tvs)
    for t, label in zip(cm.tasks_, cm.labels_):
        members = [u for u, lab in zip(cm.tasks_, cm.labels_) if lab == label]
        expected = {n: sum(tvs[u][n] for u in members) / len(members) for n in tvs[t]}
        assert _error(cm.rebuild(t), expected) < 1e-6


def test_coefficient_rules():
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    alpha, scores = baselines.choose_addition_alpha(lambda a: 1 - (a - 0.5) ** 2, grid)
    assert alpha == 0.5 and [a for a, _ in scores] == grid
    alpha, _ = baselines.choose_addition_alpha(lambda a: 1.0, grid)  # ties: the smallest alpha
    assert alpha == 0.0
    # target falls with alpha; control falls below the floor after 0.5
    alpha, rows = baselines.choose_negation_alpha(lambda a: (1 - a, 1.0 if a <= 0.5 else 0.5), grid, control_floor=0.9)
    assert alpha == 0.5 and len(rows) == len(grid)
    alpha, _ = baselines.choose_negation_alpha(lambda a: (1 - a, 0.0), grid, control_floor=0.9)
    assert alpha == 0.0  # nothing keeps the control: do not negate
    with pytest.raises(KeyError, match="valid baselines: fp32, fp16"):
        baselines.make_baseline("nope")
    assert np.isclose(baselines.ALPHA_GRID[1], 0.05) and len(baselines.ALPHA_GRID) == 21
