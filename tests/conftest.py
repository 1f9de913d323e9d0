"""Shared fixtures: a tiny synthetic zoo of fine-tunes, fresh and populated stores.

The zoo is one small base model and fine-tunes whose task vectors are low rank plus a little
noise, in two families (tasks of one family share their column and row subspaces), so the
shared fit finds two clusters. Everything is seeded; the whole zoo is a few tens of KiB.
"""

import hashlib
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvbase.methods import FitParams
from tvbase.io.save import save_checkpoint
from tvbase.store import Store

# Base model: 2-D weights, a conv kernel (factorized as (8, 36)), a bias and a (1, 5, 16)
# position table (both stored densely), and an integer buffer that fine-tuning leaves alone.
BASE_SHAPES = {
    "l1.weight": (32, 16),
    "l1.bias": (32,),
    "conv.weight": (8, 4, 3, 3),
    "head.weight": (10, 32),
    "pos": (1, 5, 16),
}
INT_BUFFER = "position_ids"  # int64 (5,), identical in every fine-tune

FAMILY = {"a0": 0, "a1": 0, "a2": 0, "b0": 1, "b1": 1, "a_sharded": 0, "c_new": 1}
FIRST_INGEST = ["a0", "a1", "a2", "b0", "b1", "a_sharded"]  # shared fit (first ingest)
LATER_INGEST = ["c_new"]  # stored as per-task SVD (second ingest)
BF16_TASKS = ["h0", "h1", "h2"]

# Scales: weights ~N(0, 1); deltas ~0.05 per entry (low rank), noise 0.002 per entry.
DELTA_SCALE = 0.05
NOISE_SCALE = 0.002
RANK = 3


def _matrix(shape):
    m = shape[0]
    n = math.prod(shape[1:])
    return (m, n) if len(shape) >= 2 and min(m, n) >= 2 else None


@dataclass
class Zoo:
    """Paths and tensors of the synthetic zoo."""

    root: Path
    base: Path  # fp32 base .safetensors
    tasks: dict  # task name -> checkpoint path (file or sharded directory), fp32
    base_tensors: dict  # tensor name -> tensor
    task_vectors: dict  # task name -> {tensor name: float32 finetuned - base}
    bf16_base: Path
    bf16_tasks: dict = field(default_factory=dict)  # task name -> path, every float tensor bf16
    bf16_task_vectors: dict = field(default_factory=dict)
    first: list = field(default_factory=lambda: list(FIRST_INGEST))  # tasks of the first (shared) ingest
    later: list = field(default_factory=lambda: list(LATER_INGEST))  # tasks of the second (per-task SVD) ingest

    def tensors(self, task):
        """Fresh copy of a fine-tune's tensors (fp32 zoo)."""
        return {name: self.base_tensors[name] + self.task_vectors[task][name].to(self.base_tensors[name].dtype)
                for name in self.base_tensors}


def _build_zoo(root):
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    base = {name: torch.randn(*shape, generator=gen) for name, shape in BASE_SHAPES.items()}
    base[INT_BUFFER] = torch.arange(5, dtype=torch.int64)
    save_file(base, root / "base.safetensors")

    # per family and matrix: column basis (m, RANK), row basis (n, RANK), family core (RANK, RANK)
    families = []
    for _ in range(2):
        fam = {}
        for name, shape in BASE_SHAPES.items():
            ms = _matrix(shape)
            if ms:
                m, n = ms
                qa, _ = torch.linalg.qr(torch.randn(m, RANK, generator=gen))
                qb, _ = torch.linalg.qr(torch.randn(n, RANK, generator=gen))
                fam[name] = (qa, qb, torch.randn(RANK, RANK, generator=gen))
        families.append(fam)

    vectors = {}
    for task, f in FAMILY.items():
        tv = {}
        for name, shape in BASE_SHAPES.items():
            ms = _matrix(shape)
            if ms:
                m, n = ms
                qa, qb, core = families[f][name]
                own = core + 0.5 * torch.randn(RANK, RANK, generator=gen)
                low = qa @ own @ qb.T * (DELTA_SCALE * math.sqrt(m * n / RANK) / 1.2)  # (m, n)
                delta = low + NOISE_SCALE * torch.randn(m, n, generator=gen)
                tv[name] = delta.reshape(shape)
            else:
                tv[name] = DELTA_SCALE * torch.randn(*shape, generator=gen)
        tv[INT_BUFFER] = torch.zeros(5)
        vectors[task] = tv

    zoo = Zoo(root=root, base=root / "base.safetensors", tasks={}, base_tensors=base, task_vectors={},
              bf16_base=root / "bf16" / "base.safetensors")
    for task, tv in vectors.items():
        tensors = {name: base[name] + tv[name].to(base[name].dtype) for name in base}
        # the task vector as the store sees it: finetuned - base, computed in float32
        zoo.task_vectors[task] = {name: tensors[name].float() - base[name].float() for name in base}
        if task == "a_sharded":
            path = root / "a_sharded"
            files = save_checkpoint(tensors.items(), path, max_shard_bytes=1500)
            assert len(files) >= 3, "the sharded fine-tune must really be sharded"
        else:
            path = root / f"{task}.safetensors"
            save_file(tensors, path)
        zoo.tasks[task] = path

    # bf16 zoo: the same base and deltas, every float tensor rounded to bfloat16
    (root / "bf16").mkdir()
    base16 = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in base.items()}
    save_file(base16, zoo.bf16_base)
    for task, source in zip(BF16_TASKS, ["a0", "a1", "b0"]):
        tensors = {name: (base[name] + vectors[source][name].to(base[name].dtype)) for name in base}
        tensors = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in tensors.items()}
        path = root / "bf16" / f"{task}.safetensors"
        save_file(tensors, path)
        zoo.bf16_tasks[task] = path
        zoo.bf16_task_vectors[task] = {name: tensors[name].float() - base16[name].float() for name in base}
    return zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """The synthetic zoo (read-only: tests must not modify its files)."""
    return _build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def fresh_store(tmp_path, zoo):
    """A new, empty store for the fp32 zoo with a 50% budget.

    The dense tensors of this tiny model (bias, position table) alone need several percent of
    the raw bytes, so a realistic 3% budget would not fit.
    """
    return Store.create(tmp_path / "store", zoo.base, params=FitParams(budget=0.5))


@pytest.fixture(scope="session")
def populated(tmp_path_factory, zoo):
    """A store holding FIRST_INGEST (shared fit, 2 clusters) then LATER_INGEST (per-task SVD).

    Returns a dict with ``path`` and the ``versions`` after ``init``, ``first`` and ``later``.
    Session-scoped: tests must only read it; use ``populated_copy`` to modify.
    """
    path = tmp_path_factory.mktemp("populated") / "store"
    store = Store.create(path, zoo.base, params=FitParams(budget=0.5, n_clusters=2))
    versions = {"init": store.version}
    versions["first"] = store.ingest({t: zoo.tasks[t] for t in FIRST_INGEST}, device="cpu", progress=False)
    versions["later"] = store.ingest({t: zoo.tasks[t] for t in LATER_INGEST}, device="cpu", progress=False)
    return {"path": path, "versions": versions}


@pytest.fixture
def populated_copy(tmp_path, populated):
    """A private copy of the populated store that a test may modify; returns its path."""
    dest = tmp_path / "copy"
    shutil.copytree(populated["path"], dest)
    return dest


def _snapshot_state(store_path):
    """(head version id, {relative path: sha256} of every file under STORE/repo).

    Two equal snapshots mean that nothing in the Icechunk repository changed on disk.
    """
    store_path = Path(store_path)
    head = Store.open(store_path).version
    repo = store_path / "repo"
    files = {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repo.rglob("*"))
        if p.is_file()
    }
    return head, files


@pytest.fixture
def snapshot_state():
    """The ``snapshot_state(store_path)`` helper, see ``_snapshot_state``."""
    return _snapshot_state


def rel_max_error(actual, expected):
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    actual, expected = actual.double(), expected.double()
    denom = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    if denom == 0.0:
        return err
    return err / denom


@pytest.fixture
def rel_error():
    """``rel_max_error(actual, expected)`` helper."""
    return rel_max_error


def load(path):
    """Load a safetensors file or sharded directory written by tvbase into a dict."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def load_checkpoint():
    """``load(path)`` helper: every tensor of a safetensors file or directory."""
    return load
