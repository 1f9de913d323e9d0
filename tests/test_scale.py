"""The scale benchmark (``benchmarks/scale.py``) on its tiny layout: the synthetic fine-tunes are
seeded and have the stated structure; a short run records every figure, each ratio a positive
number or a recorded timeout. No timing thresholds: only that figures exist.

tvbase commands run in processes forked from a preloaded server (``launcher="fork"``, no ~3 s
interpreter start-up each); one test runs real ``python -m`` subprocesses.
"""

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks`

from benchmarks import scale  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork and wait4")

TINY = scale.LAYOUTS["tiny"]
LAYOUT_FIGURES = (
    "read_pass_s", "read_pass_peak_rss_bytes", "init_s", "ingest_s", "ingest_peak_rss_bytes", "ingest_over_read_pass",
    "disk_storage", "get_s", "raw_load_s", "get_over_raw_load", "raw_save_s", "get_over_raw_save", "compose8_s", "compose8_over_get", "later_ingest_s",
    "later_rel_error", "later_equal_bytes_rel_error", "joint_rel_error", "later_error_ratio", "joint_ingest_s", "joint_ingest_peak_rss_bytes",
)  # fmt: skip


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _positive_or_timeout(x):
    return (scale._is_number(x) and x > 0) or (isinstance(x, dict) and x.get("timed_out") is True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("scale-cache")


@pytest.fixture(scope="module")
def zoo(cache):
    return scale.generate_zoo("tiny", 4, seed=0, cache=cache)


@pytest.fixture(scope="module")
def quick(cache, zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale-out")
    summary = scale.run(["tiny"], tasks=2, growth_tasks=3, cache=cache, out=out, results_md=out / "RESULTS.md",
                        launcher="fork", quick=True, progress=False, threads=1)
    return summary, out


# -- the synthetic fine-tunes --------------------------------------------------------------------
def test_same_seed_same_files_other_seed_other_files(tmp_path, zoo):
    again = scale.generate_zoo("tiny", 1, seed=0, cache=tmp_path / "a")
    other = scale.generate_zoo("tiny", 1, seed=1, cache=tmp_path / "b")
    assert again.root != zoo.root and again.generated_s is not None
    for name in ("base.safetensors", "t00.safetensors"):
        assert _sha(again.root / name) == _sha(zoo.root / name)
        assert _sha(other.root / name) != _sha(zoo.root / name)
    # a cached zoo with more tasks serves a request for fewer
    found = scale.generate_zoo("tiny", 2, seed=0, cache=zoo.root.parent)
    assert found.root == zoo.root and found.generated_s is None


def test_files_follow_the_layout(zoo):
    with safe_open(str(zoo.task(3)), framework="pt") as f:
        assert set(f.keys()) == {n for n, _, _ in TINY.tensors}
        for name, shape, _ in TINY.tensors:
            t = f.get_tensor(name)
            assert tuple(t.shape) == shape and t.dtype == torch.float32
    assert json.loads((zoo.root / "zoo.json").read_text())["n_tasks"] == 4
    assert TINY.n_params == sum(math.prod(s) for _, s, _ in TINY.tensors)
    assert scale.LAYOUTS["bert-base"].n_params == pytest.approx(110e6, rel=0.02)
    assert scale.LAYOUTS["gpt2-small"].n_params == pytest.approx(124e6, rel=0.01)
    assert "lm_head.weight" not in {n for n, _, _ in scale.LAYOUTS["gpt2-small"].tensors}
    assert scale.LAYOUTS["llama-slice"].dtype == torch.bfloat16


@pytest.fixture(scope="module")
def deltas(zoo):
    base = load_file(str(zoo.base))
    return base, {i: {k: v - base[k] for k, v in load_file(str(zoo.task(i))).items()} for i in range(4)}


def test_delta_norms_are_those_of_fine_tunes(deltas):
    base, tv = deltas
    lo, hi = scale.REL_NORM
    for i in tv:
        for name, d in tv[i].items():
            rel = (d.norm() / base[name].norm()).item()
            assert lo * 0.98 <= rel <= hi * 1.02, (i, name, rel)


def test_moved_embedding_rows_move_further(deltas):
    _, tv = deltas
    for name in ("embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"):
        for i in tv:
            d = tv[i][name]
            rows = scale.moved_rows(TINY, d.shape[0], i, 0)
            assert 0.8 * TINY.moved_rows <= len(rows) <= TINY.moved_rows
            moved = torch.zeros(d.shape[0], dtype=torch.bool)
            moved[rows] = True
            norms = d.norm(dim=1)
            assert norms[moved].min() > 2 * norms[~moved].max() or norms[moved].mean() > 5 * norms[~moved].mean()
            assert norms[moved].mean() > 5 * norms[~moved].mean()
    # tasks of one group share half their moved rows
    same = set(scale.moved_rows(TINY, 8000, 0, 0).tolist()) & set(scale.moved_rows(TINY, 8000, 3, 0).tolist())
    other = set(scale.moved_rows(TINY, 8000, 0, 0).tolist()) & set(scale.moved_rows(TINY, 8000, 1, 0).tolist())
    assert len(same) >= TINY.moved_rows // 2 > 4 * len(other)


def test_matrix_deltas_are_low_rank_plus_noise_shared_by_group(deltas):
    _, tv = deltas
    rank = TINY.shared_rank + TINY.own_rank
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.intermediate.dense.weight"):
        for i in tv:
            s = torch.linalg.svdvals(tv[i][name].double())
            top = (s[:rank] ** 2).sum() / (s**2).sum()
            # the low-rank parts hold 90% of the energy, the noise spreads the rest over every direction
            assert 0.88 <= top <= 0.95, (name, i, top.item())
            assert s[rank:].min() > 0 and s[rank] < 0.3 * s[0]
        cos = lambda a, b: (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()  # noqa: E731
        d = {i: tv[i][name] for i in tv}
        assert scale.task_group(0) == scale.task_group(3) != scale.task_group(1)
        assert cos(d[0], d[3]) > 0.3 and abs(cos(d[0], d[1])) < 0.1  # group 0 shares a low-rank part


def test_bf16_layout_writes_bf16(tmp_path):
    layout = scale.Layout("bf16-mini", (("embed.weight", (400, 32), "embedding"), ("w.weight", (64, 32), "matrix"),
                                        ("norm.weight", (32,), "norm")), dtype=torch.bfloat16, moved_rows=40,
                          shared_rank=4, own_rank=2)
    z = scale.generate_zoo(layout, 1, cache=tmp_path)
    base, ft = load_file(str(z.base)), load_file(str(z.task(0)))
    assert all(t.dtype == torch.bfloat16 for t in (*base.values(), *ft.values()))
    rel = ((ft["w.weight"].float() - base["w.weight"].float()).norm() / base["w.weight"].float().norm()).item()
    assert 0.008 < rel < 0.06  # bf16 rounding on top of a 1-5% delta


def test_disk_check_refuses_before_writing(tmp_path):
    with pytest.raises(scale.NotEnoughDisk, match="not enough disk"):
        scale.generate_zoo("tiny", 2, cache=tmp_path / "c", reserve=1 << 62)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.safetensors"))
    with pytest.raises(scale.NotEnoughDisk, match="--cache"):
        scale.check_disk(tmp_path, 1 << 62, "a test")


# -- the measurements ----------------------------------------------------------------------------
def test_quick_run_records_every_figure(quick):
    _, out = quick
    data = json.loads((out / "scale.json").read_text())
    assert data["layouts"][0]["layout"] == "tiny" and data["tasks"] == 2
    for key in ("cpus", "torch", "device", "memory_bytes", "platform"):
        assert key in data["machine"]
    assert data["command"].startswith("python -m benchmarks.scale") and data["wall_seconds"] > 0
    r = data["layouts"][0]
    for key in LAYOUT_FIGURES:
        assert _positive_or_timeout(r[key]), (key, r[key])
    for key in scale.RATIOS:
        assert _positive_or_timeout(r[key]), (key, r[key])
    assert r["compose_terms"] == 2 and r["later_task"] == "t02"
    for key in ("get", "raw_load", "raw_save", "compose8"):  # medians of alternating runs
        if scale._is_number(r[f"{key}_s"]):
            assert len(r[f"{key}_runs_s"]) == scale.ROUNDS and r[f"{key}_s"] == sorted(r[f"{key}_runs_s"])[scale.ROUNDS // 2]
    assert 0 < r["later_disk_share"] <= 0.03 * 1.05  # what the later ingest took on disk, within its budget
    if r["later_equal_bytes_budget"] != 0.03:  # ingested again for the joint fit's bytes: closer to them
        assert abs(r["later_equal_bytes_stored_bytes"] - r["joint_stored_bytes"]) < abs(r["later_stored_bytes"] - r["joint_stored_bytes"])
    assert r["later_error_ratio"] == pytest.approx(r["later_equal_bytes_rel_error"] / r["joint_rel_error"])
    assert r["later_kind"] == "projected" and r["later_error_ratio"] <= 1.1  # the goal: within 10% of the joint fit
    g = data["growth"]
    assert g["layout"] == "tiny" and (g["low"]["tasks"], g["high"]["tasks"]) == (2, 3)
    assert scale._is_number(g["peak_rss_growth"]) or g["peak_rss_growth"].get("timed_out")
    assert {row["figure"] for row in data["goals"]} == set(scale.GOALS)
    assert all(row["met"] in (True, False) for row in data["goals"])
    # every command was measured
    assert all(c["peak_rss_bytes"] > 0 and c["wall_s"] > 0 for c in r["commands"])
    md = (out / "scale.md").read_text()
    assert "| tiny (float32) |" in md and "Peak RSS growth" in md
    section = (out / "RESULTS.md").read_text()
    assert "<!-- scale:start -->" in section and "<!-- scale:end -->" in section
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert data["plot"] is None
    else:
        assert (out / "scale.png").stat().st_size > 0 and "scale.png" in section


def test_commands_past_the_timeout_are_recorded_and_the_run_goes_on(cache, zoo, tmp_path):
    summary = scale.run(["tiny"], tasks=2, growth_tasks=3, cache=cache, out=tmp_path, results_md=None, timeout=0.001,
                        launcher="fork", progress=False, threads=1)
    r = summary["layouts"][0]
    for key in (*scale.RATIOS, "ingest_s", "read_pass_s", "raw_load_s", "raw_save_s"):
        assert r[key].get("timed_out") is True, (key, r[key])
    assert summary["growth"]["peak_rss_growth"].get("timed_out") is True
    assert all(row["met"] is None for row in summary["goals"])
    assert "timed out" in scale.tables(summary)
    assert (tmp_path / "scale.json").exists() and not (tmp_path / "RESULTS.md").exists()


def test_real_subprocesses(zoo, tmp_path):
    runner = scale.Runner("exec", timeout=600, logs=tmp_path)
    m = runner.child("read-pass", zoo.base, zoo.task(0))
    assert m.ok and m.peak_rss_bytes > 10 * 2**20, m.stderr
    assert json.loads(m.stdout)["tensors"] == 2 * len(TINY.tensors)
    # a child's peak RSS is its own, not this process's (which a plain fork would hand down)
    ballast = torch.ones(256 * 2**20 // 4)
    bare = runner.run(["-S", "-c", "pass"])
    assert bare.ok and 0 < bare.peak_rss_bytes < 128 * 2**20 and ballast.sum() > 0
    slow = scale.Runner("exec", timeout=0.2, logs=tmp_path).child("read-pass", zoo.base)  # importing torch takes longer
    assert slow.timed_out and slow.rc is None and slow.status("read pass")["timed_out"]


def test_ratio_and_expression():
    t = {"timed_out": True, "timeout_s": 5}
    assert scale.ratio(6.0, 2.0) == 3.0
    assert scale.ratio(t, 2.0) is t and scale.ratio(2.0, t) is t
    assert scale.ratio(None, 2.0)["skipped"]
    names = [scale.task_name(i) for i in range(9)]
    expr = scale.compose_expression(names)
    assert expr == "0.7*t00 - 0.3*t01 + 0.5*t02 + 1*t03 - 1*t04 + 0.25*t05 + 0.4*t06 - 0.6*t07"
    from tvbase.arithmetic import parse_expression

    assert len(parse_expression(expr, known=names)) == 8


def test_compute_floor_counts_the_products_of_ingest_and_get(zoo, tmp_path):
    from benchmarks import compute_floor

    r = compute_floor.run(zoo.root, 2)
    assert r["params_per_task"] == TINY.n_params and r["gemm_flops_per_s"] > 0
    # a get multiplies factors of rank >= 1 into every matrix: at least 2 m n FLOPs each
    matrices = [shape for _, shape, kind in TINY.tensors if len(shape) == 2]
    assert r["get"]["matmul_flops"] >= sum(2 * m * n for m, n in matrices)
    # the fit multiplies every matrix of every task by sketches of many columns, a get only once
    assert r["ingest"]["matmul_flops"] > 2 * r["get"]["matmul_flops"]
    assert r["ingest"]["floor_s"] == pytest.approx(r["ingest"]["matmul_flops"] / r["gemm_flops_per_s"])
    assert "| ingest |" in compute_floor.table(r, "cmd") and "| get |" in compute_floor.table(r, "cmd")
    with pytest.raises(SystemExit, match="lacks"):
        compute_floor.run(zoo.root, 99)


def test_later_task_benchmark_compares_at_the_joint_fits_bytes(cache, zoo, tmp_path):
    """``benchmarks.later_task`` on the tiny layout: the joint fit, then the later task at the
    default budget and again at the joint fit's bytes, each method, written as JSON and markdown."""
    from benchmarks import later_task

    assert later_task.main(["--layout", "tiny", "--tasks", "3", "--methods", "tvbase", "svd", "--cache", str(cache),
                            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "later_task.json").read_text())
    (joint,) = result["joint"]
    assert joint["later_task"] == "t03" and joint["bytes"] > 0 and 0 < joint["rel_error"] < 1
    rows = result["later"]
    assert [(r["method"], r["kind"]) for r in rows] == [("tvbase", "projected")] * 2 + [("svd", "svd")] * 2
    for default, equal in (rows[0:2], rows[2:4]):
        assert default["budget"] == 0.03 and equal["budget"] != 0.03
        assert abs(equal["bytes"] / joint["bytes"] - 1) < 0.05  # the budget that aimed at the joint fit's bytes
        assert equal["error_ratio"] == pytest.approx(equal["rel_error"] / joint["rel_error"])
    table = (tmp_path / "out" / "later_task.md").read_text()
    assert table.count("| t03 |") == 5 and "joint fit" in table


def test_rebuild_bandwidth_compares_the_bytes_written_with_a_plain_copy(zoo, tmp_path):
    from benchmarks import rebuild_bandwidth
    from tvbase import Store

    out = tmp_path / "out"
    assert rebuild_bandwidth.main(["--zoo", str(zoo.root), "--tasks", "2", "--task", "t01", "--device", "cpu",
                                   "--repeat", "1", "--out", str(out)]) == 0
    r = json.loads((out / "rebuild_bandwidth.json").read_text())
    assert r["task"] == "t01" and r["device"] == "cpu" and r["tensors"] == len(TINY.tensors)
    assert r["bytes_written"] == 4 * TINY.n_params  # every tensor rebuilt whole, as float32
    for key in ("device_s", "from_store_s", "copy_bytes_per_s", "fill_bytes_per_s"):
        assert r[key] > 0
    assert r["device_bytes_per_s"] == pytest.approx(r["bytes_written"] / r["device_s"])
    assert r["device_over_copy"] == pytest.approx(r["device_bytes_per_s"] / r["copy_bytes_per_s"])
    assert r["tasks_ingested"] == 2 and r["ingest_over_read_pass"] == pytest.approx(r["ingest_s"] / r["read_pass_s"])
    table = (out / "rebuild_bandwidth.md").read_text()
    assert "| rebuild on the device (factors read) |" in table and "| rebuild from the store |" in table and "plain read pass" in table
    store_dir = tmp_path / "s.tvb"
    Store.create(store_dir, zoo.base).ingest({"t00": zoo.task(0)}, progress=False)
    with pytest.raises(SystemExit, match="no task 'nope'"):
        rebuild_bandwidth.main(["--store", str(store_dir), "--task", "nope", "--out", str(out)])


def test_device_check_script_refuses_clearly_without_its_wheels(tmp_path):
    """The one-shot GPU script: a usage line for an unknown step, and a clear refusal, before
    any work, where the wheels it installs on the GPU machine were not carried."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "repo"
    (copy / "benchmarks").mkdir(parents=True)
    shutil.copy(root / "benchmarks" / "device_check.sh", copy / "benchmarks")
    script = str(copy / "benchmarks" / "device_check.sh")
    usage = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: bash benchmarks/device_check.sh prepare|run" in usage.stderr
    out = tmp_path / "out"
    run = subprocess.run(["bash", script, "run"], capture_output=True, text=True, env={**os.environ, "OUT": str(out)})
    assert run.returncode == 2 and "no wheels in .whl" in run.stdout + run.stderr
    assert not (out / "pytest.txt").exists()  # nothing ran
