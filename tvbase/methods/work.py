"""Where a fit's per-(task, tensor) work runs: in this process, or on a Dask cluster.

A pass of the fit (see :mod:`tvbase.methods.tucker`) is a sequence of items ``((task, name),
args)``: each reads one tensor of one task and runs a module-level function ``fn(x, *args)`` on
it, which returns what the driver combines (sums of sketches, Grams, candidate factors). A
*work* object runs the items and yields ``(key, result)`` in their order:

- :class:`LocalWork` runs them here, each next tensor read by a background thread while the
  current one is worked on (reading and decoding release the GIL);
- :class:`DaskWork` sends them to a Dask distributed cluster, whose workers open the inputs
  themselves (:class:`TaskReader`), so only what is far smaller than the inputs travels (the
  results, a cluster's range bases); Dask re-runs the items of a worker that dies.

Both run the same functions on the same inputs with the same seeds, so a fit on a cluster gives
the store a serial fit gives, up to the rounding of a different number of BLAS threads.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import os
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import ClusterError, InvalidInputError


class LocalWork:
    """Runs a pass in this process, reading one tensor ahead in a thread.

    Parameters
    ----------
    read : callable ``(task, name) -> torch.Tensor``, the delta as the source gives it.
    """

    def __init__(self, read):
        self._read = read
        self._since_trim = 0  # bytes read since free memory was last handed back

    def map(self, fn, items):
        """``(key, fn(read(*key), *args))`` for each ``(key, args)`` of ``items``, in order.

        ``items`` may be a generator: it is drawn one item ahead, when that item's read starts,
        so what it builds for a group of items lives only while they run."""
        with ThreadPoolExecutor(1, thread_name_prefix="tvbase-read") as pool:
            items = iter(items)

            def submit():
                item = next(items, None)
                return None if item is None else (item, pool.submit(self._read, *item[0]))

            pending = submit()
            try:
                while pending is not None:
                    (key, args), future = pending
                    pending = submit()  # the next read overlaps this item's work
                    x = future.result()
                    self._trim_now_and_then(getattr(x, "nbytes", 0))
                    yield key, fn(x, *args)
            finally:
                if pending is not None:
                    pending[1].cancel()

    def _trim_now_and_then(self, nbytes):
        self._since_trim += nbytes
        if self._since_trim >= TRIM_EVERY:
            self._since_trim = 0
            release_free_memory()

    def close(self):
        pass


# The reads are tensors of every size, allocated in the read thread's malloc arena and freed
# here. glibc keeps what is freed below its mmap threshold (up to 32 MiB) for reuse, and over a
# long fit those free holes make the peak (a fixed 1 MiB threshold cut a BERT-base ingest's peak
# from 1.40 to 1.11 GB, at 27% of its speed); handing them back every 512 MiB read costs nothing
# measurable.
TRIM_EVERY = 512 * 2**20  # bytes read
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if os.name == "posix" and ctypes.util.find_library("c") else None


def release_free_memory():
    """Hand the C allocator's free pages back to the system (glibc ``malloc_trim``; elsewhere
    nothing)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


class TaskReader:
    """The fit's inputs as a Dask worker opens them: the base and each task's path.

    Picklable; a worker process opens the checkpoints on its first read and keeps them open for
    the rest of the fit (one fit at a time per process: opening another closes the last).

    Parameters
    ----------
    base : str, where the base checkpoint is (a path the workers can read, or an ``s3://`` URL).
    reference : dict, the base's recorded tensors (``{name: {"shape", "dtype"}}``).
    tasks : dict task name -> (path, label), the full fine-tunes of the fit.
    """

    def __init__(self, base, reference, tasks):
        self.base, self.reference, self.tasks = str(base), reference, dict(tasks)
        self.token = uuid.uuid4().hex  # which fit a worker's open files belong to

    def read(self, task, name):
        with _OPEN_LOCK:  # a checkpoint's file handles serve one read at a time
            sources = _open_sources(self)
            if task not in sources:
                from ..io.sources import open_task

                path, label = self.tasks[task]
                sources[task] = open_task(path, sources[None], self.reference, label)
            return sources[task].tensor(name)


_OPEN_LOCK = threading.Lock()
_OPEN = {}  # token -> {None: base Checkpoint, task: source}, in a worker process


def _open_sources(reader):
    if reader.token not in _OPEN:
        for sources in _OPEN.values():  # another fit's inputs: done with
            for source in sources.values():
                source.close()
        _OPEN.clear()
        from ..io.checkpoint import Checkpoint

        _OPEN[reader.token] = {None: Checkpoint.open(reader.base)}
    return _OPEN[reader.token]


def _run_item(reader, key, fn, args, threads):
    """On a worker: read one tensor, run the item's function, hand back CPU tensors."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return _to_cpu(fn(reader.read(*key), *args))


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class DaskWork:
    """Runs a pass on a Dask distributed cluster, a bounded window of items in flight.

    Parameters
    ----------
    client : distributed.Client
    reader : TaskReader
    device : where the workers run the items (None: CUDA on a worker that has one, else its CPU).
    threads : int or None, torch threads per worker process (None: leave the workers' own).
    cluster : the LocalCluster this work started, closed with it (None for an existing cluster).
    """

    def __init__(self, client, reader, device=None, threads=None, cluster=None):
        self.client, self.reader, self.device, self.threads, self._cluster = client, reader, device, threads, cluster
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        # enough in flight to keep every worker busy; few enough that few results wait on the
        # workers (range sketches of the largest tensor: tens of MB each) and few plans are drawn ahead
        self.window = 2 * workers

    def map(self, fn, items):
        in_flight = collections.deque()
        items = iter(items)

        def submit():
            item = next(items, None)
            if item is None:
                return False
            # every item carries its inputs (the reader, a cluster's ranges) rather than refer to data
            # scattered once: a worker that dies would take scattered data with it, and its items
            # could not be re-run elsewhere
            key, args = item
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Large object", category=UserWarning)
                future = self.client.submit(_run_item, self.reader, key, fn, _to_cpu(args), self.threads, pure=False)
            in_flight.append((key, future))
            return True

        more = True
        try:
            while more or in_flight:
                while more and len(in_flight) < self.window:
                    more = submit()
                if not in_flight:
                    break
                key, future = in_flight.popleft()
                yield key, _result(future, key)
        finally:
            for _, future in in_flight:
                future.cancel()

    def close(self):
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def _result(future, key):
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    try:
        return future.result()
    except (KilledWorker, FutureCancelledError) as e:
        raise ClusterError(
            f"the Dask cluster lost the fit's work on task {key[0]!r}, tensor {key[1]!r}: its workers died more "
            f"often than the scheduler retries ({e}); nothing was written. Check the workers' memory and logs."
        ) from None


def connect(address, reader, device=None):
    """A :class:`DaskWork` on the cluster at ``address``: ``tcp://HOST:PORT`` (any scheduler
    address Dask accepts), or ``local:N`` for a LocalCluster of N worker processes on this
    machine, started here and stopped with the work."""
    try:
        import distributed
    except ImportError:
        raise InvalidInputError("--dask needs Dask distributed: pip install 'tvbase[dask]'") from None
    address = str(address)
    if address.startswith("local:"):
        count = address.removeprefix("local:")
        if not count.isdigit() or int(count) < 1:
            raise InvalidInputError(f"--dask local:N needs a positive number of workers, got {address!r}")
        n = int(count)
        try:
            cluster = distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
            )
        except Exception as e:  # worker processes that cannot start: say so, never a traceback
            raise ClusterError(f"cannot start a LocalCluster of {n} workers ({type(e).__name__}: {e}); nothing was written") from None
        # the machine's cores shared out among the workers, so they do not oversubscribe it
        threads = max(1, (os.cpu_count() or 1) // n)
        return DaskWork(distributed.Client(cluster), reader, device, threads=threads, cluster=cluster)
    if "://" not in address:
        raise InvalidInputError(f"--dask takes a scheduler address such as tcp://HOST:8786, or local:N; got {address!r}")
    try:
        client = distributed.Client(address, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} ({e}); nothing was written") from None
    return DaskWork(client, reader, device)
