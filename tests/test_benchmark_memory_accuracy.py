"""The memory-versus-accuracy benchmark, end to end in its quick configuration, and its baselines.

The quick run builds a 4-task, one-epoch ViT digits zoo (a second or two) and measures one variant
of every method family on it: about 10 CPU-seconds. The CNN path of the benchmark is the same
code; it runs once, through ``tvbase bench memory-accuracy`` (about 12 CPU-seconds), and the
baselines' handling of conv kernels is checked on toy tensors below. The seed bases
(PCA, Gram AE, cluster mean) are the library's, reached through a real store: the checks here
are that the benchmark goes that way and counts its bytes right, not the algorithms
(tests/test_seed.py, tests/test_seed_store.py).
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tvbase.coefficients
from tvbase.bench import baselines, memory_accuracy
from tvbase.bench.memory_accuracy import MARK_END, MARK_START, QUICK, run
from tvbase.cli import main as tvbase_main
from tvbase.methods.seed import ties_merge

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ARCHS = ("vit",)
BASELINE_FAMILIES = {"raw fp32", "fp16", "int8", "BitDelta", "TSV-C", "TALL masks", "PCA", "Gram AE", "cluster mean",
                     "DARE", "UltraDelta", "T-Switch", "Delta-CoMe", "TVQ", "RTVQ"}
# families built by `Store.ingest` (the library), and the ingest method of each seed basis
STORE_FAMILIES = {"tvbase", "PCA", "Gram AE", "cluster mean"}
SEED_METHOD = {"PCA": "pca", "Gram AE": "autoencoder", "cluster mean": "cluster-merge"}


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    """The folder of the quick zoos, shared by every quick run of this module (each zoo is built once)."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def quick(tmp_path_factory, quick_cache):
    """One quick run into a temporary folder, with a RESULTS.md that has other content around our section."""
    root = tmp_path_factory.mktemp("bench")
    results_md = root / "RESULTS.md"
    results_md.write_text(f"# Results\n\nkept before\n\n{MARK_START}\nold section\n{MARK_END}\n\nkept after\n")
    results = run(archs=ARCHS, cache=quick_cache, out=root / "out", quick=True, results_md=results_md, progress=False)
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
            assert m["via"] == ("store" if m["family"] in STORE_FAMILIES else "packed arrays"), where
            assert [a for a, _ in m["addition"]["val_scores"]] == list(QUICK.grid), where
            assert [row[0] for row in m["negation"]["val_rows"]] == list(QUICK.grid), where


def test_seed_bases_come_from_the_store(quick):
    """PCA, Gram AE and cluster mean rows are `Store.ingest(method=...)` stores, counted like tvbase's."""
    _, results = quick
    for arch, result in results["archs"].items():
        n_tasks = len(result["zoo"]["tasks"])
        raw = result["zoo"]["raw_fp32_bytes"]
        seeds = [m for m in result["methods"] if m["family"] in SEED_METHOD]
        assert {m["family"] for m in seeds} == set(SEED_METHOD), arch
        for m in seeds:
            where, e = f"{arch} {m['method']}", m["extra"]
            assert m["via"] == "store" and m["params"]["method"] == SEED_METHOD[m["family"]], where
            assert e["ingest_method"] == SEED_METHOD[m["family"]] and m["params"]["bits"] == 32, where
            assert m["bytes"] == e["disk_bytes"] and m["bytes_counted"].startswith("store directory"), where
            M = e["n_components"]
            assert e["coefficient_bytes"] == 4 * M * n_tasks, where
            assert m["payload_bytes"] == e["factor_bytes"] + e["coefficient_bytes"], where
            # fp32 basis: M vectors (+ the mean for PCA) of the raw size of one task vector
            vectors = M + (m["family"] == "PCA")
            assert e["factor_bytes"] == vectors * raw // n_tasks, where
        ae = next(m for m in seeds if m["family"] == "Gram AE")["extra"]
        assert ae["loss_lower_bound"] * (1 - 1e-9) <= ae["loss"] < ae["loss_at_zero"], arch
        cm = next(m for m in seeds if m["family"] == "cluster mean")
        assert sorted(set(cm["extra"]["labels"].values())) == list(range(cm["extra"]["clusters"])), arch
        assert f"K eigengap = {cm['extra']['clusters']}" in cm["method"], arch


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
        for m in rows:  # the budget counts the store on disk
            assert m["storage_percent"] <= 100 * m["params"]["budget"], (arch, m["method"])


def test_markdown_and_plots_are_written(quick):
    root, results = quick
    table = (root / "out" / "memory_accuracy.md").read_text()
    for arch in ARCHS:
        assert f"### {arch}:" in table
    assert "tvbase 3%" in table and "TSV-C" in table
    assert "`tvbase bench memory-accuracy --archs vit --cache " in table  # run() records the equivalent command
    text = (root / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nkept before\n\n") and text.endswith("\n\nkept after\n")
    assert "old section" not in text and text.count(MARK_START) == 1 and text.count(MARK_END) == 1
    assert "### vit:" in text
    if HAVE_MATPLOTLIB:
        for arch in ARCHS:
            png = root / "out" / f"memory_accuracy_{arch}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert results["plots"][arch] == str(png)


def test_plots_are_skipped_without_matplotlib(quick, tmp_path, monkeypatch, capsys):
    """matplotlib is a test extra only: without it no plot is written, and the run says so."""
    _, results = quick
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    png = tmp_path / "plot.png"
    assert memory_accuracy.write_plot(results["archs"]["vit"], png) is None
    assert not png.exists()
    assert "matplotlib is not installed: plot plot.png skipped" in capsys.readouterr().err
    section = memory_accuracy.format_markdown(results, {"vit": None}, tmp_path)
    assert "(No plot for vit: matplotlib was not installed.)" in section and "![" not in section


def test_results_md_is_created_with_its_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "RESULTS.md"
    memory_accuracy.update_results_md(path, "## Memory versus accuracy\n\nbody")
    assert path.read_text() == f"# Measured results\n\n{MARK_START}\n## Memory versus accuracy\n\nbody\n{MARK_END}\n"


# --------------------------------------------------------------------------------------------
# The installed command: `tvbase bench memory-accuracy`
# --------------------------------------------------------------------------------------------


def test_cli_runs_the_quick_benchmark(quick_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default paths are relative to the current directory: keep them here
    out = tmp_path / "out"
    argv = ["bench", "memory-accuracy", "--quick", "--archs", "cnn", "--out", str(out), "--cache", str(quick_cache),
            "--quiet"]
    assert tvbase_main(argv) == 0
    captured = capsys.readouterr()
    assert "### cnn:" in captured.out and "tvbase 3%" in captured.out
    on_disk = json.loads((out / "memory_accuracy.json").read_text())
    assert on_disk["meta"]["command"].startswith("tvbase bench memory-accuracy ")
    assert on_disk["meta"]["command"].endswith(" --quiet") and on_disk["meta"]["quick"] is True
    assert on_disk["archs"].keys() == {"cnn"}
    assert BASELINE_FAMILIES | {"tvbase"} <= {m["family"] for m in on_disk["archs"]["cnn"]["methods"]}
    assert "Produced by `tvbase bench memory-accuracy --quick --archs cnn" in (out / "memory_accuracy.md").read_text()
    png = out / "memory_accuracy_cnn.png"
    if HAVE_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists() and "plots skipped for cnn: matplotlib is not installed" in captured.out
    assert "results_md" not in on_disk  # --quick writes no results markdown unless told
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written by default paths


def test_cli_bench_needs_a_benchmark(capsys):
    with pytest.raises(SystemExit) as info:
        tvbase_main(["bench"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tvbase bench ") and "arguments are required: BENCHMARK" in err


@pytest.mark.parametrize(
    ("argv", "out", "results_md"),
    [
        ([], Path("benchmarks", "results"), Path("benchmarks", "RESULTS.md")),
        (["--seed", "1"], Path("benchmarks", "results", "seed1"), None),
        (["--quick", "--cache", "c"], Path("c", "quick-results"), None),
        (["--seed", "1", "--out", "o", "--results-md", "r.md"], Path("o"), Path("r.md")),
        (["--methods", "tvbase,DARE"], Path("benchmarks", "results", "methods"), None),
        (["--seed", "1", "--methods", "tvbase"], Path("benchmarks", "results", "methods-seed1"), None),
    ],
)
def test_only_the_full_seed0_run_writes_the_default_outputs(monkeypatch, capsys, argv, out, results_md):
    """A quick or other-seed run never overwrites benchmarks/results or RESULTS.md unless told to."""
    calls = []

    def fake_run(**kwargs):
        calls.append(kwargs)
        return {"archs": {}, "plots": {}, "meta": {"wall_seconds": 0.0}, "json_path": "x.json"}

    monkeypatch.setattr(memory_accuracy, "run", fake_run)
    monkeypatch.setattr(memory_accuracy, "format_tables", lambda results: "")
    memory_accuracy.main(argv)
    assert calls[0]["out"] == out and calls[0]["results_md"] == results_md


def test_one_definition_of_the_options():
    """`tvbase bench memory-accuracy` and `python -m benchmarks.memory_accuracy` parse alike; defaults are relative."""
    from tvbase.cli import build_parser

    argv = ["--archs", "vit", "--quick", "--seed", "3", "--threads", "2", "--device", "cuda", "--results-md", "r.md"]
    module_args = vars(memory_accuracy.build_parser().parse_args(argv))
    cli_args = vars(build_parser().parse_args(["bench", "memory-accuracy", *argv]))
    assert {k: cli_args[k] for k in module_args} == module_args
    defaults = memory_accuracy.build_parser().parse_args([])
    assert defaults.cache == Path("benchmarks", "cache") and not defaults.cache.is_absolute()
    for path in (memory_accuracy.DEFAULT_CACHE, memory_accuracy.DEFAULT_OUT, memory_accuracy.DEFAULT_RESULTS_MD):
        assert not path.is_absolute() and path.parts[0] == "benchmarks", path
    # the checkout's `python -m benchmarks.memory_accuracy` is a shim over the installed harness
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    import benchmarks.memory_accuracy as shim

    assert shim.main is memory_accuracy.main


# --------------------------------------------------------------------------------------------
# The baselines and the coefficient rules on their own
# --------------------------------------------------------------------------------------------


def _toy_task_vectors(n_tasks=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (12, 8), "conv": (4, 2, 3, 3), "b": (12,)}
    return {f"t{i}": {n: 0.1 * torch.randn(*s, generator=gen) for n, s in shapes.items()} for i in range(n_tasks)}


def _error(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in b)


def _write_checkpoints(root, tvs, seed=1):
    """A base checkpoint and one fine-tune per task (base + tau), as safetensors files."""
    gen = torch.Generator().manual_seed(seed)
    first = next(iter(tvs.values()))
    base = {n: torch.randn(*x.shape, generator=gen) for n, x in first.items()}
    save_file(base, str(root / "base.safetensors"))
    paths = {}
    for t, tensors in tvs.items():
        paths[t] = root / f"{t}.safetensors"
        save_file({n: base[n] + x for n, x in tensors.items()}, str(paths[t]))
    return root / "base.safetensors", paths


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
    for t in tvs:
        assert _error(baselines.Fp32().fit(tvs).rebuild(t), tvs[t]) == 0.0
    tsv = baselines.TsvCompress().fit(tvs)
    assert tsv.ranks_ == {"w": 8 // T, "conv": max(1, 4 // T)}


def test_tall_ties_uses_the_library_merge():
    tvs = _toy_task_vectors()
    tall = baselines.TallMasks(lambdas=(0.4,), merge="ties").fit(tvs)
    for name in tvs["t0"]:
        expected = ties_merge([tvs[t][name] for t in tvs], 0.2).float().numpy()
        assert (tall.packed_["merged", name] == expected).all(), name


def test_seed_bases_go_through_the_store(tmp_path):
    tvs = _toy_task_vectors()
    n = sum(x.numel() for x in tvs["t0"].values())
    T = len(tvs)
    base, paths = _write_checkpoints(tmp_path, tvs)
    # PCA with M = T - 1 components rebuilds exactly (up to float32 storage)
    with baselines.SeedPCA(n_components=T - 1).fit(base, paths) as pca:
        assert pca.store_.meta["clusters"]["0"]["method"] == "pca"
        assert pca.factor_bytes_ == 4 * n * T and pca.coefficient_bytes_ == 4 * T * (T - 1)  # mean + M, c_t
        assert pca.payload_bytes_ == 4 * (n * T + T * (T - 1))
        assert pca.nbytes_ == pca.store_.info()["disk_bytes"] > 0
        for t in tvs:
            assert _error(pca.rebuild(t), tvs[t]) < 1e-5
        composed = pca.compose({"t0": 0.5, "t1": -1.0})
        expected = {k: 0.5 * tvs["t0"][k] - tvs["t1"][k] for k in tvs["t0"]}
        assert _error(composed, expected) < 1e-5
        store_dir = pca._dir
    assert not store_dir.exists()  # closed on leaving the with block
    with baselines.SeedAutoencoder(n_components=3).fit(base, paths) as ae:
        assert ae.loss_bound_ * (1 - 1e-9) <= ae.loss_ < ae.energy_  # better than no reconstruction
        assert ae.payload_bytes_ == 4 * (3 * n + 3 * T)  # basis S, coefficients (decoder W)
        assert ae.label == "Gram AE M=3"
    with baselines.SeedClusterMean(n_clusters=2).fit(base, paths) as cm:
        assert cm.n_components_ == 2 and cm.label == "spectral clusters + mean (K = 2)"
        for t, label in zip(cm.tasks_, cm.labels_):
            members = [u for u, lab in zip(cm.tasks_, cm.labels_) if lab == label]
            expected = {k: sum(tvs[u][k] for u in members) / len(members) for k in tvs[t]}
            assert _error(cm.rebuild(t), expected) < 1e-6
        assert cm.payload_bytes_ == 4 * (2 * n + 2 * T)


def test_one_place_per_concern():
    """Coefficient rules and seed bases are the library's; the benchmark keeps no copies."""
    assert memory_accuracy.choose_addition_alpha is tvbase.coefficients.choose_addition_alpha
    assert memory_accuracy.choose_negation_alpha is tvbase.coefficients.choose_negation_alpha
    for gone in ("choose_addition_alpha", "choose_negation_alpha", "CenteredPCA", "GramAutoencoder", "ClusterMean"):
        assert not hasattr(baselines, gone), gone
    with pytest.raises(KeyError, match="valid baselines: fp32, fp16"):
        baselines.make_baseline("nope")
    assert isinstance(baselines.make_baseline("pca", n_components=2), baselines.StoreMethod)


def test_methods_runs_only_the_named_families(quick_cache, tmp_path):
    """--methods: only those rows, recorded in the outputs and the command; names without regard to case."""
    families = memory_accuracy.build_parser().parse_args(["--methods", "dare, TVBASE"]).methods
    assert families == ["DARE", "tvbase"]
    results = run(archs=ARCHS, cache=quick_cache, out=tmp_path, quick=True, progress=False, families=families)
    methods = results["archs"]["vit"]["methods"]
    assert {m["family"] for m in methods} == {"DARE", "tvbase"}
    assert len([m for m in methods if m["family"] == "tvbase"]) == len(QUICK.budgets)
    assert results["meta"]["families"] == ["DARE", "tvbase"]  # in table order
    assert "--methods DARE,tvbase" in results["meta"]["command"]
    assert "Only these method families were run" in (tmp_path / "memory_accuracy.md").read_text()


def test_methods_refuses_an_unknown_family(capsys):
    with pytest.raises(SystemExit) as info:
        memory_accuracy.main(["--methods", "tvbase,UltraDelta,mergekit"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method families ['mergekit']" in err and "T-Switch" in err
    with pytest.raises(ValueError, match="unknown method families"):
        run(archs=ARCHS, quick=True, families=["nope"])


def test_a_section_holding_another_is_not_replaced(tmp_path):
    """A section nested inside another's markers (a hand edit) would be deleted by the outer one's
    rewrite: refused, the file unchanged."""
    from tvbase.bench.report import replace_section

    path = tmp_path / "RESULTS.md"
    text = f"# R\n\n{MARK_START}\n<!-- scale:start -->\nscale\n<!-- scale:end -->\nold\n{MARK_END}\n"
    path.write_text(text)
    with pytest.raises(ValueError, match="holds other sections \\(scale\\)"):
        replace_section(path, "memory-accuracy", "new")
    assert path.read_text() == text
    replace_section(path, "scale", "new scale")  # the inner one is still replaced in place
    assert "new scale" in path.read_text() and "old" in path.read_text()
