"""Reliability (issue 6): SIGKILLed writers, concurrent readers, damaged stores.

Short versions of ``benchmarks/reliability.py`` (which holds the harness and documents it). To
stay fast, tvbase commands run in processes forked from a server that has already imported torch
(``launcher="fork"``): separate, SIGKILL-able processes running ``tvbase.cli.main``, without the
~2 s start-up; one test per experiment uses a real ``python -m tvbase.cli`` subprocess.
"""

import os
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks`

from benchmarks import reliability as rel  # noqa: E402
from tvbase.errors import TvbaseError  # noqa: E402
from tvbase.store import Store  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork, flock and SIGKILL")

FAST = "fork"


# -- crash safety ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory):
    return rel.prepare_crash(tmp_path_factory.mktemp("crash"), launcher=FAST)


def test_sigkill_at_random_points_loses_nothing(crash_setup, tmp_path):
    """20 seeded kills over ingest (first and later), rm and compact x 4 kill points."""
    _, results = rel.crash_trials(tmp_path, 20, seed=6, setup=crash_setup, launcher=FAST, workers=2)
    failures = [(r["op"], r["mode"], r["seed"], r["problems"]) for r in results if r["problems"]]
    assert not failures
    assert {(r["op"], r["mode"]) for r in results} == {(op, mode) for op in crash_setup.ops for mode in rel.KILL_MODES}
    assert not [t for r in results for t in r["lost"]]
    killed = [r for r in results if r["killed"]]
    assert len(killed) >= 10, f"only {len(killed)} of 20 operations were still running when killed"
    # both sides of the commit point were hit by kills
    assert {r["outcome"] for r in killed} == {"committed", "rolled back"}
    assert any(r["died_holding_lock"] for r in results)  # and the next writer took the lock over
    assert all(r["new_writer"] == "ok" for r in results)


def test_real_tvbase_process_killed_after_commit(crash_setup, tmp_path):
    """The same checks with a real `python -m tvbase.cli` subprocess (fork-free path)."""
    result = rel.crash_trial(crash_setup, "rm", "commit", seed=1, workdir=tmp_path, launcher="exec", cli_verify=False)
    assert not result["problems"]
    assert result["outcome"] == "committed"
    result = rel.crash_trial(crash_setup, "ingest", "write", seed=2, workdir=tmp_path, launcher="exec")
    assert not result["problems"]  # killed mid-write (or, on a fast machine, just after the commit)


# -- concurrency -------------------------------------------------------------------------------------
def test_concurrent_readers_only_see_committed_versions(crash_setup, tmp_path):
    steps = [[("ingest", "t4")], [("rm", "t0")], [("compact",)], [("ingest", "t5"), ("ingest", "t6")]]
    result = rel.concurrency_run(tmp_path, crash_setup.zoo, readers=3, steps=steps, pause=0.02, launcher=FAST)
    assert not result["problems"]
    assert result["inconsistent_reads"] == 0 and result["n_read_errors"] == 0
    assert [s["rc"] for s in result["steps"]] == [0] * 5  # incl. two writers at once, both with --wait
    assert result["reads"] >= 20
    assert result["versions_seen"] >= 2, "the readers did not overlap the writer"
    assert sorted(Store.open(tmp_path / "concurrent").tasks) == ["t1", "t2", "t3", "t4", "t5", "t6"]
    assert result["read_rtol"] == rel.READ_RTOL and result["max_accepted_deviation"] <= rel.READ_RTOL


def test_read_check_flags_a_read_mixing_two_versions(crash_setup, tmp_path):
    """``check_reads`` (the concurrency check, under READ_RTOL) accepts honest reads rounded
    differently and flags torn reads: tensors of two versions, some of each, under one name."""
    path = tmp_path / "store"
    shutil.copytree(crash_setup.templates["grown"], path)  # t0-t3 (shared fit), then t4
    before_t4 = Store.open(path).log()[1]["id"]
    Store.open(path).compact(device=rel.DEVICE, progress=False)  # refits: the rebuilds move
    b = Store.open(path)
    a = Store.open(path, at=b.log()[1]["id"])
    coefficients = {"t4": 1.0, "t1": -0.5, "t2": 0.7}
    ta, tb = a.compose(coefficients, device=rel.DEVICE), b.compose(coefficients, device=rel.DEVICE)
    moved = {n: float((ta[n] - tb[n]).norm() / tb[n].norm()) for n in ta}
    changed = sorted((n for n in moved if moved[n] > 0), key=moved.get)
    assert len(changed) >= 2 and len(changed) < len(moved), moved  # some tensors move, dense ones do not
    assert moved[changed[0]] > 10 * rel.READ_RTOL, "the versions must differ by more than rounding"

    def record(store, tensors, kind="compose", coef=coefficients):
        return {"version": store.version, "kind": kind, "coefficients": coef, "signature": rel.signature(tensors)}

    threads = torch.get_num_threads()
    try:  # honest reads from a process with another BLAS thread count
        torch.set_num_threads(1)
        one_thread = {s.version: s.compose(coefficients, device=rel.DEVICE) for s in (a, b)}
        got_t4 = b.get("t4", device=rel.DEVICE)
    finally:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    rounded = {n: t * (1 + 1e-6 * torch.randn(t.shape, generator=gen)) for n, t in ta.items()}  # 1e-6 noise
    honest = [record(a, ta), record(b, tb), record(a, one_thread[a.version]), record(b, one_thread[b.version]),
              record(a, rounded), record(b, got_t4, "get", {"t4": 1.0})]
    assert rel.check_reads(path, honest) == []

    torn = [
        record(a, {**ta, changed[0]: tb[changed[0]]}),  # version A's read, its least-moved tensor from B
        record(b, {**tb, changed[0]: ta[changed[0]]}),  # and the reverse
        record(a, {n: (ta if i % 2 else tb)[n] for i, n in enumerate(ta)}),  # every other tensor from B
        record(a, tb),  # all of B under A's name: a stale version id
        record(a, {n: ta[n] for n in ta if n != changed[-1]}),  # a tensor missing
        {**record(a, ta), "version": before_t4},  # claims a version without t4
        {**record(a, ta), "version": "0" * 20},  # claims a version that was never committed
    ]
    bad, deviations = rel.check_reads(path, honest + torn, with_deviations=True)
    assert [d > rel.READ_RTOL for d in deviations] == [False] * len(honest) + [True] * len(torn)
    assert len(bad) == len(torn) and all(r["deviation"] > rel.READ_RTOL for r in bad)
    assert max(deviations[: len(honest)]) < rel.READ_RTOL / 10  # rounding stays far below the tolerance
    assert min(deviations[len(honest):]) > 10 * rel.READ_RTOL  # a torn read stays far above it
    assert "NotFoundError" in bad[-2]["error"] and bad[-1]["error"] == "not a committed version"


def test_second_writer_is_refused_then_waits(crash_setup, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(crash_setup.templates["grown"], store)
    result = rel.lock_contention(store, "t4", hold=5.0, launcher=FAST)
    assert not result["problems"]
    assert result["refused_rc"] == 8 and "store is locked by" in result["refused_message"]
    assert result["waiting_rc"] == 0 and result["waited_until_release"]
    assert result["after_holder_killed_rc"] == 0  # the dead holder's lock is taken over
    assert sorted(Store.open(store).tasks) == ["t1", "t2", "t3"]


def test_compact_does_not_revert_a_replacement_committed_during_its_fit(crash_setup, tmp_path, monkeypatch):
    from tvbase.methods.tucker import ClusterTucker

    zoo = crash_setup.zoo
    path = tmp_path / "store"
    rel.make_store(path, zoo, ingests=[rel.FIRST])
    real_fit, replaced = ClusterTucker.fit, {}

    def fit_while_another_writer_commits(*args, **kwargs):
        if not replaced:  # the compaction's fit: another writer replaces t1 meanwhile
            replaced["t1"] = None
            other = Store.open(path)
            other.rm(["t1"])
            other.ingest({"t1": zoo.tasks["t6"]}, device=rel.DEVICE, progress=False)
            replaced["t1"] = other.get("t1", device=rel.DEVICE)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(ClusterTucker, "fit", fit_while_another_writer_commits)
    try:
        Store.open(path).compact(device=rel.DEVICE, progress=False)
    except TvbaseError:
        return  # refusing is correct
    after = Store.open(path).get("t1", device=rel.DEVICE)
    err = max(float((after[n] - replaced["t1"][n]).abs().max() / replaced["t1"][n].abs().max()) for n in after)
    assert err < 0.25, f"after compact t1 is {err:.2f} (max rel.) away from the t1 another writer committed"


# -- integrity ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def integrity_setup(tmp_path_factory):
    return rel.prepare_integrity(tmp_path_factory.mktemp("integrity"))


@pytest.fixture
def damaged(integrity_setup, tmp_path):
    """A private copy of the multi-chunk store; returns (path, chunk map, {task: tensors})."""
    template, (_, truth) = integrity_setup
    path = tmp_path / "store"
    shutil.copytree(template, path)
    return path, rel.chunk_map(path), truth


def test_integrity_store_spans_several_payload_chunks(integrity_setup):
    template, _ = integrity_setup
    kinds = [w for w in rel.chunk_map(template).values()]
    assert sum(k[0] == "payload" for k in kinds) >= 3 and ("index", 0) in kinds
    assert any(k[0] == "other" for k in kinds)  # chunks only older versions use


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_flipped_payload_byte_is_detected_and_named(integrity_setup, tmp_path, seed):
    template, before = integrity_setup
    result = rel.integrity_trial(template, before, "payload-flip", seed, tmp_path)
    assert not result["problems"]
    assert result["verify_rc"] == 6
    assert result["named"] == result["affected"] and result["affected"]
    assert set(result["affected"]) < set(before[1]), "one damaged chunk should not affect every task"
    assert {t for t, c in result["get_rc"].items() if c == 6} == set(result["affected"])
    assert not result["wrong_numbers"]


def test_flipped_index_byte_is_detected(integrity_setup, tmp_path):
    template, before = integrity_setup
    result = rel.integrity_trial(template, before, "index-flip", 4, tmp_path)
    assert not result["problems"]
    assert result["verify_rc"] == 6 and set(result["get_rc"].values()) == {6}
    assert result["outcome"] == "detected"


def test_damage_to_an_old_version_only_spares_the_head(integrity_setup, tmp_path):
    template, before = integrity_setup
    result = rel.integrity_trial(template, before, "stale-chunk-flip", 5, tmp_path)
    assert not result["problems"]
    assert result["verify_rc"] == 0 and set(result["get_rc"].values()) == {0}
    assert result["old_verify_rc"] and set(result["old_verify_rc"].values()) == {6}  # older versions using the chunk fail


def test_real_tvbase_get_and_verify_exit_6_on_a_flipped_byte(damaged):
    path, chunks, truth = damaged
    f = next(f for f, w in chunks.items() if w == ("payload", 0))
    rel._flip(f, random.Random(0))
    affected = rel.affected_tasks(Store.open(path), "payload", 0)
    task = sorted(affected)[0]
    got = rel.tvbase("get", path, task, "-o", path.parent / "out.safetensors", "--device", "cpu")
    assert got.returncode == 6, got.stderr
    assert "checksum" in got.stderr and "Traceback" not in got.stderr
    assert not (path.parent / "out.safetensors").exists()
    verify = rel.tvbase("verify", path, launcher=FAST)
    assert verify.returncode == 6
    assert rel._named(verify.stdout, truth) == affected


def _truncate_half(path, chunks):
    f = next(f for f, w in chunks.items() if w == ("payload", 0))
    os.truncate(f, f.stat().st_size // 2)


def _delete(path, chunks):
    next(f for f, w in chunks.items() if w == ("payload", 0)).unlink()


def _garble_manifest(path, chunks):
    for f in (path / "repo" / "manifests").iterdir():
        data = bytearray(f.read_bytes())
        data[len(data) // 2:] = bytes(len(data) - len(data) // 2)  # zero the second half
        f.write_bytes(bytes(data))


def _garble_snapshot(path, chunks):
    f = path / "repo" / "snapshots" / Store.open(path).version
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_truncate_half, _delete, _garble_manifest, _garble_snapshot],
                         ids=["truncated-chunk", "missing-chunk", "damaged-manifest", "damaged-snapshot"])
def test_storage_damage_gives_exit_6(damaged, damage):
    path, chunks, truth = damaged
    damage(path, chunks)
    code, _, err = rel.call_cli("verify", path)
    assert code == 6, err
    for task in truth:
        code, _, err = rel.call_cli("get", path, task, "-o", path.parent / "out.safetensors")
        assert code in (0, 6), err  # 0 only for tasks untouched by the damage


def test_storage_damage_never_returns_wrong_numbers(damaged):
    """Whatever the exit code, a damaged store never hands out different tensors."""
    path, chunks, truth = damaged
    _truncate_half(path, chunks)
    for task in truth:
        out = path.parent / f"{task}.safetensors"
        code, _, _ = rel.call_cli("get", path, task, "-o", out)
        if code == 0:
            from safetensors.torch import load_file

            got = load_file(out)
            assert all(torch.equal(got[n], truth[task][n]) for n in truth[task])


def test_metadata_bit_rot_never_returns_wrong_numbers(damaged):
    path, _, _ = damaged
    rel.edit_snapshot(path, Store.open(path).version, lambda body: re.sub(rb'("t4": \{\s*"id": )4,', rb"\g<1>5,", body))
    out = path.parent / "t4.safetensors"
    code, _, err = rel.call_cli("get", path, "t4", "-o", out)
    assert code == 6, f"exit {code}: {err}"  # the metadata digest no longer matches
    assert "checksum" in err and not out.exists()


# -- the benchmark's report --------------------------------------------------------------------------
def test_report_rewrites_only_its_section(tmp_path):
    crash = [{"op": "rm", "mode": "commit", "seed": 1, "problems": [], "killed": True, "outcome": "committed", "lost": []}]
    conc = {"readers": 2, "reads": 10, "writer_operations": 1, "versions_seen": 2, "versions_committed": 3,
            "inconsistent_reads": 0, "n_read_errors": 0, "problems": []}
    lock = {"refused_rc": 8, "waiting_rc": 0, "after_holder_killed_rc": 0, "problems": []}
    integ = [{"kind": "payload-flip", "problems": [], "outcome": "detected", "clean_errors": True, "wrong_numbers": []}]
    summary = rel.summarize(crash, conc, lock, integ)
    summary.update(command="python -m benchmarks.reliability --trials 1", date="2026-01-01T00:00:00+00:00",
                   wall_seconds=1.0, environment={"cpus": 2, "device": "cpu", "torch": "x", "icechunk": "y", "zarr": "z"})
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\n\nbefore\n\n{rel.MARK_START}\nold text\n{rel.MARK_END}\n\nafter\n")
    rel.write_report(summary, tmp_path / "results", md)
    text = md.read_text()
    assert text.startswith("# Results\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old text" not in text and text.count(rel.MARK_START) == 1
    assert "--trials 1" in text and "| data lost" in text
    assert (tmp_path / "results" / "reliability.json").exists()
    rel.write_report(summary, tmp_path / "results", md)  # idempotent
    assert md.read_text() == text
    fresh = tmp_path / "NEW.md"
    rel.write_report(summary, tmp_path / "results", fresh)  # no section yet: appended
    assert rel.MARK_START in fresh.read_text()


def test_forked_process_reports_its_own_exit_when_the_fork_server_loses_it(tmp_path):
    """The fork server answers 255 when it loses a child's status; the harness then trusts the
    child's own ``.rc`` file, or our SIGKILL, and keeps 255 (a reported failure) otherwise."""
    proc = rel.TvbaseProcess(["--version"], launcher="fork", logs=tmp_path / "version")
    assert proc.wait(120) == 0 and proc.rc_path.read_text() == "0"

    class LostStatus:  # the finished process, as the fork server reports it when it loses the status
        exitcode = 255

        def join(self, timeout=None):
            pass

    proc._proc = LostStatus()
    assert proc.poll() == 0  # what the child wrote
    proc.rc_path.unlink()
    assert proc.wait() == 255  # no word from the child, not killed by us: a failure
    proc.killed = True  # as kill() records it (not sent: the pid may belong to another process by now)
    assert proc.wait() == -9
