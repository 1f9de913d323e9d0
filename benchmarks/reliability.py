"""Reliability harness: crash safety, concurrent readers, corruption detection.

    python -m benchmarks.reliability [--trials 60] [--readers 4] [--corruptions 12] [--out benchmarks/results]

Three experiments on a tiny synthetic zoo (seeded; a base of a few thousand parameters and
fine-tunes in two families whose task vectors are low rank plus noise):

1. **Crash safety.** ``tvbase ingest`` (first, shared fit, and later, per-task SVD), ``rm`` and
   ``compact`` run as subprocesses and are killed with SIGKILL at a seeded point: after a random
   delay in [0, clean duration], as soon as the first new object lands in the repository
   (mid-write), as soon as a new snapshot file appears (between snapshot and branch update), or
   as soon as the branch moves (between commit and exit). After every kill the store must open
   and verify, every task committed before must rebuild as before (to ``READ_RTOL``), the
   interrupted operation must be wholly there (equal to a clean run of it: ingest and compact are
   deterministic) or wholly absent, and a new writer must succeed without manual cleanup.
2. **Concurrency.** Reader processes open the store, rebuild and compose in a loop while one
   writer ingests, removes and compacts (two writers at once in one step). Every read records
   (version, what, a signature of the tensors: sums, norms, seeded random projections);
   afterwards each is recomputed from that version and must match it to ``READ_RTOL`` (1e-4
   relative, see ``check_reads``: the reader and this process may round differently, a read
   from another version is off by 1e-2 or more). A second writer is refused while the lock is
   held (exit 8, naming the holder's pid) and, with ``--wait``, waits and succeeds.
3. **Integrity.** One byte of a live payload or index chunk is flipped, a chunk file truncated or
   deleted, a manifest or snapshot damaged, a chunk only an old version uses flipped: ``tvbase
   verify`` must exit 6 naming exactly the affected tasks, and ``tvbase get`` of every task must
   either fail with exit 6 or return exactly the numbers from before. Never wrong numbers.

Results go to ``OUT/reliability.json`` and to the section between ``<!-- reliability:start -->``
and ``<!-- reliability:end -->`` of ``benchmarks/RESULTS.md`` (only that section is rewritten).
``run(...)`` runs everything and returns the summary; ``tests/test_reliability.py`` calls the
pieces with small numbers.
"""

import argparse
import contextlib
import datetime as _dt
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tvbase.bench.report import markers, replace_section
from tvbase.testing.metrics import relative_error
from tvbase.testing.zoo import SyntheticZoo, build_synthetic_zoo

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"
MARK_START, MARK_END = markers("reliability")

# Everything runs on the CPU. Rebuilds are compared under READ_RTOL (see below), whether made in
# this process (crash safety) or by others (concurrency).
DEVICE = "cpu"
TVBASE = [sys.executable, "-m", "tvbase.cli"]

# -- the zoo -------------------------------------------------------------------------------------
# A tiny base: 2-D weights (factorized), a bias and a norm (stored densely). The tiny model's dense
# tensors alone cost several % of raw, hence the large budget.
SHAPES = {
    "embed.weight": (40, 16),
    "blocks.0.attn.weight": (24, 16),
    "blocks.0.mlp.weight": (32, 24),
    "blocks.0.mlp.bias": (32,),
    "norm.weight": (16,),
    "head.weight": (10, 16),
}
BUDGET = "50%"
CLUSTERS = 2
RANK, DELTA, NOISE = 3, 0.05, 0.002


Zoo = SyntheticZoo  # root, base, tasks (name -> path, in order), tensors; items(names) for the CLI


def build_zoo(root, n_tasks=8, seed=0, wide=0):
    """Write a base and ``n_tasks`` fine-tunes (``t0``, ``t1``, ...; even/odd = two families).

    ``wide`` > 0 adds a 1-D tensor of that many entries (stored densely, about one byte per entry
    per task), so that a store spans several 2 MiB payload chunks.
    """
    shapes = dict(SHAPES, **({"wide.scale": (wide,)} if wide else {}))
    families = {f"t{i}": i % 2 for i in range(n_tasks)}
    return build_synthetic_zoo(root, shapes, families, n_families=2, seed=seed, rank=RANK, delta_scale=DELTA, noise_scale=NOISE)


def make_store(path, zoo, ingests=(), removes=(), methods=None):
    """Create a store (budget 50%, 2 clusters, int8 dense tensors) and apply ingests (lists of task
    names, each with its method from ``methods``, default tvbase's) and removes."""
    from tvbase.methods import FitParams
    from tvbase.store import Store

    store = Store.create(path, zoo.base, params=FitParams(budget=0.5, dense_bits=8, n_clusters=CLUSTERS))
    for names, method in zip(ingests, methods or ["tvbase"] * len(ingests)):
        store.ingest({n: zoo.tasks[n] for n in names}, device=DEVICE, progress=False, method=method)
    for name in removes:
        store.rm([name])
    return store


# -- helpers -------------------------------------------------------------------------------------
# A read made in another process is compared with its recomputation here under a tolerance, not
# bit for bit: the two processes may run BLAS with different thread counts (or MKL may use fewer
# threads on a loaded machine), so a float32 rebuild can differ in its last bits although the
# store gave both the same factors. Measured on the concurrency store (its compact included):
# honest rebuilds at 1 and 2 threads differ by <= 3e-8 relative (Frobenius, per tensor); every
# float32 rebuild with another summation order should stay within ~1e-6. A read from another
# version differs far more: a compact refit moves a task's factorized tensors by 1e-2 to 1.5e-1
# relative, a missing or extra task by ~1 (ingest and rm leave the other tasks' factors
# bit-identical, so only such changes can show). 1e-4 sits two decades above the float noise
# (1e-6) and two below the smallest real change (1e-2): it absorbs summation order and still
# flags a read that took even one tensor from the wrong version.
READ_RTOL = 1e-4
SKETCH_DIM = 16  # random projections per tensor (a Johnson-Lindenstrauss sketch, see signature)
SKETCH_SEED = 0
_sketches = {}


def _sketch_matrix(n):
    """(SKETCH_DIM, n) float64 Gaussian matrix / sqrt(SKETCH_DIM), the same in every process."""
    if n not in _sketches:
        rng = np.random.default_rng([SKETCH_SEED, n])
        _sketches[n] = rng.standard_normal((SKETCH_DIM, n)) / math.sqrt(SKETCH_DIM)
    return _sketches[n]


def signature(tensors):
    """A compact, tolerance-comparable summary of a {name: tensor} dict (JSON-serialisable).

    Per tensor: dtype, shape, float64 sum, float64 norm and a sketch ``S x`` of the flattened
    tensor by a fixed seeded Gaussian ``S`` (``SKETCH_DIM`` rows, scaled so that
    E ||S d||^2 = ||d||^2): the sketch of a difference has about the norm of the difference, so
    comparing sketches compares the tensors (``deviation``), whatever entries differ.
    """
    out = {}
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        x = t.to(torch.float64).reshape(-1).numpy()
        out[name] = {
            "dtype": str(t.dtype),
            "shape": list(t.shape),
            "sum": float(x.sum()),
            "norm": float(np.linalg.norm(x)),
            "sketch": (_sketch_matrix(x.size) @ x).tolist() if x.size else [],
        }
    return out


def deviation(sig, truth):
    """How far signature ``sig`` is from signature ``truth``: the largest, over tensors, of the
    component differences relative to the truth tensor's norm ``||x||``. ``inf`` when tensor
    names, dtypes or shapes differ or a component is not finite.

    Each component is scaled so that a read ``x + d`` gives at most about ``||d|| / ||x||``:
    |d norm| <= ||d||, |d sum| <= sqrt(n) ||d|| (so the sum is divided by sqrt(n)), and
    ||S d|| ~ ||d|| (the sketch). A value <= ``READ_RTOL`` therefore means "the same tensors up
    to float rounding"; a value above it, tensors that differ. (Relative to the result: a
    composition that cancelled almost to zero would amplify rounding; the harness composes
    distinct tasks with coefficients of at least 0.5, which do not.)
    """
    if sorted(sig) != sorted(truth):
        return math.inf
    worst = 0.0
    for name, t in truth.items():
        s = sig[name]
        if s["dtype"] != t["dtype"] or list(s["shape"]) != list(t["shape"]) or len(s["sketch"]) != len(t["sketch"]):
            return math.inf
        n = math.prod(t["shape"])
        scale = t["norm"]
        diffs = [abs(s["norm"] - t["norm"]), abs(s["sum"] - t["sum"]) / math.sqrt(max(n, 1)),
                 float(np.linalg.norm(np.subtract(s["sketch"], t["sketch"]))) if n else 0.0]
        if not all(math.isfinite(v) for v in [*diffs, s["norm"], s["sum"]]):
            return math.inf
        for d in diffs:
            if d:  # a zero truth tensor: only an exact zero is the same
                worst = max(worst, d / scale if scale else math.inf)
    return worst


def rebuild_all(path, at=None):
    """(version, {task: {tensor: tensor}}) of the store at ``path``."""
    from tvbase.store import Store

    store = Store.open(path, at=at)
    return store.version, {t: store.get(t, device=DEVICE) for t in store.tasks}


def same_tensors(a, b):
    """True when two {task: {tensor: tensor}} dicts hold the same tasks, and tensors of equal
    names, dtypes and shapes within ``READ_RTOL`` of each other (relative Frobenius): even in one
    process, concurrent trials and MKL's dynamic threads run a product at other thread counts,
    and one product over every factor of a matrix then sums in another order."""
    if sorted(a) != sorted(b):
        return False
    return all(sorted(a[t]) == sorted(b[t]) and all(_close(a[t][n], b[t][n]) for n in a[t]) for t in a)


def _close(x, y):
    return x.dtype == y.dtype and x.shape == y.shape and relative_error(x, y) <= READ_RTOL


def differing(a, b):
    """Names of tasks in both dicts whose rebuilds differ (beyond float rounding, ``READ_RTOL``)."""
    return sorted(t for t in set(a) & set(b) if not same_tensors({t: a[t]}, {t: b[t]}))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    return env


def call_cli(*args):
    """Run ``tvbase.cli.main`` in this process: (exit code, stdout, stderr).

    An exception that escapes ``main`` (a traceback, exit 1 in a real process) gives code
    ``"crash"`` and the exception in stderr. Not thread safe (it swaps sys.stdout/stderr).
    """
    from tvbase.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            code = e.code
        except Exception as e:  # noqa: BLE001 -- a traceback is what we want to record
            code = "crash"
            err.write(f"{type(e).__module__}.{type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")
    return code, out.getvalue(), err.getvalue()


# -- launching tvbase processes ------------------------------------------------------------------
# "exec": a real `python -m tvbase.cli ...` subprocess (what the heavy benchmark uses). "fork": a
# process forked from a fork server that has already imported torch and tvbase, running
# `tvbase.cli.main(argv)`; it is as separate and as killable, and skips the ~2 s interpreter and
# torch start-up (what the tests use to stay fast).
# tvbase imports torch lazily, so the server preloads what a write command will import
_PRELOAD = ["tvbase.cli", "tvbase.store", "tvbase.io.sources", "tvbase.arithmetic", "tvbase.operations", "tvbase.methods.tucker", "tvbase.reconstruct", "torch", "icechunk", "zarr", "benchmarks.reliability"]
_fork_context = None


def fork_context():
    """The multiprocessing fork-server context, its server preloaded with torch and tvbase."""
    global _fork_context
    if _fork_context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _fork_context = ctx
    return _fork_context


def _cli_child(argv, out_path, err_path, rc_path):
    """Body of a forked tvbase process: ``tvbase ARGV`` with stdout/stderr in files, and its exit
    code in ``rc_path`` as well (see ``TvbaseProcess._forked_exitcode``)."""
    sys.stdout = open(out_path, "w", buffering=1)
    sys.stderr = open(err_path, "w", buffering=1)
    sys.argv = ["tvbase", *argv]
    from tvbase.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's --help, --version and usage errors
        code = e.code
    code = 0 if code is None else code if isinstance(code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    Path(rc_path).write_text(str(code))
    sys.exit(code)


class TvbaseProcess:
    """A running ``tvbase`` command: ``pid``, ``poll()``, ``kill()`` (SIGKILL), ``wait()``.

    Exit codes follow subprocess: ``-9`` when killed by SIGKILL.
    """

    def __init__(self, args, launcher="exec", logs=None):
        args = [str(a) for a in args]
        self._tmp = None
        if logs is None:
            self._tmp = tempfile.mkdtemp(prefix="tvbase-proc-")
            logs = Path(self._tmp) / "log"
        self.out_path, self.err_path = Path(f"{logs}.stdout"), Path(f"{logs}.stderr")
        self.rc_path, self.killed = Path(f"{logs}.rc"), False
        if launcher == "exec":
            with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
                self._proc = subprocess.Popen([*TVBASE, *args], stdout=out, stderr=err, env=_env())
            self.pid = self._proc.pid
        elif launcher == "fork":
            self._proc = fork_context().Process(target=_cli_child, args=(args, str(self.out_path), str(self.err_path), str(self.rc_path)))
            self._proc.start()
            self.pid = self._proc.pid
        else:
            raise ValueError(f"unknown launcher {launcher!r}; use 'exec' or 'fork'")

    def poll(self):
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.poll()
        return self._forked_exitcode()

    def kill(self):
        self.killed = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout=None):
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.wait(timeout)
        self._proc.join(timeout)
        return self._forked_exitcode()

    def _forked_exitcode(self):
        """The forked child's exit code. The fork server reports 255 when it loses the child's
        status (CPython's popen_forkserver: "perhaps the forkserver process itself got killed");
        the child then says for itself, in ``.rc``, how it ended, and no file after our SIGKILL
        means the kill ended it. Without either, 255 stands and is reported as a failure."""
        code = self._proc.exitcode
        if code != 255:
            return code
        if self.rc_path.exists():
            return int(self.rc_path.read_text())
        return -signal.SIGKILL if self.killed else code

    def output(self):
        """(stdout, stderr) text."""
        return tuple(p.read_text(errors="replace") if p.exists() else "" for p in (self.out_path, self.err_path))

    def cleanup(self):
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def tvbase(*args, launcher="exec", timeout=600):
    """Run ``tvbase ARGS`` to the end: CompletedProcess with text stdout and stderr."""
    proc = TvbaseProcess(args, launcher)
    try:
        rc = proc.wait(timeout)
        out, err = proc.output()
    finally:
        proc.cleanup()
    return subprocess.CompletedProcess([*TVBASE, *map(str, args)], rc, out, err)


def _head_ref(path):
    ref = Path(path) / "repo" / "refs" / "branch.main" / "ref.json"
    try:
        return ref.read_bytes()
    except OSError:
        return b""


def _objects(path, dirs):
    out = set()
    for d in dirs:
        try:
            out.update(f"{d}/{name}" for name in os.listdir(Path(path) / "repo" / d))
        except FileNotFoundError:
            pass
    return out


# -- 1. crash safety -----------------------------------------------------------------------------
KILL_MODES = ("random", "write", "snapshot", "commit")
FIRST = ["t0", "t1", "t2", "t3"]  # the first (shared) ingest
LATER = "t4"  # ingested later as a per-task SVD


@dataclass
class Operation:
    """One write to interrupt: which template store it starts from and what a clean run gives."""

    name: str
    template: str  # key of CrashSetup.templates
    argv: list  # tvbase arguments; "{store}" stands for the store path
    clean: dict = field(default_factory=dict)  # task -> tensors after a clean run
    duration: float = 0.0  # seconds a clean run took (start-up included)

    def args(self, store):
        return [str(store) if a == "{store}" else a for a in self.argv]


@dataclass
class CrashSetup:
    zoo: Zoo
    templates: dict  # name -> store path (read only)
    before: dict  # template name -> (version, {task: tensors})
    ops: dict  # name -> Operation


def prepare_crash(workdir, zoo=None, workers=2, launcher="exec"):
    """Template stores, their rebuilds, and a clean (timed) CLI run of every operation."""
    workdir = Path(workdir)
    zoo = zoo or build_zoo(workdir / "zoo")
    templates = {
        "empty": make_store(workdir / "tpl-empty", zoo).path,
        "first": make_store(workdir / "tpl-first", zoo, ingests=[FIRST]).path,
        "grown": make_store(workdir / "tpl-grown", zoo, ingests=[FIRST, [LATER]]).path,
    }
    before = {name: rebuild_all(p) for name, p in templates.items()}
    ops = {
        "ingest-first": Operation("ingest-first", "empty", ["ingest", "{store}", "-q", "--device", DEVICE, *zoo.items(FIRST)]),
        "ingest": Operation("ingest", "first", ["ingest", "{store}", "-q", "--device", DEVICE, *zoo.items(["t5"])]),
        "rm": Operation("rm", "grown", ["rm", "{store}", "t1"]),
        "compact": Operation("compact", "grown", ["compact", "{store}", "-q", "--device", DEVICE]),
    }

    def clean(op):
        dest = workdir / f"clean-{op.name}"
        shutil.copytree(templates[op.template], dest)
        t0 = time.monotonic()
        r = tvbase(*op.args(dest), launcher=launcher)
        op.duration = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"clean run of {op.name} failed ({r.returncode}): {r.stderr[-2000:]}")
        _, op.clean = rebuild_all(dest)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(clean, ops.values()))
    return CrashSetup(zoo, templates, before, ops)


def crash_trial(setup, op_name, mode, seed, workdir, retry=True, cli_verify=False, launcher="exec"):
    """Run one operation, SIGKILL it per ``mode``, and check the store. Returns a result dict.

    ``problems`` lists every violated property (empty = the store survived). With ``retry`` an
    operation that was rolled back is run again by a new writer and must equal a clean run; an
    operation that committed is followed by a new writer's ``rm``.
    """
    from tvbase.store import Store

    op = setup.ops[op_name]
    rng = random.Random(seed)
    store = Path(workdir) / f"trial-{seed}-{op_name}-{mode}"
    shutil.copytree(setup.templates[op.template], store)
    before_version, before = setup.before[op.template]
    result = {"op": op_name, "mode": mode, "seed": seed, "problems": []}
    problems = result["problems"]

    # -- run and kill ------------------------------------------------------------------------
    ref0 = _head_ref(store)
    objects0 = _objects(store, ("chunks", "manifests", "snapshots", "transactions"))
    snapshots0 = _objects(store, ("snapshots",))
    triggers = {
        "write": lambda: _objects(store, ("chunks", "manifests", "snapshots", "transactions")) != objects0,
        "snapshot": lambda: _objects(store, ("snapshots",)) != snapshots0,
        "commit": lambda: _head_ref(store) != ref0,
    }
    delay = rng.uniform(0, op.duration) if mode == "random" else None
    t0 = time.monotonic()
    proc = TvbaseProcess(op.args(store), launcher, logs=store.parent / store.name)
    deadline = t0 + (delay if mode == "random" else 10 * op.duration + 60)
    while proc.poll() is None and time.monotonic() < deadline:
        if mode != "random" and triggers[mode]():
            break
        time.sleep(0.002 if mode == "random" else 0.0005)
    if proc.poll() is None:
        proc.kill()
    rc = proc.wait()
    result.update(delay=delay, elapsed=round(time.monotonic() - t0, 3), rc=rc, killed=rc == -signal.SIGKILL)
    # killed inside the transaction: the lock file still names the dead writer (the OS freed the lock)
    lock_file = store / "writer.lock"
    result["died_holding_lock"] = rc == -signal.SIGKILL and lock_file.exists() and f'"pid": {proc.pid},' in lock_file.read_text()
    if rc not in (0, -signal.SIGKILL):
        problems.append(f"the operation failed by itself with exit {rc}: {proc.output()[1][-800:]}")
        return result

    # -- the store after the kill -----------------------------------------------------------
    try:
        opened = Store.open(store)
    except Exception as e:  # noqa: BLE001
        problems.append(f"store does not open after the kill: {type(e).__name__}: {e}")
        result["lost"] = sorted(before)
        return result
    if cli_verify:
        r = tvbase("verify", store, launcher=launcher)
        if r.returncode != 0:
            problems.append(f"`tvbase verify` exits {r.returncode}: {r.stdout[-500:]} {r.stderr[-500:]}")
    else:
        report = opened.verify()
        if not report["ok"]:
            problems.append(f"verify fails: {report['problems']}")
    present = opened.version != before_version
    result["outcome"] = "committed" if present else "rolled back"
    if rc == 0 and not present:
        problems.append("the operation exited 0 but its commit is not on main")
    history = opened.log()
    if present:
        if len(history) < 2 or history[1]["id"] != before_version:
            problems.append(f"main moved by more than one commit: {[h['message'] for h in history[:3]]}")
        if history[0]["metadata"].get("op") != op.argv[0]:
            problems.append(f"the new commit is {history[0]['message']!r}, not {op.argv[0]}")
    _, now = rebuild_all(store)
    expected = op.clean if present else before
    if sorted(now) != sorted(expected):
        problems.append(f"task set {sorted(now)} is neither the before set {sorted(before)} nor the after set {sorted(op.clean)}")
    bad = differing(now, expected)
    if bad:
        problems.append(f"tasks {bad} differ from the {'clean run' if present else 'state before'}")
    # every task committed before still rebuilds, from the version it was committed in
    _, old = rebuild_all(store, at=before_version)
    lost = sorted(set(before) - set(old)) + differing(old, before)
    if not present:
        lost = sorted(set(lost) | (set(before) - set(now)) | set(differing(now, before)))
    result["lost"] = lost
    if lost:
        problems.append(f"committed tasks {lost} are lost or changed")

    # -- a new writer, without any cleanup --------------------------------------------------
    try:
        writer = Store.open(store)
        if not present and retry:
            if op.argv[0] == "ingest":
                names = [a.split("=", 1)[0] for a in op.argv if "=" in a]
                writer.ingest({n: setup.zoo.tasks[n] for n in names}, device=DEVICE, progress=False)
            elif op.argv[0] == "rm":
                writer.rm(op.argv[2:])
            else:
                writer.compact(device=DEVICE, progress=False)
            _, redo = rebuild_all(store)
            if not same_tensors(redo, op.clean):
                problems.append(f"re-running {op_name} after the kill differs from a clean run: {differing(redo, op.clean) or sorted(redo)}")
        else:
            victim = writer.tasks[-1]
            writer.rm([victim])
            if victim in Store.open(store).tasks:
                problems.append(f"a new writer's rm {victim} did not take effect")
        result["new_writer"] = "ok"
    except Exception as e:  # noqa: BLE001
        result["new_writer"] = f"{type(e).__name__}: {e}"
        problems.append(f"a new writer fails after the kill: {type(e).__name__}: {e}")
    return result


def crash_trials(workdir, trials, seed=0, workers=2, retry=True, cli_verify=False, setup=None, keep=False, launcher="exec"):
    """``trials`` kill trials cycling over (operation, kill mode); returns (setup, results)."""
    workdir = Path(workdir)
    setup = setup or prepare_crash(workdir, workers=workers, launcher=launcher)
    combos = [(op, mode) for mode in KILL_MODES for op in setup.ops]
    rng = random.Random(seed)
    plan = [(*combos[i % len(combos)], rng.randrange(2**31)) for i in range(trials)]

    def one(item):
        op, mode, s = item
        try:
            res = crash_trial(setup, op, mode, s, workdir, retry=retry, cli_verify=cli_verify, launcher=launcher)
        except Exception:  # noqa: BLE001 -- a harness error is a failed trial, reported
            res = {"op": op, "mode": mode, "seed": s, "problems": [f"harness error: {traceback.format_exc()[-1500:]}"], "lost": []}
        if not keep and not res["problems"]:
            for leftover in Path(workdir).glob(f"trial-{s}-{op}-{mode}*"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        return res

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, plan))
    return setup, results


# -- 2. concurrency ------------------------------------------------------------------------------
COEFFICIENTS = (1.0, 0.5, -0.5, 0.7, -1.0)


def _reader(path, seed, stop, ready, out_file, pause, history_share):
    """Reader process: open, read and sign (``signature``) in a loop until ``stop``; write the
    records (``check_reads`` describes them) to ``out_file``."""
    from tvbase.store import Store

    rng = random.Random(seed)
    records, errors = [], []
    announced = False
    while not stop.is_set():
        try:
            store = Store.open(path)
            if rng.random() < history_share:
                versions = [h["id"] for h in store.log()]
                store = Store.open(path, at=rng.choice(versions))
            tasks = store.tasks
            if tasks:
                if rng.random() < 0.5:
                    coefficients, kind = {rng.choice(tasks): 1.0}, "get"
                    tensors = store.get(next(iter(coefficients)), device=DEVICE)
                else:
                    picked = rng.sample(tasks, min(len(tasks), rng.choice((2, 3))))
                    coefficients, kind = {t: rng.choice(COEFFICIENTS) for t in picked}, "compose"
                    tensors = store.compose(coefficients, device=DEVICE)
                records.append({"version": store.version, "kind": kind, "coefficients": coefficients,
                                "signature": signature(tensors)})
        except Exception as e:  # noqa: BLE001 -- every failed read is a finding
            errors.append(f"{type(e).__name__}: {e}")
        if not announced:
            ready.put(seed)
            announced = True
        if pause:
            time.sleep(pause * rng.random())
    Path(out_file).write_text(json.dumps({"records": records, "errors": errors}))


def concurrency_run(workdir, zoo, readers=3, steps=None, pause=0.02, history_share=0.2, seed=0, launcher="exec"):
    """Readers against one writer (CLI subprocesses, one step after another; a step of several
    commands runs them at once, each with ``--wait``). Returns a result dict with ``problems``."""
    from tvbase.store import Store

    workdir = Path(workdir)
    store = workdir / "concurrent"
    make_store(store, zoo, ingests=[FIRST])
    names = list(zoo.tasks)
    if steps is None:
        steps = [[("ingest", names[4])], [("rm", names[0])], [("compact",)], [("ingest", names[5]), ("ingest", names[6])], [("rm", names[4])]]
    expected = set(FIRST)
    ctx = fork_context()  # readers start without re-importing torch
    stop, ready = ctx.Event(), ctx.Queue()
    outs = [workdir / f"reader-{i}.json" for i in range(readers)]
    procs = [ctx.Process(target=_reader, args=(str(store), seed * 1000 + i, stop, ready, str(outs[i]), pause, history_share)) for i in range(readers)]
    for p in procs:
        p.start()
    result = {"readers": readers, "problems": [], "steps": []}
    problems = result["problems"]
    try:
        for _ in procs:
            ready.get(timeout=300)
        t0 = time.monotonic()
        for step in steps:
            argvs = []
            for cmd in step:
                if cmd[0] == "ingest":
                    argvs.append(["ingest", store, "-q", "--device", DEVICE, "--wait", 120, f"{cmd[1]}={zoo.tasks[cmd[1]]}"])
                    expected.add(cmd[1])
                elif cmd[0] == "rm":
                    argvs.append(["rm", store, cmd[1], "--wait", 120])
                    expected.discard(cmd[1])
                else:
                    argvs.append(["compact", store, "-q", "--device", DEVICE, "--wait", 120])
            with ThreadPoolExecutor(len(argvs)) as pool:
                runs = list(pool.map(lambda a: tvbase(*a, launcher=launcher), argvs))
            for cmd, r in zip(step, runs):
                result["steps"].append({"command": " ".join(map(str, cmd)), "rc": r.returncode})
                if r.returncode != 0:
                    problems.append(f"writer step {' '.join(map(str, cmd))} exits {r.returncode}: {r.stderr[-800:]}")
        result["writer_seconds"] = round(time.monotonic() - t0, 2)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=300)
            if p.is_alive():
                p.kill()
                problems.append(f"reader {p.pid} did not stop")
    final = Store.open(store)
    if set(final.tasks) != expected:
        problems.append(f"after the writer the store holds {final.tasks}, expected {sorted(expected)}")
    committed = {h["id"] for h in final.log()}
    records, errors = [], []
    for out in outs:
        data = json.loads(out.read_text()) if out.exists() else {"records": [], "errors": ["reader wrote no results"]}
        records += data["records"]
        errors += data["errors"]
    inconsistent, deviations = check_reads(store, records, with_deviations=True)
    accepted = [d for d in deviations if d <= READ_RTOL]
    versions_seen = sorted({r["version"] for r in records})
    result.update(
        reads=len(records),
        read_errors=errors[:20],
        n_read_errors=len(errors),
        inconsistent_reads=len(inconsistent),
        inconsistent_examples=inconsistent[:10],
        read_rtol=READ_RTOL,
        # how far the accepted reads were from their recomputation: float rounding, 0 = same signature
        max_accepted_deviation=max(accepted, default=0.0),
        reads_off_by_rounding=sum(d > 0 for d in accepted),
        versions_seen=len(versions_seen),
        versions_committed=len(committed),
        writer_operations=sum(len(s) for s in steps),
    )
    if errors:
        problems.append(f"{len(errors)} reads failed, e.g. {errors[:3]}")
    if inconsistent:
        problems.append(f"{len(inconsistent)} reads match no committed version (to rel. {READ_RTOL:g}), e.g. {inconsistent[:3]}")
    return result


def check_reads(store_path, records, rtol=READ_RTOL, with_deviations=False):
    """The reads in ``records`` that the version they name does not give: a list of dicts.

    A record is a dict ``version`` (the snapshot id the reader had open), ``kind`` ("get" or
    "compose"), ``coefficients`` (task -> alpha, in the reader's order) and ``signature`` (of
    the tensors it got). Each distinct read is recomputed here from that version, in the same
    order, and accepted when ``deviation(signature, recomputed) <= rtol``. A read naming a
    version that is not on main, or one that version cannot give (an unknown task), is
    inconsistent too. Each returned dict holds the record's version, kind and coefficients,
    ``committed`` and ``deviation`` (``inf`` when not comparable) or ``error``. With
    ``with_deviations`` returns ``(inconsistent, deviation of every record)``.
    """
    from tvbase.store import Store

    committed = {h["id"] for h in Store.open(store_path).log()}
    truth, opened, inconsistent, deviations = {}, {}, [], []
    for r in records:
        version, kind, coefficients = r["version"], r["kind"], r["coefficients"]
        key = (version, kind, tuple(coefficients.items()))
        if key not in truth and version not in committed:
            truth[key] = (None, "not a committed version")
        elif key not in truth:
            try:
                if version not in opened:
                    opened[version] = Store.open(store_path, at=version)
                s = opened[version]
                tensors = s.get(next(iter(coefficients)), device=DEVICE) if kind == "get" else s.compose(coefficients, device=DEVICE)
                truth[key] = (signature(tensors), None)
            except Exception as e:  # noqa: BLE001 -- that version cannot give this read
                truth[key] = (None, f"{type(e).__name__}: {e}")
        sig, error = truth[key]
        d = deviation(r["signature"], sig) if sig is not None else math.inf
        deviations.append(d)
        if not d <= rtol:
            bad = {"version": version, "kind": kind, "coefficients": coefficients, "committed": version in committed, "deviation": d}
            if error:
                bad["error"] = error
            inconsistent.append(bad)
    return (inconsistent, deviations) if with_deviations else inconsistent


def _hold_lock(store, seconds, started):
    """Body of a lock-holding process: take the writer lock as tvbase does, hold it, release."""
    from tvbase.repository import WriterLock

    sys.argv = ["reliability-lock-holder"]  # what the lock file records as the holder's command
    with WriterLock(Path(store) / "writer.lock"):
        started.put(os.getpid())
        time.sleep(seconds)


def lock_contention(store, victim, hold=4.0, launcher="exec"):
    """A process holds the writer lock: a second writer gets exit 8 naming it; with ``--wait`` it
    waits and succeeds; after the holder is SIGKILLed a writer takes the lock at once."""
    from tvbase.store import Store

    ctx = fork_context()
    result = {"problems": []}
    problems = result["problems"]
    started = ctx.Queue()
    holder = ctx.Process(target=_hold_lock, args=(str(store), hold, started))
    holder.start()
    try:
        pid = started.get(timeout=300)
        held_at = time.monotonic()
        refused = tvbase("rm", store, victim, launcher=launcher)
        result["refused_rc"] = refused.returncode
        result["refused_message"] = refused.stderr.strip()[-300:]
        if refused.returncode != 8 or "store is locked by" not in refused.stderr or str(pid) not in refused.stderr:
            problems.append(f"a second writer got exit {refused.returncode} and {refused.stderr.strip()!r}; expected 8, 'store is locked by' and pid {pid}")
        if "Traceback" in refused.stderr:
            problems.append("a traceback was printed for a locked store")
        if time.monotonic() - held_at >= hold:
            problems.append(f"the refused writer took longer than the {hold} s hold; the check is void (raise hold)")
        waited = tvbase("rm", store, victim, "--wait", 120, launcher=launcher)
        result["waiting_rc"] = waited.returncode
        result["waited_until_release"] = time.monotonic() - held_at >= hold
        if waited.returncode != 0:
            problems.append(f"a writer with --wait exits {waited.returncode}: {waited.stderr.strip()[-500:]}")
        elif not result["waited_until_release"]:
            problems.append("the writer with --wait finished before the lock was released")
        elif victim in Store.open(store).tasks:
            problems.append(f"the writer with --wait exited 0 but {victim} is still there")
    finally:
        holder.join(timeout=300)
    # a holder that dies holding the lock: the OS releases it, the next writer needs no cleanup
    holder = ctx.Process(target=_hold_lock, args=(str(store), 600, started))
    holder.start()
    started.get(timeout=300)
    holder.kill()
    holder.join()
    other = Store.open(store).tasks[0]
    after_death = tvbase("rm", store, other, launcher=launcher)
    result["after_holder_killed_rc"] = after_death.returncode
    if after_death.returncode != 0:
        problems.append(f"after the lock holder was killed a writer exits {after_death.returncode}: {after_death.stderr.strip()[-500:]}")
    return result


# -- 3. integrity --------------------------------------------------------------------------------
CORRUPTIONS = ("payload-flip", "index-flip", "payload-truncate", "chunk-delete", "manifest-flip", "snapshot-flip",
               "metadata-digit-flip", "metadata-id-flip", "stale-chunk-flip")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def edit_snapshot(store_path, version, edit):
    """Rewrite snapshot ``version`` with ``edit(bytes) -> bytes`` applied to its decompressed body.

    An Icechunk snapshot file is a short header followed by one zstd frame; rewriting the body
    simulates bit rot in the metadata (tvbase's attribute, the arrays' zarr metadata) as it
    would look after decompression, for instance one flipped bit in a digit.
    """
    from numcodecs import Zstd

    f = Path(store_path) / "repo" / "snapshots" / version
    raw = f.read_bytes()
    start = raw.find(ZSTD_MAGIC)
    body = bytes(Zstd().decode(raw[start:]))
    f.write_bytes(raw[:start] + bytes(Zstd(level=3).encode(edit(body))))


def _flip_digit(body, rng, ids_only=False):
    """Flip the low bit of one random ASCII digit of tvbase's attribute (a digit stays a digit);
    with ``ids_only``, the last digit of one task's ``"id"``. Returns (new body, position)."""
    start = body.find(b'"tasks"', body.find(b'"tvbase"'))
    if ids_only:
        digits = [m.end() - 1 for m in re.finditer(rb'"id": \d+', body[start:])]
        digits = [start + i for i in digits]
    else:
        digits = [i for i in range(start, len(body)) if 0x30 <= body[i] <= 0x39]
    i = rng.choice(digits)
    return body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:], i


def chunk_map(path, at=None):
    """{chunk file: ("payload", i) | ("index", i) | ("other", None)} for the version ``at`` (head).

    A chunk file is identified by decoding it (zstd inside a crc32c trailer, the store's
    documented codecs) and comparing it with that version's arrays, so nothing depends on
    Icechunk's manifest format.
    """
    import icechunk
    import zarr
    from numcodecs import Zstd

    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(Path(path) / "repo")))
    session = repo.readonly_session(snapshot_id=at) if at else repo.readonly_session(branch="main")
    root = zarr.open_group(session.store, mode="r")
    expected = {}
    for label in ("payload", "index"):
        arr = root[label]
        data = np.asarray(arr[...])
        step = arr.chunks[0]
        for i in range(math.ceil(data.shape[0] / step) if data.shape[0] else 0):
            block = np.zeros((step, *data.shape[1:]), dtype=data.dtype)
            part = data[i * step:(i + 1) * step]
            block[: len(part)] = part
            expected[hashlib.sha256(block.tobytes()).hexdigest()] = (label, i)
    out = {}
    for f in sorted((Path(path) / "repo" / "chunks").iterdir()):
        raw = f.read_bytes()
        try:
            decoded = bytes(Zstd().decode(raw[:-4]))
        except Exception:  # noqa: BLE001
            out[f] = ("other", None)
            continue
        out[f] = expected.get(hashlib.sha256(decoded).hexdigest(), ("other", None))
    return out


def affected_tasks(store, label, chunk_index):
    """Tasks whose factors (own or their cluster's) overlap payload chunk ``chunk_index``.

    Uses the documented offset table (owner kind 0 = cluster, 1 = task; byte offset, length)."""
    import icechunk
    import zarr

    if label == "index":
        return set(store.tasks)
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(store.path / "repo")))
    root = zarr.open_group(repo.readonly_session(snapshot_id=store.version).store, mode="r")
    step = root["payload"].chunks[0]
    index = np.asarray(root["index"][...])
    lo, hi = chunk_index * step, (chunk_index + 1) * step
    hit = index[(index[:, 7] < hi) & (index[:, 7] + index[:, 8] > lo)]
    owners = {(int(r[0]), int(r[1])) for r in hit}
    out = set()
    for task, tm in store.meta["tasks"].items():
        if (1, tm["id"]) in owners or (tm["cluster"] is not None and (0, int(tm["cluster"])) in owners):
            out.add(task)
    return out


def _named(text, tasks):
    return {t for t in tasks if re.search(rf"(?<![\w.-]){re.escape(t)}(?![\w.-])", text)}


def _flip(path, rng, lo=0, hi=None):
    data = bytearray(Path(path).read_bytes())
    offset = rng.randrange(lo, hi if hi is not None else len(data))
    data[offset] ^= rng.randrange(1, 256)
    Path(path).write_bytes(bytes(data))
    return offset


def corrupt(store_path, kind, rng):
    """Damage the store as ``kind`` says. Returns (description, the tasks whose reads must fail
    (None where the effect is not known in advance: manifests, snapshots, metadata), the old
    versions whose verify must fail)."""
    from tvbase.store import Store

    store_path = Path(store_path)
    store = Store.open(store_path)
    live = {f: where for f, where in chunk_map(store_path).items() if where[0] != "other"}
    payload = sorted(f for f, w in live.items() if w[0] == "payload")
    if kind in ("payload-flip", "payload-truncate", "chunk-delete"):
        f = rng.choice(payload)
        label, i = live[f]
        affected = affected_tasks(store, label, i)
        if kind == "payload-flip":
            what = f"flipped byte {_flip(f, rng)} of payload chunk {i}"
        elif kind == "payload-truncate":
            size = rng.randrange(0, f.stat().st_size)
            os.truncate(f, size)
            what = f"truncated payload chunk {i} to {size} bytes"
        else:
            f.unlink()
            what = f"deleted payload chunk {i}"
        return what, affected, set()
    if kind == "index-flip":
        f = next(f for f, w in live.items() if w[0] == "index")
        return f"flipped byte {_flip(f, rng)} of the index chunk", set(store.tasks), set()
    if kind == "manifest-flip":
        manifests = sorted((store_path / "repo" / "manifests").iterdir(), key=lambda p: p.stat().st_mtime_ns)
        f = manifests[-1]  # written by the last commit
        return f"flipped byte {_flip(f, rng)} of manifest {f.name}", None, set()
    if kind == "snapshot-flip":
        f = store_path / "repo" / "snapshots" / store.version
        return f"flipped byte {_flip(f, rng)} of the head snapshot", None, set()
    if kind in ("metadata-digit-flip", "metadata-id-flip"):
        where = {}

        def edit(body):
            new, where["at"] = _flip_digit(body, rng, ids_only=kind == "metadata-id-flip")
            where["text"] = body[max(0, where["at"] - 30): where["at"] + 5].decode(errors="replace").replace("\n", " ")
            return new

        edit_snapshot(store_path, store.version, edit)
        return f"flipped the low bit of a digit in the head snapshot's metadata ({where['text']!r})", None, set()
    if kind == "stale-chunk-flip":
        stale = sorted(set(chunk_map(store_path)) - set(live))
        f = rng.choice(stale)
        old = set()
        for h in store.log()[1:]:
            if chunk_map(store_path, at=h["id"]).get(f, ("other",))[0] != "other":
                old.add(h["id"])
        return f"flipped byte {_flip(f, rng)} of chunk {f.name}, used only by older versions", set(), old
    raise ValueError(f"unknown corruption {kind!r}; choose from {CORRUPTIONS}")


def integrity_trial(template, before, kind, seed, workdir):
    """Copy the template store, damage it, and check verify and get. Returns a result dict.

    ``before``: (version, {task: tensors}) of the template. ``outcome`` is "detected" (verify or
    the reads fail, nothing returned wrong numbers), "no effect" (the damage changed nothing any
    read returns; possible for manifests, snapshots and metadata) or "WRONG NUMBERS".
    ``problems`` lists violated expectations. Runs the CLI in this process (``call_cli``), so it
    is not thread safe.
    """
    rng = random.Random(seed)
    path = Path(workdir) / f"corrupt-{seed}-{kind}"
    shutil.copytree(template, path)
    version, truth = before
    what, affected, old_versions = corrupt(path, kind, rng)
    result = {"kind": kind, "seed": seed, "what": what, "affected": None if affected is None else sorted(affected), "problems": []}
    problems = result["problems"]
    code, out, err = call_cli("verify", path, "--json")
    result["verify_rc"] = code
    try:
        report_text = " ".join(json.loads(out)["problems"])
    except (ValueError, KeyError, TypeError):
        report_text = out + err
    named = _named(report_text, truth)
    result["named"] = sorted(named)
    old_codes = {v: call_cli("verify", path, "--at", v)[0] for v in sorted(old_versions)}
    result["old_verify_rc"] = old_codes
    gets, wrong = {}, []
    for task in sorted(truth):
        out_file = path.parent / f"{path.name}-{task}.safetensors"
        c, _, e = call_cli("get", path, task, "-o", out_file, "--device", DEVICE)
        gets[task] = c
        if c == 0:
            got = load_file(out_file)
            if sorted(got) != sorted(truth[task]) or not all(torch.equal(got[n], truth[task][n]) for n in got):
                wrong.append(task)
            out_file.unlink()
        elif c != 6:
            problems.append(f"get {task} exits {c}, expected 6 or success: {e.strip()[-300:]}")
        elif "Traceback" in e:
            problems.append(f"get {task} printed a traceback")
    result["get_rc"], result["wrong_numbers"] = gets, wrong
    failing = {t for t, c in gets.items() if c != 0}
    if wrong:
        problems.append(f"get returned WRONG NUMBERS for {wrong} with exit 0")
    if code not in (0, 6):
        problems.append(f"verify exits {code}, expected 6: {err.strip()[-300:]}")
    if code == 0 and (failing or wrong):
        problems.append(f"verify passes although reads of {sorted(failing | set(wrong))} fail or are wrong")
    if affected:  # damage that must show: a live chunk
        if code == 0:
            problems.append("verify passes although a live chunk is damaged")
        if failing != affected:
            problems.append(f"get fails for {sorted(failing)}, the damaged chunk holds factors of {sorted(affected)}")
        if kind.startswith("payload") and code == 6 and named != affected:
            problems.append(f"verify names tasks {sorted(named)}, the damaged chunk holds factors of {sorted(affected)}")
    elif affected is not None:  # only older versions damaged
        if code != 0 or failing:
            problems.append(f"damage to an old version breaks the head: verify {code}, failing gets {sorted(failing)}")
        problems += [f"verify --at {v} (an old version using the damaged chunk) exits {c}, expected 6" for v, c in old_codes.items() if c != 6]
    effect = code != 0 or bool(failing) or bool(wrong) or any(c != 0 for c in old_codes.values())
    result["outcome"] = "WRONG NUMBERS" if wrong else ("detected" if effect else "no effect")
    result["clean_errors"] = code in (0, 6) and all(c in (0, 6) for c in [*gets.values(), *old_codes.values()])
    result["detected"] = result["outcome"] == "detected"
    return result


def prepare_integrity(workdir, wide=700_000):
    """A store spanning several payload chunks, with history (a later ingest and an rm)."""
    workdir = Path(workdir)
    zoo = build_zoo(workdir / "zoo-wide", n_tasks=7, seed=1, wide=wide)
    # t6 on its own (per-task SVD): a later task otherwise joins a cluster, and every task would
    # then read the first payload chunk, which holds the clusters' bases
    store = make_store(workdir / "tpl-integrity", zoo, ingests=[["t0", "t1", "t2", "t3", "t4"], ["t5"], ["t6"]], removes=["t2"],
                       methods=["tvbase", "tvbase", "svd"])
    return store.path, rebuild_all(store.path)


def integrity_trials(workdir, n, seed=0, kinds=CORRUPTIONS, setup=None, keep=False):
    """``n`` corruptions cycling over ``kinds``; returns a list of result dicts."""
    template, before = setup or prepare_integrity(workdir)
    rng = random.Random(seed)
    results = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        s = rng.randrange(2**31)
        try:
            res = integrity_trial(template, before, kind, s, workdir)
        except Exception:  # noqa: BLE001
            res = {"kind": kind, "seed": s, "problems": [f"harness error: {traceback.format_exc()[-1500:]}"], "detected": False, "wrong_numbers": []}
        if not keep:
            shutil.rmtree(Path(workdir) / f"corrupt-{s}-{kind}", ignore_errors=True)
        results.append(res)
    return results


# -- the whole run -------------------------------------------------------------------------------
def run(trials=60, readers=4, corruptions=36, steps=None, seed=0, workers=2, workdir=None, out=None,
        results_md=RESULTS_MD, pause=0.01, cli_verify=True, keep=False, command=None, launcher="exec"):
    """Run the three experiments; write ``out/reliability.json`` and the RESULTS.md section when
    ``out`` is given. Returns the summary dict (``summary["ok"]`` is the verdict)."""
    t0 = time.monotonic()
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tvbase-reliability-") if own else workdir)
    try:
        t = time.monotonic()
        setup, crash = crash_trials(workdir / "crash", trials, seed=seed, workers=workers, cli_verify=cli_verify, keep=keep, launcher=launcher)
        crash_s = time.monotonic() - t
        t = time.monotonic()
        if steps is None:
            steps = [[("ingest", "t4")], [("rm", "t0")], [("compact",)], [("ingest", "t5"), ("ingest", "t6")],
                     [("rm", "t4")], [("ingest", "t7")], [("compact",)], [("rm", "t5")], [("ingest", "t0"), ("ingest", "t4")],
                     [("compact",)]]
        zoo = setup.zoo
        conc = concurrency_run(workdir / "conc", zoo, readers=readers, steps=steps, pause=pause, seed=seed, launcher=launcher)
        lock = lock_contention(workdir / "conc" / "concurrent", "t6", launcher=launcher)
        conc_s = time.monotonic() - t
        t = time.monotonic()
        integ = integrity_trials(workdir / "integrity", corruptions, seed=seed, keep=keep)
        integ_s = time.monotonic() - t
    finally:
        if own and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(crash, conc, lock, integ)
    summary.update(
        command=command or "python -m benchmarks.reliability",
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=round(time.monotonic() - t0, 1),
        section_seconds={"crash": round(crash_s, 1), "concurrency": round(conc_s, 1), "integrity": round(integ_s, 1)},
        clean_durations={name: round(op.duration, 2) for name, op in setup.ops.items()},
        environment=_environment(),
        launcher=launcher,
        seed=seed,
    )
    if out is not None:
        write_report(summary, out, results_md)
    return summary


def summarize(crash, conc, lock, integ):
    kills = [r for r in crash if r.get("killed")]
    by = {}
    for r in crash:
        row = by.setdefault((r["op"], r["mode"]), {"trials": 0, "killed": 0, "committed": 0, "rolled_back": 0, "survived": 0})
        row["trials"] += 1
        row["killed"] += bool(r.get("killed"))
        row["committed"] += r.get("outcome") == "committed"
        row["rolled_back"] += r.get("outcome") == "rolled back"
        row["survived"] += not r["problems"]
    kinds = {}
    for r in integ:
        row = kinds.setdefault(r["kind"], {"trials": 0, "detected": 0, "clean_exit_codes": 0, "no_effect": 0, "wrong_numbers": 0})
        row["trials"] += 1
        row["detected"] += r.get("outcome") == "detected"
        row["clean_exit_codes"] += r.get("outcome") == "detected" and bool(r.get("clean_errors"))
        row["no_effect"] += r.get("outcome") == "no effect"
        row["wrong_numbers"] += r.get("outcome") == "WRONG NUMBERS"
    lost = sorted({f"{r['op']}/{r['mode']}/{r['seed']}: {t}" for r in crash for t in r.get("lost", [])})
    summary = {
        "crash": {
            "trials": len(crash),
            "killed": len(kills),
            "survived": sum(not r["problems"] for r in crash),
            "killed_and_survived": sum(not r["problems"] for r in kills),
            "died_holding_lock": sum(bool(r.get("died_holding_lock")) for r in crash),
            "committed": sum(r.get("outcome") == "committed" for r in crash),
            "rolled_back": sum(r.get("outcome") == "rolled back" for r in crash),
            "data_lost": len(lost),
            "lost": lost,
            "by_operation_and_mode": [{"op": k[0], "mode": k[1], **v} for k, v in sorted(by.items())],
            "failures": [r for r in crash if r["problems"]],
            "trials_detail": crash,
        },
        "concurrency": conc,
        "lock": lock,
        "integrity": {
            "corruptions": len(integ),
            "detected": sum(r.get("outcome") == "detected" for r in integ),
            "detected_with_exit_6": sum(r.get("outcome") == "detected" and bool(r.get("clean_errors")) for r in integ),
            "no_effect": sum(r.get("outcome") == "no effect" for r in integ),
            "wrong_numbers_returned": sum(r.get("outcome") == "WRONG NUMBERS" for r in integ),
            "by_kind": [{"kind": k, **v} for k, v in kinds.items()],
            "failures": [r for r in integ if r["problems"]],
            "trials_detail": integ,
        },
    }
    summary["ok"] = (
        not summary["crash"]["failures"]
        and not conc["problems"]
        and not lock["problems"]
        and not summary["integrity"]["failures"]
    )
    return summary


def _environment():
    import icechunk
    import zarr

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "icechunk": icechunk.__version__,
        "zarr": zarr.__version__,
        "cpus": os.cpu_count(),
        "device": DEVICE,
        "platform": platform.platform(),
    }


def markdown(summary):
    """The RESULTS.md section (without the markers)."""
    c, q, lk, g = summary["crash"], summary["concurrency"], summary["lock"], summary["integrity"]
    env = summary["environment"]
    # reports written before reads were compared under READ_RTOL compared sha256 digests
    tolerance = f"to rel. {q['read_rtol']:g}" if "read_rtol" in q else "bit for bit"
    rounding = (f"; {q['reads_off_by_rounding']} accepted reads off by float rounding, at most {q['max_accepted_deviation']:.1e}"
                if "reads_off_by_rounding" in q else "")
    lines = [
        "## Reliability (issue 6)",
        "",
        f"Command: `{summary['command']}`, {summary['date'][:10]}; {summary['wall_seconds']:.0f} s wall on "
        f"{env['cpus']} CPU cores ({env['device']}), torch {env['torch']}, icechunk {env['icechunk']}, zarr {env['zarr']}. "
        "Tiny synthetic zoo (budget 50%, 2 clusters); every tvbase call a real subprocess.",
        "",
        "| check | result |",
        "|---|---|",
        f"| kill trials (SIGKILL: random delay, mid-write, after snapshot write, after commit) | {c['trials']} trials, {c['killed']} killed, "
        f"{c['killed_and_survived']} of {c['killed']} kills survived ({c['committed']} committed, {c['rolled_back']} rolled back); "
        f"{c['died_holding_lock']} died holding the writer lock, taken over by the next writer |",
        f"| data lost (a committed task missing or not rebuilt as before) | **{c['data_lost']}** |",
        f"| concurrent readers / reads / writer operations | {q['readers']} / {q['reads']} / {q['writer_operations']} "
        f"({q['versions_seen']} of {q['versions_committed']} versions seen by readers) |",
        f"| inconsistent reads (the version a read names does not give the same tensors, {tolerance}) | "
        f"**{q['inconsistent_reads']}** ({q['n_read_errors']} failed reads{rounding}) |",
        f"| second writer while locked | exit {lk.get('refused_rc')}; with `--wait`: exit {lk.get('waiting_rc')}; after the holder is SIGKILLed: exit {lk.get('after_holder_killed_rc')} |",
        f"| corruptions detected (verify or reads fail, no wrong numbers) | {g['detected']} of {g['corruptions']} ({g['detected_with_exit_6']} with exit 6 "
        f"everywhere, no traceback); {g['no_effect']} changed nothing any read returns |",
        f"| corruptions that returned wrong numbers with exit 0 | **{g['wrong_numbers_returned']}** |",
        "",
        "| operation | kill point | trials | killed | committed | rolled back | survived |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['op']} | {r['mode']} | {r['trials']} | {r['killed']} | {r['committed']} | {r['rolled_back']} | {r['survived']} |" for r in c["by_operation_and_mode"]]
    lines += ["", "| corruption | trials | detected | of which exit 6 everywhere (no traceback) | no effect on reads | wrong numbers |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['trials']} | {r['detected']} | {r['clean_exit_codes']} | {r['no_effect']} | {r['wrong_numbers']} |" for r in g["by_kind"]]
    problems = [f"kill {r['op']}/{r['mode']} (seed {r['seed']}): {p}" for r in c["failures"] for p in r["problems"]]
    problems += [f"concurrency: {p}" for p in q["problems"]] + [f"lock: {p}" for p in lk["problems"]]
    seen = {}  # one line per kind of corruption and kind of problem; wrong numbers always shown
    for r in g["failures"]:
        worst = next((p for p in r["problems"] if "WRONG" in p), r["problems"][0])
        shape = re.sub(r"0x[0-9a-f]+|\d+|'[^']*'", "#", worst)
        seen.setdefault((r["kind"], shape), []).append(f"{r['kind']}: {r.get('what', '')}: {worst}")
    problems += [texts[0] + (f" [{len(texts)} trials like this]" if len(texts) > 1 else "") for texts in seen.values()]
    if problems:
        lines += ["", "Problems found:", ""] + [f"- {p[:400]}" for p in dict.fromkeys(problems)]
    return "\n".join(lines)


def write_report(summary, out, results_md=RESULTS_MD):
    """Write ``out/reliability.json`` and replace this script's section of ``results_md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(summary, indent=2, default=str))
    if results_md is not None:
        replace_section(results_md, "reliability", markdown(summary))


def rewrite_report(out=REPO_ROOT / "benchmarks" / "results", results_md=RESULTS_MD):
    """Re-render the RESULTS.md section from a saved ``reliability.json`` (no new measurements)."""
    summary = json.loads((Path(out) / "reliability.json").read_text())
    replace_section(results_md, "reliability", markdown(summary))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60, help="SIGKILL trials (cycling over 4 operations x 4 kill points)")
    parser.add_argument("--readers", type=int, default=4, help="concurrent reader processes")
    parser.add_argument("--corruptions", type=int, default=36, help="corruption trials (cycling over the 9 kinds)")
    parser.add_argument("--workers", type=int, default=2, help="kill trials run at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"), help="where reliability.json goes")
    parser.add_argument("--results-md", default=str(RESULTS_MD), help="markdown file whose reliability section is rewritten")
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the stores of passed trials too")
    parser.add_argument("--launcher", choices=("exec", "fork"), default="exec",
                        help="exec: real `python -m tvbase.cli` processes (default); fork: forked from a preloaded server (faster)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.reliability " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = run(trials=args.trials, readers=args.readers, corruptions=args.corruptions, seed=args.seed, workers=args.workers,
                  workdir=args.workdir, out=args.out, results_md=args.results_md, keep=args.keep, command=command.strip(),
                  launcher=args.launcher)
    print(markdown(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
