"""The Store facade: one tvbase store opened at one version.

Reading (``get``, ``compose``, ``iter_composition``, ``ls``, ``info``, ``verify``, ``log``) goes
through a :class:`~tvbase.snapshot.Snapshot`; writing (``ingest``, ``rm``, ``compact``) is
:mod:`tvbase.operations`', each inside one transaction of the
:class:`~tvbase.repository.Repository`; the layout of the bytes is :mod:`tvbase.format`'s.
"""

import json
from contextlib import contextmanager
from pathlib import Path

from . import format as fmt
from . import reports
from .errors import InvalidInputError, NotFoundError
from .methods.params import FitParams
from .names import unknown_name
from .repository import Repository, location, rerun_on_conflict
from .snapshot import Snapshot


class Store:
    """A tvbase store opened at one snapshot.

    Use :meth:`create` or :meth:`open`. Reads see the snapshot the store was opened at; write
    methods (``ingest``, ``rm``, ``compact``, ``gc``) exclude other writers, commit once, and
    move this object to the new snapshot. Their ``wait`` is how long to wait for another
    writer: for a local store's lock, and, where writers are told apart by commit conflicts
    (``s3://``, ``memory://``), how long to keep re-running an operation that lost a race (see
    :func:`tvbase.repository.rerun_on_conflict`).

    Attributes
    ----------
    path : Path (a local store) or str (``s3://BUCKET/PREFIX``, ``memory://NAME``)
    version : str, the snapshot id this object reads.
    meta : dict, the store's metadata at that version (see :mod:`tvbase.format`).
    """

    def __init__(self, repository, version):
        self._repo = repository
        self.path = repository.location.path
        self._load(version)

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path, base, params=None):
        """Create a store for the base model at ``base`` (a .safetensors file or sharded directory).

        Parameters
        ----------
        path : str or Path, a directory that does not exist yet (or is empty), an
            ``s3://BUCKET/PREFIX`` that holds no repository yet, or ``memory://NAME``.
        base : str or Path, an ``s3://`` URL, or a hub id ``org/name[@revision]`` of a model in
            the local Hugging Face cache (see :func:`tvbase.io.hub.resolve_model_path`); its
            path is recorded.
        params : FitParams, defaults for later ingests.
        """
        where = location(path)
        from .io.checkpoint import Checkpoint
        from .io.hub import absolute_path, resolve_model_path

        where.check_vacant()  # before anything is read or made
        params = (params or FitParams()).validate()
        found = resolve_model_path(base)
        with Checkpoint.open(found) as checkpoint:
            fingerprint = checkpoint.fingerprint()
        repository = Repository.create(where)
        meta = fmt.new_metadata(absolute_path(found), fingerprint, params.to_dict())
        with repository.transaction(f"init store for base {Path(base).name}", {"op": "init"}) as tx:
            fmt.create_arrays(tx.root)
            fmt.seal(tx.root, meta)
        return cls(repository, tx.version)

    @classmethod
    def open(cls, path, at=None):
        """Open the store at ``path``, at its latest version or at version ``at`` (id, prefix or tag)."""
        repository = Repository.open(location(path))
        return cls(repository, repository.resolve(at))

    def _load(self, version):
        self._snapshot = Snapshot(self._repo.root(version), self.path, version) if version else None
        self.version = version
        self.meta = self._snapshot.meta

    def _refresh(self):
        """Move to the latest version of main: writes always build on it."""
        head = self._repo.head()
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
        return self._snapshot.shapes

    def _task_meta(self, name):
        if name not in self.meta["tasks"]:
            raise NotFoundError(unknown_name("task", name, self.tasks))
        return self.meta["tasks"][name]

    def iter_composition(self, coefficients, device=None, dtype=None):
        """Yield ``(tensor name, tensor)`` of ``sum alpha_t tau_t``, one tensor at a time.

        Parameters
        ----------
        coefficients : dict task name -> float
        device : str or torch.device, default: CUDA when available, else CPU.
        dtype : torch.dtype of the yielded tensors, default torch.float32.

        Terms are combined in sorted task order: equal requests give equal bits on one device
        and thread count, whatever the order of ``coefficients``.
        """
        import torch

        from .devices import resolve_device

        for task in coefficients:
            self._task_meta(task)
        device = resolve_device(device)
        dtype = torch.float32 if dtype is None else dtype
        snapshot = self._snapshot
        # validated above, before the first tensor is asked for: callers open outputs only then
        return ((name, snapshot.rebuild(name, coefficients, device).to(dtype)) for name in self.meta["tensors"])

    def composition_plan(self, coefficients, dtype=None):
        """``[(tensor name, shape, dtype)]`` of what :meth:`iter_composition` yields for the same
        request, in its order, known before any tensor is rebuilt (writers stream files with it:
        :func:`tvbase.io.save.save_checkpoint`'s ``plan``)."""
        import torch

        for task in coefficients:
            self._task_meta(task)
        dtype = torch.float32 if dtype is None else dtype
        return [(name, shape, dtype) for name, shape in self._snapshot.composition_shapes(coefficients).items()]

    def get(self, name, device=None, dtype=None):
        """Rebuild the task vector of task ``name``: dict tensor name -> tensor (base shapes)."""
        return dict(self.iter_composition({name: 1.0}, device, dtype))

    def compose(self, coefficients, device=None, dtype=None):
        """Rebuild ``sum alpha_t tau_t`` for a dict task -> alpha: dict tensor name -> tensor."""
        return dict(self.iter_composition(coefficients, device, dtype))

    def log(self):
        """Versions from newest to oldest: dicts with id, time, message, metadata."""
        return self._repo.log()

    def ls(self):
        """One dict per task: name, cluster, kind, stored bytes, raw bytes, relative error."""
        return reports.ls(self._snapshot)

    def info(self):
        """Store summary: tasks, clusters, bytes on disk and in factors, against raw fp32."""
        return reports.info(self._snapshot, self.path, self._repo.disk_bytes())

    def verify(self):
        """Check every chunk's checksum, every offset-table row and every task's metadata.

        Returns
        -------
        dict with ``ok`` (bool), ``problems`` (list of str naming the damaged task or array) and
        ``checked`` (counts of what was read).
        """
        return reports.verify(self._snapshot)

    # -- writing -------------------------------------------------------------------------
    @contextmanager
    def _write(self, message, metadata, wait=0.0):
        """One transaction: yield (writable root group, new metadata) at the head of main,
        record the metadata and commit once on success, then move to the new version."""
        with self._repo.transaction(message, metadata, wait) as tx:
            if tx.base_version != self.version:  # another writer committed since we opened it
                self._load(tx.base_version)
            meta = json.loads(json.dumps(self.meta))  # deep copy; self.meta stays the old snapshot's
            yield tx.root, meta
            fmt.seal(tx.root, meta)
        self._load(tx.version)

    def ingest(self, items, params=None, base=None, device=None, progress=True, wait=0.0, method="tvbase", n_components=None,
               max_memory=None, dask=None):
        """Add fine-tuned checkpoints as tasks, in one commit.

        Parameters
        ----------
        items : dict task name -> checkpoint path (same format and tensors as the base), or a
            hub id ``org/name[@revision]`` of a model in the local Hugging Face cache
        params : FitParams or None, default: the store's recorded parameters.
        base : path (or cached hub id) of the base checkpoint, default: the path recorded at ``init``.
        device : where the factorization runs (default CUDA when available).
        wait : seconds to wait for another writer (its lock, or re-runs after lost races).
        method : a name of ``tvbase.methods.METHODS``: "tvbase" (default), "svd", or a Task
            Vector Bases seed method: "pca", "autoencoder", "cluster-merge".
        n_components : number of basis vectors M for a seed method (default T // 2, or the
            eigengap's cluster count for cluster-merge).
        max_memory : bytes, or None. A fit planned to need more is refused before any work
            (InvalidInputError), and the store is left as it was.
        dask : None, or where the fit's per-task and per-tensor work runs: a Dask scheduler
            address (``tcp://HOST:8786``) or ``local:N``, a LocalCluster of N worker processes.
            The workers open the inputs themselves, so their paths (or ``s3://`` URLs) must be
            readable there; this process combines the results and commits once. ``device`` is
            then the workers' device (default: CUDA on a worker that has one).

        With "tvbase", the first ingest into an empty store fits cluster-shared bases over its
        tasks; later ingests project each new task onto the stored cluster whose bases capture
        it best (a core plus a per-task low-rank residual, kind ``projected``; method
        ``project``), or store it as a per-task truncated SVD where no basis is stored, until
        ``compact`` refits everything.
        A seed method fits one basis over the tasks of this ingest, stored at fp32 unless
        ``params`` says otherwise, as in the paper.

        A task whose input has the content hash of a stored task (or of another task of this
        ingest) is ingested all the same, with a :class:`~tvbase.errors.TvbaseWarning` naming
        that task: it is usually one checkpoint given twice.
        """
        from . import operations

        return rerun_on_conflict(
            lambda left: operations.ingest(self, items, params, base, device, progress, left, method, n_components, max_memory,
                                           dask),
            wait,
        )

    def rm(self, names, wait=0.0):
        """Remove tasks (one commit). Their bytes are reclaimed by ``compact``."""
        from . import operations

        return rerun_on_conflict(lambda left: operations.rm(self, names, left), wait)

    def compact(self, params=None, device=None, progress=True, wait=0.0, max_memory=None):
        """Refit clusters and shared factors over every task in the store, as one commit.

        Each task is refitted from its original fine-tuned checkpoint when that file is still at
        its recorded path with its recorded content hash (and the base too); otherwise from its
        rebuild out of the current version, whose relative error is then recorded as the
        upper bound old error + refit error. The payload is rewritten without dead bytes.
        The writer lock is held for the whole run; ``max_memory`` as for :meth:`ingest`.
        """
        from . import operations

        return rerun_on_conflict(lambda left: operations.compact(self, params, device, progress, left, max_memory), wait)

    def gc(self, keep, wait=0.0):
        """Expire all but the ``keep`` newest versions of main and delete what only they used.

        Returns the number of expired versions. Tags keep their snapshots alive.
        """
        expired = self._repo.gc(keep, wait)
        self._load(self._repo.head())
        return expired

    def open_base(self, base=None):
        """Open the base checkpoint after checking that it is this store's base: same tensors
        and same content hash. The caller closes it.

        The one place that finds the base for ingest, compact and export: ``base`` when given,
        else the path recorded at init, which is used only while its content is unchanged.

        Parameters
        ----------
        base : str, Path or None, where the base model is now (a path, or the hub id of a model in
            the local Hugging Face cache); None: the recorded path.

        Returns
        -------
        Checkpoint

        Raises
        ------
        NotFoundError
            If ``base`` does not exist, or, with ``base=None``, the recorded base is gone.
        BaseMismatchError, InvalidInputError
            If the checkpoint is not the store's base (other tensors, or the same tensors with
            other values); with ``base=None``, the message says the recorded base changed.
        """
        from .io.checkpoint import Checkpoint, check_compatible
        from .io.hub import resolve_model_path

        path = resolve_model_path(base) if base else self.meta["base"]["path"]
        # with the recorded base the user gave no path: say which one was read
        label = f"base ({path})" if base else f"the base recorded at init ({path})"
        try:
            checkpoint = Checkpoint.open(path)
        except NotFoundError:
            if base:
                raise
            raise NotFoundError(
                f"the store's base model is not at {path} any more; pass its new location with --base"
            ) from None
        try:
            check_compatible(self.meta["base"]["tensors"], checkpoint, label)
            if checkpoint.fingerprint()["hash"] != self.meta["base"]["hash"]:
                has = "has" if base else "changed since: it has"
                raise InvalidInputError(
                    f"{label} {has} the right tensor names, shapes and dtypes but different values than the "
                    "base this store was created with (content hash differs); pass the original base with --base"
                )
        except BaseException:
            checkpoint.close()
            raise
        return checkpoint

