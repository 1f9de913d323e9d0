"""Where a store lives and how writes to it are made: locations, writer exclusion, transactions,
versions and garbage collection, over an Icechunk repository.

A *location* says where the repository is and how writers exclude each other:

- a local directory (``STORE/repo`` is the Icechunk repository, ``STORE/writer.lock`` an
  exclusive fcntl lock held by the one writer, recording who holds it);
- ``s3://BUCKET/PREFIX``, a repository in object storage through Icechunk's S3 storage
  (settings from the usual AWS variables, see :mod:`tvbase.s3`);
- ``memory://NAME``, an in-memory repository of this process (for tests).

Object storage has no lock, so on the last two Icechunk's commit conflict detection refuses the
later of two concurrent writers, whole, and :func:`rerun_on_conflict` runs its operation again
when it may wait.

The repository knows nothing of tvbase's format: a transaction yields a writable zarr root and
commits it once.
"""

import datetime as _dt
import fcntl
import json
import os
import socket
import sys
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import icechunk
import zarr

from ._version import __version__
from .errors import (
    AlreadyExistsError,
    CommitConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StoreLockedError,
)
from .s3 import S3Settings, is_s3_url, split_url, storage_error, storage_errors

icechunk.set_logs_filter("error")  # its local-storage concurrency warning is handled by our lock

MEMORY_SCHEME = "memory://"


class Location(ABC):
    """Where one store's repository lives.

    Attributes
    ----------
    path : Path or str, how the store is named in messages and ``info``.
    """

    path = None

    @abstractmethod
    def storage(self) -> icechunk.Storage:
        """The Icechunk storage of the repository."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether a repository is there."""

    @abstractmethod
    def check_vacant(self) -> None:
        """Raise AlreadyExistsError when something is already there; changes nothing."""

    def prepare(self) -> None:
        """Make room for a new repository (after :meth:`check_vacant`)."""
        self.check_vacant()

    def config(self) -> icechunk.RepositoryConfig | None:
        """The Icechunk configuration to open the repository with (None: Icechunk's defaults)."""
        return None

    def writer_exclusion(self, wait):
        """Context manager held for a whole write. Default: none; Icechunk's commit conflict
        detection refuses the later of two concurrent writers (see :meth:`Repository.transaction`)."""
        return nullcontext()

    def disk_bytes(self, repo) -> int:
        """Bytes the repository takes, all versions together: here its chunks (native and
        inlined), without snapshots and manifests, which only a file listing would count."""
        stats = repo.chunk_storage_stats()
        return int(stats.native_bytes + stats.inlined_bytes)


class LocalDirectory(Location):
    """A store directory on a local file system: ``repo/`` and ``writer.lock``."""

    def __init__(self, path):
        self.path = Path(path)

    def storage(self):
        return icechunk.local_filesystem_storage(str(self.path / "repo"))

    def exists(self):
        return (self.path / "repo").is_dir()

    def check_vacant(self):
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise AlreadyExistsError(f"{self.path} already exists and is not an empty directory; choose a new store path")

    def prepare(self):
        self.check_vacant()
        self.path.mkdir(parents=True, exist_ok=True)

    def writer_exclusion(self, wait):
        return WriterLock(self.path / "writer.lock", wait=wait)

    def disk_bytes(self, repo):
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class InMemory(Location):
    """``memory://NAME``: a repository held by this process, shared by every open of NAME."""

    _storages = {}  # name -> icechunk.Storage, for the life of the process

    def __init__(self, name):
        if not name:
            raise InvalidInputError(f"an in-memory store needs a name: {MEMORY_SCHEME}NAME")
        self.name = name
        self.path = f"{MEMORY_SCHEME}{name}"

    def storage(self):
        if self.name not in self._storages:
            self._storages[self.name] = icechunk.in_memory_storage()
        return self._storages[self.name]

    def exists(self):
        return self.name in self._storages and icechunk.Repository.exists(self._storages[self.name])

    def check_vacant(self):
        if self.exists():
            raise AlreadyExistsError(f"{self.path} already exists; choose a new store name")

    def prepare(self):
        self.check_vacant()
        self._storages.pop(self.name, None)  # a storage left by a create that failed before its commit


class S3Location(Location):
    """``s3://BUCKET/PREFIX``: a repository in object storage, read and written by Icechunk's S3
    storage, with the endpoint, region and credentials of the environment (:mod:`tvbase.s3`).

    There is no lock file: writers are told apart by Icechunk's commit conflict detection (the
    default :meth:`Location.writer_exclusion`), and ``disk_bytes`` is what a listing of the
    objects under the prefix adds up to.
    """

    def __init__(self, url):
        self.bucket, key = split_url(url)
        self.prefix = key.strip("/")
        self.path = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.settings = S3Settings.from_env()  # once per open: a bad variable is refused before any request
        self.settings.check_reachable(self.path)

    def storage(self):
        return self.settings.icechunk_storage(self.bucket, self.prefix)

    def config(self):
        return self.settings.icechunk_config()

    def exists(self):
        with storage_errors(self.path):
            return icechunk.Repository.exists(self.storage())

    def check_vacant(self):
        if self.exists():
            raise AlreadyExistsError(f"{self.path} already holds a repository; choose a new prefix")

    def disk_bytes(self, repo):
        files = self.settings.filesystem()
        with storage_errors(self.path):
            return int(files.du(f"{self.bucket}/{self.prefix}".rstrip("/"), total=True))


def location(spec):
    """The :class:`Location` named by ``spec``: ``s3://BUCKET/PREFIX``, ``memory://NAME``, or a
    local directory path. Any other ``scheme://`` is refused, never taken for a folder name."""
    if isinstance(spec, Location):
        return spec
    text = str(spec)
    if text.startswith(MEMORY_SCHEME):
        return InMemory(text[len(MEMORY_SCHEME) :])
    if is_s3_url(text):
        return S3Location(text)
    if "://" in text:
        raise InvalidInputError(
            f"store location {text!r} is not supported: give a local directory, s3://BUCKET/PREFIX or {MEMORY_SCHEME}NAME"
        )
    return LocalDirectory(spec)


def rerun_on_conflict(operation, wait):
    """``operation(wait_left)``, run again after a :class:`CommitConflictError` until ``wait``
    seconds have passed; the last conflict is raised when they have.

    A writer that loses a race where writers are told apart by commit conflicts learns it at
    commit, after its fit, and nothing of it was committed. Its session is not rebased onto the
    winner's commit (Icechunk's ``session.rebase(ConflictDetector())``): every tvbase write
    rewrites the root group's ``tvbase`` attribute (task table, digest) and resizes ``payload``
    and ``index``, so Icechunk finds a conflict in every pair of writes, and a solver that kept
    this writer's side would drop the winner's tasks from the metadata. Nor can the fit be kept:
    it depends on the head it started from (the first ingest fits shared bases, later ones
    per-task SVD; the parameters are the store's; compact refits the head's tasks). So the whole
    operation runs again on the new head: it re-reads the store, re-checks its input (a task
    name the winner took is then refused as such), refits and commits. Only the loser pays, one
    refit per lost race, and each race has a winner, so writers never all starve.

    Parameters
    ----------
    operation : callable taking the seconds left to wait (for a location's lock) and returning
        the operation's result.
    wait : float, seconds; 0 refuses at the first conflict.
    """
    deadline = time.monotonic() + float(wait)
    pause = 0.05
    while True:
        try:
            return operation(max(deadline - time.monotonic(), 0.0))
        except CommitConflictError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)  # lets the winner finish what follows its commit
            pause = min(2 * pause, 1.0)


class WriterLock:
    """Exclusive writer lock on a file (fcntl, released by the OS if the holder dies)."""

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
        since = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "command": " ".join(sys.argv[:3])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


@dataclass
class Transaction:
    """One write in progress: ``root`` is writable, ``base_version`` the head it started from;
    ``version`` is the new snapshot id once the transaction has committed."""

    root: zarr.Group
    base_version: str
    version: str | None = None


class Repository:
    """An Icechunk repository at a location: versions of ``main``, transactions, gc.

    Build with :meth:`create` or :meth:`open`.
    """

    def __init__(self, where, repo):
        self.location, self._repo = where, repo

    @classmethod
    def create(cls, where):
        """A new, empty repository (no tvbase version yet) at location ``where``."""
        where.prepare()
        with storage_errors(where.path):
            return cls(where, icechunk.Repository.create(where.storage(), config=where.config()))

    @classmethod
    def open(cls, where):
        if not where.exists():
            raise NotFoundError(f"no tvbase store at {where.path} (create one with `tvbase init {where.path} --base BASE`)")
        with storage_errors(where.path):
            return cls(where, icechunk.Repository.open(where.storage(), config=where.config()))

    def head(self):
        """Snapshot id of the latest version of ``main``."""
        with storage_errors(self.location.path):
            return self._repo.lookup_branch("main")

    def root(self, version):
        """The read-only zarr root group of snapshot ``version``."""
        try:
            return zarr.open_group(self._repo.readonly_session(snapshot_id=version).store, mode="r")
        except Exception as e:  # damaged snapshot or manifest: never a traceback, never a guess
            mapped = storage_error(e, str(self.location.path))  # ...and an unreachable server is no damage
            if mapped is not None:
                raise mapped from None
            raise IntegrityError(f"store {self.location.path} is damaged at version {version}: {type(e).__name__}: {e}") from None

    def resolve(self, at):
        """Snapshot id of version ``at``: None (latest), a tag, or an id or unique id prefix."""
        if at is None:
            return self.head()
        with storage_errors(self.location.path):
            if at in self._repo.list_tags():
                return self._repo.lookup_tag(at)
        matches = [v["id"] for v in self.log() if v["id"].startswith(at.upper())] if at else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidInputError(f"version prefix {at!r} is ambiguous: {', '.join(matches[:5])}")
        raise NotFoundError(f"no version {at!r} in this store; `tvbase log` lists the versions")

    def log(self):
        """Versions from newest to oldest: dicts with id, time, message, metadata."""
        with storage_errors(self.location.path):
            return [
                {"id": s.id, "time": s.written_at.isoformat(timespec="seconds"), "message": s.message, "metadata": dict(s.metadata)}
                for s in self._repo.ancestry(branch="main")
                if "__root" not in s.metadata  # Icechunk's empty initial snapshot holds no tvbase store
            ]

    @contextmanager
    def transaction(self, message, metadata, wait=0.0):
        """Exclude other writers, yield a :class:`Transaction` on the head of ``main``, and
        commit once when the block ends without an exception (nothing is written otherwise).

        Raises StoreLockedError when another writer holds the location's lock past ``wait``
        seconds, and its CommitConflictError when another writer committed first where writers
        are told apart by commit conflicts (this write is then not committed at all; see
        :func:`rerun_on_conflict`). A storage failure (StorageError) commits nothing either:
        chunks written before it are unreferenced, and ``gc`` deletes them.
        """
        with self.location.writer_exclusion(wait), storage_errors(self.location.path):
            session = self._repo.writable_session("main")
            tx = Transaction(zarr.open_group(session.store, mode="a"), session.snapshot_id)  # "a": create makes the root
            yield tx
            try:
                tx.version = session.commit(message, metadata={**metadata, "tvbase_version": __version__})
            except icechunk.ConflictError:
                raise CommitConflictError(
                    f"another writer committed to {self.location.path} during this write; nothing was written: run it "
                    "again, or pass --wait SECONDS to re-run it until it commits"
                ) from None

    def gc(self, keep, wait=0.0):
        """Expire all but the ``keep`` newest versions of main and delete what only they used.

        Returns the number of expired versions. Tags keep their snapshots alive.
        """
        if not isinstance(keep, int) or keep < 1:
            raise InvalidInputError(f"--keep must be a positive integer, got {keep!r}")
        with self.location.writer_exclusion(wait), storage_errors(self.location.path):
            history = list(self._repo.ancestry(branch="main"))
            if len(history) <= keep:
                return 0
            cutoff = history[keep - 1].written_at
            expired = self._repo.expire_snapshots(older_than=cutoff)
            self._repo.garbage_collect(delete_object_older_than=cutoff)
        return len(expired)

    def disk_bytes(self):
        return self.location.disk_bytes(self._repo)
