"""One version of a store, opened for reading: metadata, offset table and payload reads.

A :class:`Snapshot` finds each task's and cluster's factors through the offset table, decodes
payload chunks through a small cache, and hands the factors of one tensor to
:func:`tvbase.reconstruct.rebuild_tensor`.
"""

import numpy as np

from .codec.factors import SharedBasis, TaskTensor
from .codec.payload import PAYLOAD_CHUNK
from .codec.sparse import record_problem, tensor_seed
from .errors import IntegrityError
from .format import OWNER_SHARED, OWNER_TASK, ROLES, load, read_array

# Decoded payload chunks kept per open snapshot: at least 8 (16 MiB), and two per owner (task or
# cluster) a rebuild reads from, up to 128 (256 MiB). Each owner's factors lie tensor after tensor
# in the payload, so a rebuild walks every owner's region forward; with fewer chunks than that, a
# composition of 8 tasks decoded each chunk about 15 times over.
_MIN_CHUNK_CACHE, _MAX_CHUNK_CACHE = 8, 128


class Snapshot:
    """The store at one version.

    Parameters
    ----------
    root : zarr.Group of the version, read-only.
    where : str, how messages name the store.
    version : str, the snapshot id.

    Attributes
    ----------
    version : str
    meta : dict, the ``tvbase`` attribute (see :mod:`tvbase.format`).
    index : ndarray of shape (n_entries, 9), int64, the offset table.
    payload : zarr.Array of uint8.
    """

    def __init__(self, root, where, version):
        self.version = version
        self._root = root
        self.meta, self.index, self.payload = load(root, where, version)
        self.tensor_id = {name: i for i, name in enumerate(self.meta["tensors"])}
        self._rows = {}  # (owner_kind, owner_id, tensor_id) -> {role: index row}
        for row in self.index:
            self._rows.setdefault((int(row[0]), int(row[1]), int(row[2])), {})[ROLES[int(row[3])]] = row
        self._shared_cache = {}
        self._chunk_cache = {}  # chunk number -> decoded bytes, at most _cache_chunks of them
        self._cache_chunks = _MIN_CHUNK_CACHE

    @property
    def shapes(self):
        """Tensor name -> shape of the base, in the base's order."""
        return {name: tuple(self.meta["base"]["tensors"][name]["shape"]) for name in self.meta["tensors"]}

    @property
    def payload_length(self):
        return int(self.payload.shape[0])

    def rebuild(self, name, coefficients, device):
        """``sum alpha_t tau_t`` of tensor ``name`` for a dict task -> alpha (tasks known).

        Terms are combined in sorted task order, so equal requests give equal bits whatever the
        order of the dict.
        """
        from .reconstruct import rebuild_tensor  # torch: loaded by the first rebuild, not by ls/info/log

        return rebuild_tensor(self.shapes[name], self._terms(name, coefficients), device=device,
                              bf16_tolerance=self.bf16_tolerance(coefficients, device))

    def bf16_tolerance(self, coefficients, device):
        """The bfloat16 tolerance a rebuild of ``coefficients`` on ``device`` passes to
        :func:`tvbase.reconstruct.rebuild_tensor`: bfloat16 products only where the device has
        units for them and their rounding keeps every task's recorded error true; else None."""
        from .devices import bf16_products
        from .reconstruct import bf16_tolerance

        errors = [self.meta["tasks"][t].get("rel_error") or 0.0 for t in coefficients]
        return bf16_tolerance(errors) if bf16_products(device) else None

    def factors(self, name, coefficients, device):
        """The same sum for a matrix as factors ``(L (m, k), R (n, k))`` with ``L @ R.T`` equal to
        it but for its sparse residuals, or None where there are none (see
        :func:`tvbase.reconstruct.factor_tensor`)."""
        from .reconstruct import factor_tensor

        return factor_tensor(self.shapes[name], self._terms(name, coefficients), device=device)

    def has_sparse(self, name, tasks):
        """Whether any of ``tasks`` keeps a sparse residual of tensor ``name`` (which
        :meth:`factors` leaves out)."""
        tid = self.tensor_id[name]
        return any("sparse" in self._rows.get((OWNER_TASK, self.meta["tasks"][t]["id"], tid), {}) for t in tasks)

    def added_rows(self, task):
        """{tensor name: rows} that ``task`` added after the base's (fine-tunes that added tokens)."""
        tid, role = self.meta["tasks"][task]["id"], ROLES.index("new_rows")
        names = self.meta["tensors"]
        return {names[int(r[2])]: int(r[5]) for r in self.index if int(r[0]) == OWNER_TASK and int(r[1]) == tid and int(r[3]) == role}

    def composition_shapes(self, tasks):
        """Tensor name -> shape of a composition of ``tasks``, in the base's order: the base's
        shape, with as many more rows as the task that added most rows to it added."""
        added = [self.added_rows(task) for task in tasks]
        shapes = {}
        for name, shape in self.shapes.items():
            more = max((rows.get(name, 0) for rows in added), default=0)
            shapes[name] = (shape[0] + more, *shape[1:]) if more else shape
        return shapes

    def _terms(self, name, coefficients):
        clusters = {self.meta["tasks"][task]["cluster"] for task in coefficients}
        self._cache_chunks = min(max(_MIN_CHUNK_CACHE, 2 * (len(coefficients) + len(clusters))), _MAX_CHUNK_CACHE)
        terms = []
        for task in sorted(coefficients):
            cluster = self.meta["tasks"][task]["cluster"]
            shared = self._shared(cluster, name) if cluster is not None else None
            terms.append((coefficients[task], shared, self._task_tensor(task, name)))
        return terms

    def read_payload(self, start, n):
        """Bytes ``start:start+n`` of the payload, through a small cache of decoded chunks.

        Factors are small and packed back to back, so one 2 MiB chunk serves many reads; decoding
        it once (checksum included) instead of per factor makes a rebuild ~10x faster.
        """
        end = min(start + n, self.payload_length)
        parts = []
        for chunk in range(start // PAYLOAD_CHUNK, (max(end, start + 1) - 1) // PAYLOAD_CHUNK + 1):
            if chunk not in self._chunk_cache:
                if len(self._chunk_cache) >= self._cache_chunks:
                    self._chunk_cache.pop(next(iter(self._chunk_cache)))  # oldest first
                lo = chunk * PAYLOAD_CHUNK
                self._chunk_cache[chunk] = read_array(self.payload, "payload", slice(lo, lo + PAYLOAD_CHUNK))
            base = chunk * PAYLOAD_CHUNK
            data = self._chunk_cache[chunk]
            parts.append(data[max(start - base, 0) : max(min(end - base, len(data)), 0)])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def stored_bytes(self):
        """Bytes the chunks of this version's arrays take in the repository (compressed)."""
        return int(self.payload.nbytes_stored()) + int(self._root["index"].nbytes_stored())

    def owned_bytes(self, kind, owner):
        """Payload bytes of the factors of one task (``OWNER_TASK``) or cluster (``OWNER_SHARED``)."""
        rows = self.index[(self.index[:, 0] == kind) & (self.index[:, 1] == owner)] if len(self.index) else self.index
        return int(rows[:, 8].sum())

    def _read_factor(self, row):
        from .codec.quantize import QuantizedMatrix

        start, n = int(row[7]), int(row[8])
        data = self.read_payload(start, n)
        if data.shape[0] != n:
            raise IntegrityError(f"payload ends before entry at offset {start} (+{n} bytes); run `tvbase verify`")
        return QuantizedMatrix.from_bytes(data, int(row[6]), (int(row[4]), int(row[5])))

    def _shared(self, cluster, name):
        key = (cluster, name)
        if key not in self._shared_cache:
            rows = self._rows.get((OWNER_SHARED, cluster, self.tensor_id[name]))
            self._shared_cache[key] = SharedBasis(**{r: self._read_factor(row) for r, row in rows.items()}) if rows else None
        return self._shared_cache[key]

    def _task_tensor(self, task, name):
        tm = self.meta["tasks"][task]
        rows = self._rows.get((OWNER_TASK, tm["id"], self.tensor_id[name]), {})
        mask = None
        if "sparse" in rows:
            problem = record_problem(tm.get("sparse"))
            if problem:
                raise IntegrityError(f"task {task!r}, tensor {name!r}: {problem}; run `tvbase verify`")
            mask = (tensor_seed(tm["sparse"]["seed"], name), tm["sparse"]["threshold"])
        return TaskTensor(coef=tm.get("coefficients"), sparse_mask=mask, **{role: self._read_factor(row) for role, row in rows.items()})
