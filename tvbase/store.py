"""The on-disk store: zarr v3 arrays inside an Icechunk repository.

Layout of a store directory::

    STORE/
      repo/          Icechunk repository (snapshots, manifests, chunks); one commit per write
      writer.lock    exclusive lock held by the one writer; records who holds it

Inside the repository, the root zarr group holds:

- attribute ``tvbase``: format version, the base model's fingerprint, fit parameters, tasks and
  clusters (everything needed to rebuild, so reads never depend on CLI flags);
- ``payload``: uint8 (nbytes,), every stored factor packed back to back (see ``quantize`` for the
  encoding of one factor), chunks of 2 MiB, zstd + crc32c;
- ``index``: int64 (n_entries, 9), the offset table: one row per stored factor with the
  columns in ``INDEX_COLUMNS``.

Writes append to ``payload`` and rewrite the (small) index; ``rm`` drops index rows, leaving
unreferenced payload bytes that ``compact`` reclaims.
"""

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import icechunk
import numpy as np
import torch
import zarr

from . import __version__
from .codec import PAYLOAD_CHUNK, zarr_compressors
from .errors import (
    AlreadyExistsError,
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StoreLockedError,
    TvbaseError,
)
from .factors import SharedBasis, TaskTensor, matrix_shape
from .ingest.factorize import FitParams, fit, fit_seed, raw_bytes
from .ingest.quantize import QuantizedMatrix, payload_nbytes
from .ingest.seed import SEED_METHODS
from .reconstruct import rebuild_tensor
from .sources import Checkpoint, check_compatible, task_vector

FORMAT_VERSION = 1
INDEX_COLUMNS = ("owner_kind", "owner_id", "tensor", "role", "rows", "cols", "bits", "offset", "nbytes")
OWNER_SHARED, OWNER_TASK = 0, 1
# role column value = position in this tuple; append only, never reorder (on-disk format)
ROLES = ("U", "V", "core", "A", "B", "dense", "S", "mu")
INDEX_CHUNK = 16384  # rows
_CHUNK_CACHE = 8  # decoded payload chunks kept per open store (16 MiB)

_NAME_RE = re.compile(r"[A-Za-z_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")  # the expression parser's name token
_MAX_NAME = 128

icechunk.set_logs_filter("error")  # its local-storage concurrency warning is handled by our lock


def validate_task_name(name):
    """Raise InvalidInputError unless ``name`` is a safe task name.

    Task names end up in metadata, file names and expressions, so they may not escape a
    directory or confuse a parser: letters, digits, ``_``, ``-``, ``.``; no ``..``.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInputError("task name is empty; use letters, digits, '_', '-' or '.'")
    if len(name) > _MAX_NAME:
        raise InvalidInputError(f"task name {name[:20]!r}... is {len(name)} characters long; the limit is {_MAX_NAME}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"task name {name!r} is not allowed: use letters, digits, '_', '-' and '.', starting with a letter "
            "or '_', ending with a letter, digit or '_', and no '..' (so names can neither escape the store "
            "nor be misread in an expression)"
        )
    return name


class _WriterLock:
    """Exclusive writer lock on ``STORE/writer.lock`` (fcntl, released by the OS if we die)."""

    def __init__(self, path, wait=0.0):
        self.path, self.wait = Path(path), float(wait)
        self._fd = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = self.path.read_text(errors="replace").strip() or "an unknown process"
                    os.close(fd)
                    raise StoreLockedError(
                        f"store is locked by {owner}; wait for it to finish or pass --wait SECONDS"
                    ) from None
                time.sleep(0.1)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "command": " ".join(sys.argv[:3])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _now():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _storage(path):
    return icechunk.local_filesystem_storage(str(Path(path) / "repo"))


class _IngestSource:
    """Task vectors of fine-tuned checkpoints against the base, read one tensor at a time."""

    def __init__(self, base, checkpoints):
        self.base, self.checkpoints = base, checkpoints

    def tensor(self, task, name):
        ckpt = self.checkpoints[task]
        return task_vector(self.base, ckpt, name, f"task {task!r} ({ckpt.path})")


class _CompactSource:
    """Original task vectors where available, else rebuilds (see ``Store.compact``)."""

    def __init__(self, base, originals, fallback):
        self.originals, self.fallback = originals, fallback
        self._ingest = _IngestSource(base, originals)

    def tensor(self, task, name):
        return (self._ingest if task in self.originals else self.fallback).tensor(task, name)

    def close(self):
        for ckpt in [self._ingest.base, *self.originals.values()]:
            if ckpt is not None:
                ckpt.close()


class _StoreSource:
    """Task vectors rebuilt from a store snapshot (what ``compact`` refits)."""

    def __init__(self, store, device):
        self.store, self.device = store, device

    def tensor(self, task, name):
        return self.store._rebuild(name, {task: 1.0}, self.device).cpu()


class Store:
    """A tvbase store opened at one snapshot.

    Use :meth:`create` or :meth:`open`. Reads see the snapshot the store was opened at; write
    methods (``ingest``, ``rm``, ``compact``) take the writer lock, commit once, and move this
    object to the new snapshot.
    """

    def __init__(self, path, repo, snapshot_id):
        self.path = Path(path)
        self._repo = repo
        self._load(snapshot_id)

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path, base, params=None):
        """Create a store for the base model at ``base`` (a .safetensors file or sharded directory).

        Parameters
        ----------
        path : str or Path, a directory that does not exist yet (or is empty).
        base : str or Path
        params : FitParams, defaults for later ingests.
        """
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise AlreadyExistsError(f"{path} already exists and is not an empty directory; choose a new store path")
        params = params or FitParams()
        validate_params(params)
        with Checkpoint.open(base) as ckpt:
            fingerprint = ckpt.fingerprint()
        path.mkdir(parents=True, exist_ok=True)
        repo = icechunk.Repository.create(_storage(path))
        session = repo.writable_session("main")
        root = zarr.open_group(session.store, mode="w")
        _create_arrays(root)
        meta = {
            "format_version": FORMAT_VERSION,
            "tvbase_version": __version__,
            "created": _now(),
            "base": {"path": str(Path(base).resolve()), "hash": fingerprint["hash"], "tensors": fingerprint["tensors"]},
            "tensors": list(fingerprint["tensors"]),  # tensor id -> name, the base's order
            "params": params.to_dict(),
            "tasks": {},
            "clusters": {},
            "next_task_id": 0,
            "next_cluster_id": 0,
        }
        meta["digest"] = _digest(meta, np.zeros((0, len(INDEX_COLUMNS)), dtype=np.int64), 0)
        root.attrs["tvbase"] = meta
        snapshot = session.commit(f"init store for base {Path(base).name}", metadata={"op": "init", "tvbase_version": __version__})
        return cls(path, repo, snapshot)

    @classmethod
    def open(cls, path, at=None):
        """Open the store at ``path``, at its latest version or at version ``at`` (id, prefix or tag)."""
        path = Path(path)
        if not (path / "repo").is_dir():
            raise NotFoundError(f"no tvbase store at {path} (create one with `tvbase init {path} --base BASE`)")
        repo = icechunk.Repository.open(_storage(path))
        return cls(path, repo, _resolve_version(repo, at))

    def _load(self, snapshot_id):
        try:
            session = self._repo.readonly_session(snapshot_id=snapshot_id)
            root = zarr.open_group(session.store, mode="r")
            meta = root.attrs.get("tvbase")
            if not isinstance(meta, dict) or "format_version" not in meta:
                raise IntegrityError(f"{self.path} is an Icechunk repository without tvbase metadata")
            if meta["format_version"] > FORMAT_VERSION:
                raise FormatVersionError(
                    f"store {self.path} has format version {meta['format_version']}, newer than this tvbase "
                    f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade tvbase"
                )
            payload = root["payload"]
            index = _read_array(root["index"], "index")
        except TvbaseError:
            raise
        except Exception as e:  # damaged snapshot, manifest or chunk: never a traceback, never a guess
            raise IntegrityError(f"store {self.path} is damaged at version {snapshot_id}: {type(e).__name__}: {e}") from None
        if meta.get("digest") != _digest(meta, index, int(payload.shape[0])):
            raise IntegrityError(
                f"store {self.path}: the metadata of version {snapshot_id} does not match its checksum; "
                "the store is damaged (open an earlier version with --at, see `tvbase log`)"
            )
        self.version = snapshot_id
        self.meta = meta
        self._payload = payload
        self._index = index
        self._tensor_id = {name: i for i, name in enumerate(meta["tensors"])}
        self._rows = {}  # (owner_kind, owner_id, tensor_id) -> {role: index row}
        for row in self._index:
            self._rows.setdefault((int(row[0]), int(row[1]), int(row[2])), {})[ROLES[int(row[3])]] = row
        self._shared_cache = {}
        self._chunk_cache = {}  # chunk number -> decoded bytes, at most _CHUNK_CACHE of them

    def _refresh(self):
        """Move to the latest version of main: writes always build on it."""
        head = self._repo.lookup_branch("main")
        if head != self.version:
            self._load(head)

    # -- reading -------------------------------------------------------------------------
    @property
    def tasks(self):
        """Task names, sorted."""
        return sorted(self.meta["tasks"])

    @property
    def shapes(self):
        """Tensor name -> shape of the base, in the base's order."""
        return {name: tuple(self.meta["base"]["tensors"][name]["shape"]) for name in self.meta["tensors"]}

    def _task_meta(self, name):
        if name not in self.meta["tasks"]:
            raise NotFoundError(_unknown("task", name, self.tasks))
        return self.meta["tasks"][name]

    def _read_factor(self, row):
        start, n = int(row[7]), int(row[8])
        data = self._read_payload(start, n)
        if data.shape[0] != n:
            raise IntegrityError(f"payload ends before entry at offset {start} (+{n} bytes); run `tvbase verify`")
        return QuantizedMatrix.from_bytes(data, int(row[6]), (int(row[4]), int(row[5])))

    def _read_payload(self, start, n):
        """Bytes ``start:start+n`` of the payload, through a small cache of decoded chunks.

        Factors are small and packed back to back, so one 2 MiB chunk serves many reads; decoding
        it once (checksum included) instead of per factor makes a rebuild ~10x faster.
        """
        end = min(start + n, int(self._payload.shape[0]))
        parts = []
        for chunk in range(start // PAYLOAD_CHUNK, (max(end, start + 1) - 1) // PAYLOAD_CHUNK + 1):
            if chunk not in self._chunk_cache:
                if len(self._chunk_cache) >= _CHUNK_CACHE:
                    self._chunk_cache.pop(next(iter(self._chunk_cache)))  # oldest first
                lo = chunk * PAYLOAD_CHUNK
                self._chunk_cache[chunk] = _read_array(self._payload, "payload", slice(lo, lo + PAYLOAD_CHUNK))
            base = chunk * PAYLOAD_CHUNK
            data = self._chunk_cache[chunk]
            parts.append(data[max(start - base, 0) : max(min(end - base, len(data)), 0)])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _shared(self, cluster, name):
        key = (cluster, name)
        if key not in self._shared_cache:
            rows = self._rows.get((OWNER_SHARED, cluster, self._tensor_id[name]))
            self._shared_cache[key] = SharedBasis(**{r: self._read_factor(row) for r, row in rows.items()}) if rows else None
        return self._shared_cache[key]

    def _task_tensor(self, task, name):
        tm = self.meta["tasks"][task]
        rows = self._rows.get((OWNER_TASK, tm["id"], self._tensor_id[name]), {})
        return TaskTensor(coef=tm.get("coefficients"), **{role: self._read_factor(row) for role, row in rows.items()})

    def _rebuild(self, name, coefficients, device):
        terms = []
        for task, alpha in coefficients.items():
            cluster = self.meta["tasks"][task]["cluster"]
            shared = self._shared(cluster, name) if cluster is not None else None
            terms.append((alpha, shared, self._task_tensor(task, name)))
        return rebuild_tensor(self.shapes[name], terms, device=device)

    def iter_composition(self, coefficients, device=None, dtype=torch.float32):
        """Yield ``(tensor name, tensor)`` of ``sum alpha_t tau_t``, one tensor at a time.

        Parameters
        ----------
        coefficients : dict task name -> float
        device : str or torch.device, default: CUDA when available, else CPU.
        dtype : torch.dtype of the yielded tensors.
        """
        for task in coefficients:
            self._task_meta(task)
        device = _device(device)
        # validated above, before the first tensor is asked for: callers open outputs only then
        return ((name, self._rebuild(name, coefficients, device).to(dtype)) for name in self.meta["tensors"])

    def get(self, name, device=None, dtype=torch.float32):
        """Rebuild the task vector of task ``name``: dict tensor name -> tensor (base shapes)."""
        return dict(self.iter_composition({name: 1.0}, device, dtype))

    def compose(self, coefficients, device=None, dtype=torch.float32):
        """Rebuild ``sum alpha_t tau_t`` for a dict task -> alpha: dict tensor name -> tensor."""
        return dict(self.iter_composition(coefficients, device, dtype))

    def log(self):
        """Versions from newest to oldest: dicts with id, time, message, metadata."""
        return [
            {"id": s.id, "time": s.written_at.isoformat(timespec="seconds"), "message": s.message, "metadata": dict(s.metadata)}
            for s in self._repo.ancestry(branch="main")
            if "__root" not in s.metadata  # Icechunk's empty initial snapshot holds no tvbase store
        ]

    def ls(self):
        """One dict per task: name, cluster, kind, stored bytes, raw bytes, relative error."""
        out = []
        shared_bytes = self._shared_bytes_by_cluster()
        members = {}
        for task, tm in self.meta["tasks"].items():
            members.setdefault(tm["cluster"], []).append(task)
        for task in self.tasks:
            tm = self.meta["tasks"][task]
            own = self._owned_bytes(OWNER_TASK, tm["id"])
            shared = shared_bytes.get(tm["cluster"], 0) / len(members[tm["cluster"]]) if tm["cluster"] is not None else 0
            out.append(
                {
                    "name": task,
                    "cluster": tm["cluster"],
                    "kind": tm["kind"],
                    "stored_bytes": int(round(own + shared)),
                    "raw_bytes": tm["raw_bytes"],
                    "storage": (own + shared) / tm["raw_bytes"],
                    "rel_error": tm["rel_error"],
                    "added": tm["added"],
                }
            )
        return out

    def info(self):
        """Store summary: tasks, clusters, bytes on disk and in factors, against raw fp32."""
        raw = sum(tm["raw_bytes"] for tm in self.meta["tasks"].values())
        live = int(self._index[:, 8].sum()) if len(self._index) else 0
        disk = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return {
            "path": str(self.path),
            "version": self.version,
            "format_version": self.meta["format_version"],
            "base": {"path": self.meta["base"]["path"], "hash": self.meta["base"]["hash"], "tensors": len(self.meta["tensors"])},
            "tasks": len(self.meta["tasks"]),
            "clusters": len(self.meta["clusters"]),
            "raw_fp32_bytes": raw,
            "factor_bytes": live,
            "payload_bytes": int(self._payload.shape[0]),
            "reclaimable_bytes": int(self._payload.shape[0]) - live,
            "disk_bytes": disk,
            "factor_storage": live / raw if raw else 0.0,
            "disk_storage": disk / raw if raw else 0.0,
            "params": self.meta["params"],
        }

    def _owned_bytes(self, kind, owner):
        rows = self._index[(self._index[:, 0] == kind) & (self._index[:, 1] == owner)] if len(self._index) else self._index
        return int(rows[:, 8].sum())

    def _shared_bytes_by_cluster(self):
        return {int(c): self._owned_bytes(OWNER_SHARED, int(c)) for c in self.meta["clusters"]}

    def verify(self):
        """Check every chunk's checksum, every offset-table row and every task's metadata.

        Returns
        -------
        dict with ``ok`` (bool), ``problems`` (list of str naming the damaged task or array) and
        ``checked`` (counts of what was read).
        """
        problems = []
        names = self.meta["tensors"]
        owners = {(OWNER_TASK, tm["id"]): f"task {t!r}" for t, tm in self.meta["tasks"].items()}
        owners.update({(OWNER_SHARED, int(c)): f"cluster {c} (tasks {', '.join(m['tasks'])})" for c, m in self.meta["clusters"].items()})
        length = int(self._payload.shape[0])

        def owner_of(row):
            return owners.get((int(row[0]), int(row[1])), f"unknown owner {int(row[0])}/{int(row[1])}")

        for row in self._index:
            kind, owner, tensor, role, rows, cols, bits, offset, nbytes = (int(v) for v in row)
            where = f"{owner_of(row)}, tensor {names[tensor] if 0 <= tensor < len(names) else tensor}"
            if (kind, owner) not in owners:
                problems.append(f"index row for {where} belongs to no task or cluster in the metadata")
            if not 0 <= tensor < len(names) or not 0 <= role < len(ROLES) or bits not in (32, 16, 8, 4, 2):
                problems.append(f"index row for {where} has an invalid tensor, role or bit width")
                continue
            if offset < 0 or offset + nbytes > length:
                problems.append(f"{where}: factor {ROLES[role]} lies outside the payload ({offset}+{nbytes} > {length})")
            elif nbytes != payload_nbytes(rows, cols, bits):
                problems.append(f"{where}: factor {ROLES[role]} has {nbytes} bytes, its shape and bits need {payload_nbytes(rows, cols, bits)}")
            else:
                problems.extend(f"{where}: {p}" for p in self._check_factor_shape(names[tensor], ROLES[role], rows, cols))
        for task, tm in self.meta["tasks"].items():
            missing = {"id", "cluster", "kind", "raw_bytes", "rel_error", "source"} - set(tm)
            if missing:
                problems.append(f"task {task!r}: metadata lacks {', '.join(sorted(missing))}")
            elif tm["cluster"] is not None and str(tm["cluster"]) not in self.meta["clusters"]:
                problems.append(f"task {task!r}: its cluster {tm['cluster']} is not in the metadata")
        # every payload chunk: zarr checks the crc32c when it decodes a chunk
        chunks = (length + PAYLOAD_CHUNK - 1) // PAYLOAD_CHUNK
        for i in range(chunks):
            lo, hi = i * PAYLOAD_CHUNK, min(length, (i + 1) * PAYLOAD_CHUNK)
            try:
                _read_array(self._payload, "payload", slice(lo, hi))
            except IntegrityError:
                hit = self._index[(self._index[:, 7] < hi) & (self._index[:, 7] + self._index[:, 8] > lo)]
                affected = sorted({owner_of(row) for row in hit}) or ["no live data (reclaimable bytes)"]
                problems.append(f"payload chunk {i} (bytes {lo}-{hi}) fails its checksum; affected: {'; '.join(affected)}")
        return {"ok": not problems, "problems": problems, "checked": {"index_rows": len(self._index), "payload_chunks": chunks, "tasks": len(self.meta["tasks"])}}

    def _check_factor_shape(self, name, role, rows, cols):
        mshape = matrix_shape(self.shapes[name])
        numel = int(torch.Size(self.shapes[name]).numel())
        if role in ("dense", "mu"):
            return [] if (rows, cols) == (numel, 1) else [f"{role} factor has shape {(rows, cols)}, expected {(numel, 1)}"]
        if role == "S":
            return [] if rows == numel else [f"seed basis S has {rows} rows, expected {numel}"]
        if mshape is None:
            return [f"factor {role} stored for a tensor that is stored densely"]
        expected_rows = {"U": mshape[0], "A": mshape[0], "V": mshape[1], "B": mshape[1]}.get(role)
        if expected_rows is not None and rows != expected_rows:
            return [f"factor {role} has {rows} rows, expected {expected_rows}"]
        return []

    # -- writing -------------------------------------------------------------------------
    @contextmanager
    def _transaction(self, message, metadata, wait=0.0):
        """Hold the writer lock, yield (root group, new metadata), commit once on success."""
        with _WriterLock(self.path / "writer.lock", wait=wait):
            self._refresh()  # another writer may have committed since we started
            session = self._repo.writable_session("main")
            root = zarr.open_group(session.store, mode="r+")
            meta = json.loads(json.dumps(self.meta))  # deep copy; self.meta stays the old snapshot's
            yield root, meta
            meta["digest"] = _digest(meta, _read_array(root["index"], "index"), int(root["payload"].shape[0]))
            root.attrs["tvbase"] = meta
            snapshot = session.commit(message, metadata={**metadata, "tvbase_version": __version__})
        self._load(snapshot)

    def ingest(self, items, params=None, base=None, device=None, progress=True, wait=0.0, method="tvbase", n_components=None):
        """Add fine-tuned checkpoints as tasks, in one commit.

        Parameters
        ----------
        items : dict task name -> checkpoint path (same format and tensors as the base)
        params : FitParams or None, default: the store's recorded parameters.
        base : path of the base checkpoint, default: the path recorded at ``init``.
        device : where the factorization runs (default CUDA when available).
        wait : seconds to wait for another writer's lock.
        method : "tvbase" (default) or a Task Vector Bases seed method: "pca", "autoencoder",
            "cluster-merge" (see ``tvbase.ingest.seed.SEED_METHODS``).
        n_components : number of basis vectors M for a seed method (default T // 2, or the
            eigengap's cluster count for cluster-merge).

        With "tvbase", the first ingest into an empty store fits cluster-shared bases over its
        tasks; later ingests store each new task as a per-task truncated SVD until ``compact``.
        A seed method fits one basis over the tasks of this ingest, stored at fp32 unless
        ``params`` says otherwise, as in the paper.
        """
        items = dict(items)
        self._refresh()
        if not items:
            raise InvalidInputError("nothing to ingest: give at least one NAME=PATH")
        for name in items:
            validate_task_name(name)
            if name in self.meta["tasks"]:
                raise AlreadyExistsError(f"task {name!r} already exists in {self.path}; remove it first or choose another name")
        if method != "tvbase" and method not in SEED_METHODS:
            raise InvalidInputError(f"unknown method {method!r}; choose one of: tvbase, {', '.join(SEED_METHODS)}")
        if params is None:
            params = FitParams.from_dict(self.meta["params"])
            if method != "tvbase":
                params.bits = params.dense_bits = 32
        validate_params(params)
        device = _device(device)
        base_ckpt = self.open_base(base)
        checkpoints = {}
        try:
            for name, path in items.items():
                checkpoints[name] = ckpt = Checkpoint.open(path)
                check_compatible(self.meta["base"]["tensors"], ckpt, f"task {name!r} ({path})")
            shared = not self.meta["tasks"]  # first fit; later tasks wait for `compact`
            source = _IngestSource(base_ckpt, checkpoints)
            if method == "tvbase":
                result = fit(source, list(items), self.shapes, params, shared, device, progress)
            else:
                result = fit_seed(source, list(items), self.shapes, method, params, n_components, device, progress)
            hashes = {name: ckpt.fingerprint()["hash"] for name, ckpt in checkpoints.items()}
        finally:
            base_ckpt.close()
            for ckpt in checkpoints.values():
                ckpt.close()
        message = f"ingest {', '.join(items)}"
        with self._transaction(message, {"op": "ingest", "tasks": list(items)}, wait) as (root, meta):
            taken = sorted(set(items) & set(meta["tasks"]))
            if taken or (method == "tvbase" and bool(meta["tasks"]) != (not shared)):
                raise AlreadyExistsError(f"another writer changed the store during this ingest ({', '.join(taken) or 'new tasks'}); run it again")
            sources = {name: {"path": str(Path(p).resolve()), "hash": hashes[name]} for name, p in items.items()}
            _write_fit(root, meta, result, self.shapes, params, sources, append=True, method=method)
            if shared and method == "tvbase":
                meta["params"] = params.to_dict()
        return self.version

    def rm(self, names, wait=0.0):
        """Remove tasks (one commit). Their bytes are reclaimed by ``compact``."""
        names = list(dict.fromkeys(names))
        self._refresh()
        for name in names:
            self._task_meta(name)
        with self._transaction(f"rm {', '.join(names)}", {"op": "rm", "tasks": names}, wait) as (root, meta):
            for name in names:  # another writer may have changed the store since we opened it
                self._task_meta(name)
            ids = {meta["tasks"][n]["id"] for n in names}
            for n in names:
                del meta["tasks"][n]
            live_clusters = {tm["cluster"] for tm in meta["tasks"].values()}
            dead = {int(c) for c in meta["clusters"] if int(c) not in live_clusters}
            for c in dead:
                del meta["clusters"][str(c)]
            index = self._index
            keep = ~(((index[:, 0] == OWNER_TASK) & np.isin(index[:, 1], list(ids))) | ((index[:, 0] == OWNER_SHARED) & np.isin(index[:, 1], list(dead))))
            _write_index(root["index"], index[keep])
            for c in meta["clusters"].values():
                c["tasks"] = [t for t in c["tasks"] if t in meta["tasks"]]
        return self.version

    def compact(self, params=None, device=None, progress=True, wait=0.0):
        """Refit clusters and shared factors over every task in the store, as one commit.

        Each task is refitted from its original fine-tuned checkpoint when that file is still at
        its recorded path with its recorded content hash (and the base too); otherwise from its
        rebuild out of the current version, whose relative error is then recorded as the
        upper bound old error + refit error. The payload is rewritten without dead bytes.
        """
        self._refresh()
        if not self.meta["tasks"]:
            raise InvalidInputError(f"store {self.path} has no tasks to compact")
        params = params or FitParams.from_dict(self.meta["params"])
        validate_params(params)
        device = _device(device)
        tasks = self.tasks
        fitted_version = self.version
        source = self._compact_source(tasks, device)
        try:
            result = fit(source, tasks, self.shapes, params, True, device, progress)
        finally:
            source.close()
        old = {t: dict(self.meta["tasks"][t]) for t in tasks}
        for t in tasks:
            if t not in source.originals:
                result.rel_error[t] += old[t]["rel_error"]
        with self._transaction("compact", {"op": "compact", "tasks": tasks}, wait) as (root, meta):
            if self.version != fitted_version:  # committing would undo another writer's change
                raise StoreLockedError("another writer changed the store while compact was fitting; run compact again")
            meta["tasks"], meta["clusters"] = {}, {}
            sources = {t: old[t]["source"] for t in tasks}
            _write_fit(root, meta, result, self.shapes, params, sources, append=False, previous=old)
            for t in tasks:
                meta["tasks"][t]["refit_from"] = "original" if t in source.originals else "stored"
            meta["params"] = params.to_dict()
        return self.version

    def gc(self, keep, wait=0.0):
        """Expire all but the ``keep`` newest versions of main and delete what only they used.

        Returns the number of expired versions. Tags keep their snapshots alive.
        """
        if not isinstance(keep, int) or keep < 1:
            raise InvalidInputError(f"--keep must be a positive integer, got {keep!r}")
        with _WriterLock(self.path / "writer.lock", wait=wait):
            history = list(self._repo.ancestry(branch="main"))
            if len(history) <= keep:
                return 0
            cutoff = history[keep - 1].written_at
            expired = self._repo.expire_snapshots(older_than=cutoff)
            self._repo.garbage_collect(delete_object_older_than=cutoff)
        self._load(self._repo.lookup_branch("main"))
        return len(expired)

    def _compact_source(self, tasks, device):
        """Originals that are still on disk unchanged, the stored rebuild for the rest."""
        originals, base = {}, None
        try:
            base = self.open_base(None)
        except TvbaseError:
            pass  # base moved or changed: refit every task from its rebuild
        for task in tasks if base is not None else []:
            src = self.meta["tasks"][task]["source"]
            try:
                ckpt = Checkpoint.open(src["path"])
            except TvbaseError:
                continue
            if ckpt.fingerprint()["hash"] == src["hash"]:
                originals[task] = ckpt
            else:
                ckpt.close()
        return _CompactSource(base, originals, _StoreSource(self, device))

    def open_base(self, base=None):
        """Open the base checkpoint (``base``, or the path recorded at init) after checking that it
        is this store's base: same tensors and same content hash. The caller closes it."""
        path = base or self.meta["base"]["path"]
        try:
            ckpt = Checkpoint.open(path)
        except NotFoundError:
            if base:
                raise
            raise NotFoundError(
                f"the store's base model is not at {path} any more; pass its new location with --base"
            ) from None
        try:
            check_compatible(self.meta["base"]["tensors"], ckpt, f"base ({path})")
            if ckpt.fingerprint()["hash"] != self.meta["base"]["hash"]:
                raise InvalidInputError(
                    f"base at {path} has the right tensor names, shapes and dtypes but different values than the "
                    "base this store was created with (content hash differs); pass the original base with --base"
                )
        except BaseException:
            ckpt.close()
            raise
        return ckpt


def validate_params(p):
    """Check FitParams once at the boundary; messages quote the offending value."""
    if p.rank is None:
        if p.budget is None or not (0 < p.budget < 1):
            raise InvalidInputError(f"budget must be a fraction in (0, 1) such as 0.03 or '3%', got {p.budget!r}")
    elif not isinstance(p.rank, int) or p.rank < 1:
        raise InvalidInputError(f"rank must be a positive integer, got {p.rank!r}")
    if not (0 <= p.residual_share < 1):
        raise InvalidInputError(f"residual share must be in [0, 1), got {p.residual_share!r}")
    for field in ("bits", "dense_bits"):
        if getattr(p, field) not in (32, 16, 8, 4, 2):
            raise InvalidInputError(f"{field} must be one of 32, 16, 8, 4, 2, got {getattr(p, field)!r}")
    if not isinstance(p.max_rank, int) or p.max_rank < 1:
        raise InvalidInputError(f"max rank must be a positive integer, got {p.max_rank!r}")
    if not (p.n_clusters == "auto" or (isinstance(p.n_clusters, int) and p.n_clusters >= 1)):
        raise InvalidInputError(f"n_clusters must be 'auto' or a positive integer, got {p.n_clusters!r}")
    if isinstance(p.sketch_dim, bool) or not isinstance(p.sketch_dim, int) or p.sketch_dim < 1:
        raise InvalidInputError(f"sketch_dim must be a positive integer, got {p.sketch_dim!r}")
    for field in ("task_weight", "tensor_weight"):
        value = getattr(p, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -4 <= value <= 4:
            raise InvalidInputError(f"{field} must be a number in [-4, 4], got {value!r}")


def _device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise InvalidInputError(f"unknown device {device!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device {str(device)!r} is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return device


def _unknown(kind, name, known):
    import difflib

    hint = difflib.get_close_matches(name, known, n=1)
    listing = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "") if known else "(none)"
    return f"no {kind} {name!r} in this store" + (f"; did you mean {hint[0]!r}?" if hint else "") + f". Known: {listing}"


def _resolve_version(repo, at):
    if at is None:
        return repo.lookup_branch("main")
    if at in repo.list_tags():
        return repo.lookup_tag(at)
    ids = [s.id for s in repo.ancestry(branch="main") if "__root" not in s.metadata]
    matches = [i for i in ids if i.startswith(at.upper())] if at else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidInputError(f"version prefix {at!r} is ambiguous: {', '.join(matches[:5])}")
    raise NotFoundError(f"no version {at!r} in this store; `tvbase log` lists the versions")


def _codecs():
    return {"compressors": zarr_compressors()}


def _create_arrays(root):
    root.create_array("payload", shape=(0,), chunks=(PAYLOAD_CHUNK,), dtype="uint8", fill_value=0, **_codecs())
    root.create_array("index", shape=(0, len(INDEX_COLUMNS)), chunks=(INDEX_CHUNK, len(INDEX_COLUMNS)), dtype="int64", fill_value=0, **_codecs())


def _read_array(array, label, selection=slice(None)):
    try:
        return array[selection]
    except ValueError as e:
        if "checksum" in str(e):
            raise IntegrityError(f"checksum mismatch in array {label!r}: the store is damaged; run `tvbase verify`") from None
        raise IntegrityError(f"array {label!r} cannot be read ({e}): the store is damaged; run `tvbase verify`") from None
    except Exception as e:  # a missing or truncated chunk file surfaces as an Icechunk/IO error
        raise IntegrityError(f"array {label!r} cannot be read ({type(e).__name__}: {e}): the store is damaged") from None


def _digest(meta, index, payload_bytes):
    """sha256 of the metadata (without its digest), the offset table and the payload length.

    Icechunk checksums no snapshot, and zarr's crc32c covers chunks only: without this a flipped
    bit in a task's id would rebuild another task's factors and exit 0.
    """
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(index, dtype="<i8").tobytes())
    h.update(str(int(payload_bytes)).encode())
    return h.hexdigest()


def _write_index(array, rows):
    array.resize(rows.shape)
    if len(rows):
        array[:] = rows


def _write_fit(root, meta, result, shapes, params, sources, append, previous=None, method="tvbase"):
    """Append (or, for compact, replace) the factors of a FitResult and record its metadata."""
    tensor_id = {name: i for i, name in enumerate(meta["tensors"])}
    payload, index_array = root["payload"], root["index"]
    offset = int(payload.shape[0]) if append else 0
    index = _read_array(index_array, "index") if append else np.zeros((0, len(INDEX_COLUMNS)), dtype=np.int64)
    chunks, rows = [], []

    def add(kind, owner, name, role, q):
        nonlocal offset
        data = q.to_bytes()
        rows.append([kind, owner, tensor_id[name], ROLES.index(role), q.shape[0], q.shape[1], q.bits, offset, len(data)])
        chunks.append(np.frombuffer(data, dtype=np.uint8))
        offset += len(data)

    cluster_ids = {}
    for c in sorted(result.clusters):
        cid = cluster_ids[c] = meta["next_cluster_id"]
        meta["next_cluster_id"] += 1
        for name, basis in result.clusters[c].items():
            for role, q in basis.parts():
                add(OWNER_SHARED, cid, name, role, q)
        meta["clusters"][str(cid)] = {"tasks": [t for t, lab in result.labels.items() if lab == c], "method": method, **result.info}
    task_ids = {}
    for task, tensors in result.tasks.items():
        tid = task_ids[task] = meta["next_task_id"]
        meta["next_task_id"] += 1
        coefficients = None
        for name, tt in tensors.items():
            coefficients = tt.coef if tt.coef is not None else coefficients
            for role, q in tt.parts():
                if role != "dense":
                    add(OWNER_TASK, tid, name, role, q)
        label = result.labels[task]
        meta["tasks"][task] = {
            "id": tid,
            "cluster": cluster_ids.get(label) if label is not None else None,
            "kind": method if method != "tvbase" else ("shared" if label is not None else "svd"),
            "source": sources[task],
            "raw_bytes": raw_bytes(shapes),
            "rel_error": result.rel_error[task],
            "energy": result.energy[task],
            "added": (previous or {}).get(task, {}).get("added", _now()),
            "params": params.to_dict(),
            **({"coefficients": list(coefficients)} if coefficients is not None else {}),
        }
    # Dense tensors go after every factor: interleaved with the factors in zstd blocks they
    # compressed worse (1.2% of the payload of the 3% ViT store, with int8 dense tensors).
    for task, tensors in result.tasks.items():
        for name, tt in tensors.items():
            if tt.dense is not None:
                add(OWNER_TASK, task_ids[task], name, "dense", tt.dense)
    new = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
    start = offset - len(new)
    payload.resize((offset,))
    if len(new):
        payload[start:offset] = new
    new_rows = np.asarray(rows, dtype=np.int64).reshape(-1, len(INDEX_COLUMNS))
    _write_index(index_array, np.concatenate([index, new_rows]))
