"""The store's writes: ingest, rm and compact, each one transaction.

Each opens its inputs through :mod:`tvbase.io.sources`, fits with a method of
:mod:`tvbase.methods`, and writes through :mod:`tvbase.format` inside ``Store._write`` (one
commit). Everything that can be refused is refused before the fit starts.
"""

import math
import warnings

from .devices import resolve_device
from .errors import AlreadyExistsError, CommitConflictError, InvalidInputError, TvbaseError, TvbaseWarning
from .format import drop_tasks, write_fit
from .io.hub import absolute_path, resolve_model_path
from .io.sources import LoraAdapter, StoredTask, TaskVectors, open_task
from .methods import FitParams, get_method
from .methods.lora import KIND as LORA_KIND
from .methods.lora import fit_lora
from .methods.result import FitResult
from .names import validate_task_name

COMPACT_METHOD = "tvbase"  # compact refits every task, whatever stored it, with the store's own method


def check_memory(estimator, shapes, n_tasks, max_memory):
    """Refuse, before any work, a fit whose planned peak memory exceeds ``max_memory`` bytes."""
    if max_memory is None:
        return
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or max_memory <= 0:
        raise InvalidInputError(f"max memory must be a positive number of bytes, got {max_memory!r}")
    need = estimator.planned_peak_bytes(shapes, n_tasks)
    if need > max_memory:
        largest = max(shapes, key=lambda name: math.prod(shapes[name]))
        raise InvalidInputError(
            f"this fit of {n_tasks} task(s) is planned to need {need / 2**30:.2f} GiB, more than the "
            f"--max-memory of {max_memory / 2**30:.2f} GiB (largest tensor {largest!r} {list(shapes[largest])}); "
            "raise --max-memory, ingest fewer tasks at once, or lower --max-rank. Nothing was written."
        )


def ingest(store, items, params=None, base=None, device=None, progress=True, wait=0.0, method="tvbase", n_components=None,
           max_memory=None, dask=None):
    """Add fine-tunes as tasks, in one commit; see :meth:`tvbase.Store.ingest`."""
    items = dict(items)
    store._refresh()
    if not items:
        raise InvalidInputError("nothing to ingest: give at least one NAME=PATH")
    for name in items:
        validate_task_name(name)
        if name in store.meta["tasks"]:
            raise AlreadyExistsError(f"task {name!r} already exists in {store.path}; remove it first or choose another name")
    items = {name: resolve_model_path(path) for name, path in items.items()}  # hub ids -> cache folders
    requested = get_method(method)
    first = not _fitted_tasks(store.meta)
    # a method with a growth method (tvbase) fits an empty store and grows it another way until
    # `compact`: the fit depends on whether the store is empty, so a change of that is a conflict
    grows = requested.growth is not None
    spec = get_method(requested.growth) if grows and not first else requested
    if params is None:
        params = FitParams.from_dict(store.meta["params"])
        if spec.default_bits is not None:
            params.bits = params.dense_bits = spec.default_bits
    params.validate()
    worker_device, device = device, resolve_device(device)  # workers resolve their own default
    context = {"bases": _stored_bases(store._snapshot)} if spec.joins_stored else {}
    estimator = spec.make(params, n_components=n_components, device=device, progress=progress, **context)
    if dask is not None and not getattr(estimator, "distributed", False):
        raise InvalidInputError(f"--dask runs the fit of the tvbase method; method {method!r} fits in this process only")
    check_memory(estimator, store.shapes, len(items), max_memory)
    base_checkpoint = store.open_base(base)
    sources = {}
    try:
        for name, path in items.items():
            sources[name] = open_task(path, base_checkpoint, store.meta["base"]["tensors"], f"task {name!r} ({path})")
        duplicates = _same_content(store.meta["tasks"], sources)
        # LoRA adapters are stored from their own factors; the method fits the full fine-tunes
        adapters = {name: s for name, s in sources.items() if isinstance(s, LoraAdapter)}
        full = [name for name in items if name not in adapters]
        result = _fit(estimator, sources, full, store, base_checkpoint, dask, worker_device) if full else FitResult()
        result.add(fit_lora(adapters, store.shapes, params))
        result.tasks = {name: result.tasks[name] for name in items}  # recorded in the order given
        _store_new_rows(result, sources, store.shapes)
        recorded = {name: {"path": str(absolute_path(p)), "hash": sources[name].hash} for name, p in items.items()}
    finally:
        for source in sources.values():
            source.close()
        base_checkpoint.close()
    with store._write(f"ingest {', '.join(items)}", {"op": "ingest", "tasks": list(items)}, wait) as (root, meta):
        taken = sorted(set(items) & set(meta["tasks"]))
        if taken:
            raise AlreadyExistsError(f"another writer added {', '.join(map(repr, taken))} during this ingest; nothing was written")
        gone = {str(c) for c in result.stored_clusters} - set(meta["clusters"])  # ids are never reused
        if (grows and (not _fitted_tasks(meta)) != first) or gone:  # the fit no longer applies: a lost race, re-run by --wait
            raise CommitConflictError(
                "another writer changed the store's fitted tasks or clusters during this ingest, so its fit no longer "
                "applies; nothing was written: run it again, or pass --wait SECONDS"
            )
        write_fit(root, meta, result, store.shapes, params, recorded, append=True)
        if grows and first and full:  # the first fit of the store's own method sets its defaults
            meta["params"] = params.to_dict()
    for message in duplicates:  # once committed: a refused ingest has nothing to warn of
        # names the caller of Store.ingest: above are Store.ingest, rerun_on_conflict and its lambda
        warnings.warn(message, TvbaseWarning, stacklevel=5)
    return store.version


def _fit(estimator, sources, tasks, store, base, dask, device):
    """The method's fit of the full fine-tunes ``tasks``: here, or with ``dask`` (a scheduler
    address or ``local:N``) on a Dask cluster whose workers open the inputs themselves."""
    source = TaskVectors({n: sources[n] for n in tasks})
    if dask is None:
        return estimator.fit(source, tasks, store.shapes).result_
    from .methods.work import TaskReader, connect

    reader = TaskReader(absolute_path(base.path), store.meta["base"]["tensors"],
                        {n: (str(absolute_path(sources[n].path)), sources[n].label) for n in tasks})
    work = connect(dask, reader, device)
    try:
        return estimator.fit(source, tasks, store.shapes, work=work).result_
    finally:
        work.close()


NEW_ROW_BITS = 8  # rows a fine-tune added are its values, not deltas: a scale per row, int8


def _store_new_rows(result, sources, shapes):
    """Add each source's rows after the base's (added tokens) to its task, with their energy
    and quantization error in the task's figures."""
    from .codec.quantize import dequantize, quantize

    for task, source in sources.items():
        added = {name: rows for name in shapes if (rows := source.new_rows(name)) is not None}  # (k, n) each
        if not added:
            continue
        error = result.rel_error[task] ** 2 * result.energy[task]
        for name, rows in added.items():
            q = result.tasks[task][name].new_rows = quantize(rows.T.contiguous(), NEW_ROW_BITS)  # (n, k)
            error += float((dequantize(q).T - rows).double().square().sum())
            result.energy[task] += float(rows.double().square().sum())
        result.rel_error[task] = (error / result.energy[task]) ** 0.5


def _stored_bases(snapshot):
    """{cluster id: {tensor name: SharedBasis}} of the store's Tucker bases (clusters of the
    store's own method), which new tasks may join."""
    from .methods.tucker import ClusterTucker

    bases = {}
    for c, cluster in snapshot.meta["clusters"].items():
        if cluster.get("method") != ClusterTucker.name:
            continue
        tensors = {name: b for name in snapshot.meta["tensors"] if (b := snapshot._shared(int(c), name)) is not None and b.U is not None}
        if tensors:
            bases[int(c)] = tensors
    return bases


def _fitted_tasks(meta):
    """The tasks a method fitted (LoRA adapters are stored as they are, so they do not count)."""
    return [t for t, tm in meta["tasks"].items() if tm["kind"] != LORA_KIND]


def _same_content(stored, sources):
    """Warnings for each new task whose input has the content hash of a stored task or of an
    earlier one of this ingest: usually one checkpoint given twice (it is ingested all the same)."""
    seen = {task["source"]["hash"]: f"stored task {name!r}" for name, task in sorted(stored.items()) if task["source"].get("hash")}
    messages = []
    for name, source in sources.items():
        if source.hash is None:
            continue
        if source.hash in seen:
            messages.append(
                f"task {name!r} has the same content as {seen[source.hash]} (content hash {source.hash[:12]}...); "
                f"it was ingested all the same, under its own name: `tvbase rm STORE {name}` removes it if that "
                "was a mistake"
            )
        else:
            seen[source.hash] = f"task {name!r} of this ingest"
    return messages


def rm(store, names, wait=0.0):
    """Remove tasks (one commit); see :meth:`tvbase.Store.rm`."""
    names = list(dict.fromkeys(names))
    store._refresh()
    for name in names:
        store._task_meta(name)
    with store._write(f"rm {', '.join(names)}", {"op": "rm", "tasks": names}, wait) as (root, meta):
        for name in names:  # another writer may have changed the store since we opened it
            store._task_meta(name)
        drop_tasks(root, meta, store._snapshot.index, names)
    return store.version


def compact(store, params=None, device=None, progress=True, wait=0.0, max_memory=None):
    """Refit every task with the store's own method, as one commit; see :meth:`tvbase.Store.compact`.

    The writer exclusion is held for the whole run, fit included: another writer waits for it
    (``--wait``) or is refused at once, so a finished fit is never thrown away because the store
    moved under it. (Where writers are told apart by commit conflicts, a writer that commits
    first still wins: compact is then refused whole, and run again while ``wait`` lasts.)
    """
    params = params or FitParams.from_dict(store.meta["params"])
    params.validate()
    device = resolve_device(device)
    estimator = get_method(COMPACT_METHOD).make(params, device=device, progress=progress)
    check_memory(estimator, store.shapes, len(store.tasks), max_memory)
    commit_metadata = {"op": "compact"}  # read at commit, after the tasks are known
    with store._write("compact", commit_metadata, wait) as (root, meta):
        tasks = commit_metadata["tasks"] = store.tasks  # the head's, now that no other writer can change it
        if not tasks:
            raise InvalidInputError(f"store {store.path} has no tasks to compact")
        # LoRA adapters stay as they are stored (their own factors); the rest is refitted
        refit = [t for t in tasks if store.meta["tasks"][t]["kind"] != LORA_KIND]
        base, originals = _originals(store, refit) if refit else (None, {})
        sources = {t: originals.get(t) or StoredTask(store._snapshot, t, device) for t in refit}
        try:
            with TaskVectors(sources) as task_vectors:
                result = estimator.fit(task_vectors, refit, store.shapes).result_ if refit else FitResult()
        finally:
            if base is not None:
                base.close()
        old = {t: dict(store.meta["tasks"][t]) for t in tasks}
        for t in refit:
            if t not in originals:  # a refit of a rebuild: the old error adds to the refit's
                result.rel_error[t] += old[t]["rel_error"]
        result.add(_as_stored(store._snapshot, [t for t in tasks if t not in refit]))
        result.tasks = {t: result.tasks[t] for t in tasks}
        for t in refit:  # rows a task added after the base's are not refitted: kept as stored
            for name in store._snapshot.added_rows(t):
                result.tasks[t][name].new_rows = store._snapshot._task_tensor(t, name).new_rows
        meta["tasks"], meta["clusters"] = {}, {}
        write_fit(root, meta, result, store.shapes, params, {t: old[t]["source"] for t in tasks}, append=False, previous=old)
        for t in refit:
            meta["tasks"][t]["refit_from"] = "original" if t in originals else "stored"
        meta["params"] = params.to_dict()
    return store.version


def _as_stored(snapshot, tasks):
    """A FitResult holding ``tasks`` exactly as ``snapshot`` stores them, each on its own."""
    result = FitResult()
    for t in tasks:
        tm = snapshot.meta["tasks"][t]
        result.tasks[t] = {name: snapshot._task_tensor(t, name) for name in snapshot.meta["tensors"]}
        result.labels[t], result.kind[t] = None, tm["kind"]
        result.rel_error[t], result.energy[t] = tm["rel_error"], tm["energy"]
    return result


def _originals(store, tasks):
    """(base, {task: source}) for the tasks whose original input is still where it was ingested
    from with the recorded content hash; base is None (and no task has one) when the base moved
    or changed. The caller closes the base; TaskVectors closes the sources."""
    try:
        base = store.open_base(None)
    except TvbaseError:
        return None, {}  # base moved or changed: refit every task from its rebuild
    originals = {}
    for task in tasks:
        recorded = store.meta["tasks"][task]["source"]
        try:
            source = open_task(recorded["path"], base, store.meta["base"]["tensors"], f"task {task!r} ({recorded['path']})")
        except TvbaseError:
            continue
        if source.hash == recorded["hash"]:
            originals[task] = source
        else:
            source.close()
    return base, originals
