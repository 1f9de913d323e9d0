"""Shared fixtures: a tiny synthetic zoo of fine-tunes, fresh and populated stores.

The zoo is one small base model and fine-tunes whose task vectors are low rank plus a little
noise, in two families (tasks of one family share their column and row subspaces), so the
shared fit finds two clusters. Everything is seeded; the whole zoo is a few tens of KiB.
"""

import hashlib
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvbase.methods import FitParams
from tvbase.store import Store
from tvbase.testing.metrics import max_relative_error
from tvbase.testing.zoo import SyntheticZoo, build_synthetic_zoo

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
LATER_INGEST = ["c_new"]  # joins family b's cluster (second ingest: projected onto its bases)
SHARDED = {"a_sharded": 1500}  # task -> max_shard_bytes: at least 3 files (2 shards + index)
BF16_TASKS = {"h0": "a0", "h1": "a1", "h2": "b0"}  # bf16 task -> the fp32 task it rounds

# Scales: weights ~N(0, 1); deltas ~0.05 per entry (low rank), noise 0.002 per entry.
DELTA_SCALE = 0.05
NOISE_SCALE = 0.002
RANK = 3


@dataclass
class Zoo(SyntheticZoo):
    """Paths and tensors of the synthetic zoo (fp32, see ``SyntheticZoo``) and its bf16 copy."""

    bf16_base: Path = None
    bf16_tasks: dict = field(default_factory=dict)  # task name -> path, every float tensor bf16
    bf16_task_vectors: dict = field(default_factory=dict)
    first: list = field(default_factory=lambda: list(FIRST_INGEST))  # tasks of the first (shared) ingest
    later: list = field(default_factory=lambda: list(LATER_INGEST))  # tasks of the second ingest (projected onto the first fit's bases)

    def tensors(self, task):
        """Fresh copy of a fine-tune's tensors (fp32 zoo)."""
        return {name: self.base_tensors[name] + self.task_vectors[task][name].to(self.base_tensors[name].dtype)
                for name in self.base_tensors}


def _bf16(tensors):
    return {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in tensors.items()}


def _build_zoo(root):
    fp32 = build_synthetic_zoo(
        root, BASE_SHAPES, FAMILY, seed=1234, rank=RANK, delta_scale=DELTA_SCALE, noise_scale=NOISE_SCALE,
        low_rank_divisor=1.2, frozen={INT_BUFFER: torch.arange(5, dtype=torch.int64)}, sharded=SHARDED,
    )
    zoo = Zoo(**{f.name: getattr(fp32, f.name) for f in fields(SyntheticZoo)}, bf16_base=root / "bf16" / "base.safetensors")

    # bf16 zoo: the same base and fine-tunes, every float tensor rounded to bfloat16
    (root / "bf16").mkdir()
    base16 = _bf16(zoo.base_tensors)
    save_file(base16, zoo.bf16_base)
    for task, source in BF16_TASKS.items():
        tensors = _bf16(load(zoo.tasks[source]))
        path = root / "bf16" / f"{task}.safetensors"
        save_file(tensors, path)
        zoo.bf16_tasks[task] = path
        zoo.bf16_task_vectors[task] = {name: tensors[name].float() - base16[name].float() for name in zoo.base_tensors}
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
    """A store holding FIRST_INGEST (shared fit, 2 clusters) then LATER_INGEST (projected).

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


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server on 127.0.0.1 at a free port, for the whole session (its state is in
    memory; each test takes a bucket of its own): its endpoint URL. Stopped at the end."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in failure reports
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3Bucket:
    """A bucket on the test S3 server: ``url(key)`` gives ``s3://BUCKET/KEY``."""

    endpoint: str
    bucket: str
    client: object  # a boto3 S3 client of the server

    def url(self, key=""):
        return f"s3://{self.bucket}/{key}"


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A new bucket on the session's moto server, and the AWS variables pointing at it (for this
    test only): static test credentials, plain http allowed, two tries per request."""
    import uuid

    import boto3

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_NO_SIGN_REQUEST", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", "AWS_MAX_ATTEMPTS": "2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    bucket = f"tvbase-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3Bucket(moto_server, bucket, client)


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


@pytest.fixture
def rel_error():
    """``max_relative_error(actual, expected)`` helper (see ``tvbase.testing.metrics``)."""
    return max_relative_error


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
