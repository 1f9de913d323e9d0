"""The store's on-disk format (version in FORMAT_VERSION): everything about how a store's bytes are laid out.

Inside the Icechunk repository the root zarr v3 group holds:

- attribute ``tvbase``: format version, the base model's fingerprint, fit parameters, tasks and
  clusters (everything needed to rebuild, so reads never depend on CLI flags), and a ``digest``;
- ``payload``: uint8 (nbytes,), every stored factor packed back to back (see
  :mod:`tvbase.codec.quantize` for one factor's bytes, :func:`tvbase.codec.packing_order` for
  their order), chunks of 2 MiB, zstd + crc32c;
- ``index``: int64 (n_entries, 9), the offset table: one row per stored factor with the
  columns in ``INDEX_COLUMNS``.

Writes append to ``payload`` and rewrite the (small) index; ``rm`` drops index rows, leaving
unreferenced payload bytes that ``compact`` reclaims. This module knows the layout and nothing
of where the repository lives (:mod:`tvbase.repository`) or how a fit is computed.
"""

import datetime as _dt
import hashlib
import json
import math

import numpy as np

from ._version import __version__
from .codec.bits import payload_nbytes
from .codec.factors import matrix_shape
from .codec.payload import PAYLOAD_CHUNK, packing_order, raw_bytes, zarr_compressors
from .codec.sparse import checked_positions, record_problem, tensor_seed
from .errors import FormatVersionError, IntegrityError, TvbaseError
from .s3 import storage_error

# 2: tasks may keep rows of a matrix whole (roles "rows", "row_ids"); version 1 stores read as before
# 3: tasks may add rows after the base's (role "new_rows": fine-tunes that added tokens)
# 4: tasks may keep a sparse residual of a matrix (role "sparse", task metadata "sparse")
FORMAT_VERSION = 4
INDEX_COLUMNS = ("owner_kind", "owner_id", "tensor", "role", "rows", "cols", "bits", "offset", "nbytes")
OWNER_SHARED, OWNER_TASK = 0, 1
# role column value = position in this tuple; append only, never reorder (on-disk format)
ROLES = ("U", "V", "core", "A", "B", "dense", "S", "mu", "rows", "row_ids", "new_rows", "sparse")
INDEX_CHUNK = 16384  # rows
VALID_BITS = (32, 16, 8, 4, 2)
# what verify requires of every task record
TASK_FIELDS = frozenset({"id", "cluster", "kind", "raw_bytes", "rel_error", "source"})


def utc_now():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_metadata(base_path, fingerprint, params):
    """The metadata of an empty store for a base with ``fingerprint``; ``params`` a dict."""
    return {
        "format_version": FORMAT_VERSION,
        "tvbase_version": __version__,
        "created": utc_now(),
        "base": {"path": str(base_path), "hash": fingerprint["hash"], "tensors": fingerprint["tensors"]},
        "tensors": list(fingerprint["tensors"]),  # tensor id -> name, the base's order
        "params": params,
        "tasks": {},
        "clusters": {},
        "next_task_id": 0,
        "next_cluster_id": 0,
    }


def create_arrays(root):
    """The empty ``payload`` and ``index`` arrays of a new store."""
    codecs = {"compressors": zarr_compressors()}
    root.create_array("payload", shape=(0,), chunks=(PAYLOAD_CHUNK,), dtype="uint8", fill_value=0, **codecs)
    root.create_array("index", shape=(0, len(INDEX_COLUMNS)), chunks=(INDEX_CHUNK, len(INDEX_COLUMNS)), dtype="int64", fill_value=0, **codecs)


def read_array(array, label, selection=slice(None)):
    """``array[selection]``; a failed checksum or unreadable chunk is an IntegrityError naming ``label``."""
    try:
        return array[selection]
    except ValueError as e:
        if "checksum" in str(e):
            raise IntegrityError(f"checksum mismatch in array {label!r}: the store is damaged; run `tvbase verify`") from None
        raise IntegrityError(f"array {label!r} cannot be read ({e}): the store is damaged; run `tvbase verify`") from None
    except Exception as e:  # a missing or truncated chunk file surfaces as an Icechunk/IO error
        if (unreachable := storage_error(e, label)) is not None:  # object storage down or refusing: no damage
            raise unreachable from None
        raise IntegrityError(f"array {label!r} cannot be read ({type(e).__name__}: {e}): the store is damaged") from None


def digest(meta, index, payload_bytes):
    """sha256 of the metadata (without its digest), the offset table and the payload length.

    Icechunk checksums no snapshot, and zarr's crc32c covers chunks only: without this a flipped
    bit in a task's id would rebuild another task's factors and exit 0.
    """
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(index, dtype="<i8").tobytes())
    h.update(str(int(payload_bytes)).encode())
    return h.hexdigest()


def load(root, where, version):
    """Read and check one version's metadata, offset table and payload array.

    Parameters
    ----------
    root : zarr.Group, read-only, of one snapshot.
    where, version : how messages name the store and the version.

    Returns
    -------
    (meta dict, index ndarray of shape (n_entries, 9) int64, payload zarr.Array)

    Raises
    ------
    IntegrityError for a damaged snapshot or metadata that fails its digest;
    FormatVersionError for a store written by a newer format.
    """
    try:
        meta = root.attrs.get("tvbase")
        if not isinstance(meta, dict) or "format_version" not in meta:
            raise IntegrityError(f"{where} is an Icechunk repository without tvbase metadata")
        if meta["format_version"] > FORMAT_VERSION:
            raise FormatVersionError(
                f"store {where} has format version {meta['format_version']}, newer than this tvbase "
                f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade tvbase"
            )
        payload = root["payload"]
        index = read_array(root["index"], "index")
    except TvbaseError:
        raise
    except Exception as e:  # damaged snapshot, manifest or chunk: never a traceback, never a guess
        raise IntegrityError(f"store {where} is damaged at version {version}: {type(e).__name__}: {e}") from None
    if meta.get("digest") != digest(meta, index, int(payload.shape[0])):
        raise IntegrityError(
            f"store {where}: the metadata of version {version} does not match its checksum; "
            "the store is damaged (open an earlier version with --at, see `tvbase log`)"
        )
    return meta, index, payload


def seal(root, meta):
    """Record ``meta`` in ``root`` with the digest of what the write left in the arrays."""
    meta["digest"] = digest(meta, read_array(root["index"], "index"), int(root["payload"].shape[0]))
    root.attrs["tvbase"] = meta


def write_index(array, rows):
    array.resize(rows.shape)
    if len(rows):
        array[:] = rows


def write_fit(root, meta, result, shapes, params, sources, append, previous=None):
    """Append (or, for compact, replace) the factors of a FitResult and record its metadata.

    Parameters
    ----------
    root : zarr.Group, writable.
    meta : dict, the new version's metadata, updated in place.
    result : FitResult
    shapes : dict tensor name -> shape
    params : FitParams the fit ran with (recorded per task).
    sources : dict task -> {"path": str, "hash": str}, where each task came from.
    append : bool, False to rewrite the payload from scratch (compact).
    previous : dict task -> old task record, whose ``added`` time is kept.
    """
    meta["format_version"] = FORMAT_VERSION  # a write may add parts only this version reads
    tensor_id = {name: i for i, name in enumerate(meta["tensors"])}
    payload, index_array = root["payload"], root["index"]
    offset = int(payload.shape[0]) if append else 0
    index = read_array(index_array, "index") if append else np.zeros((0, len(INDEX_COLUMNS)), dtype=np.int64)

    if result.clusters and result.stored_clusters:  # a label would name two clusters
        raise ValueError("a fit either makes new clusters or joins stored ones, not both")
    cluster_ids = {}
    for c in sorted(result.clusters):
        cid = cluster_ids[c] = meta["next_cluster_id"]
        meta["next_cluster_id"] += 1
        meta["clusters"][str(cid)] = {"tasks": [t for t, lab in result.labels.items() if lab == c], "method": result.method, **result.info}
    task_ids = {}
    for task, tensors in result.tasks.items():
        tid = task_ids[task] = meta["next_task_id"]
        meta["next_task_id"] += 1
        coefficients = next((tt.coef for tt in reversed(tensors.values()) if tt.coef is not None), None)
        label = result.labels[task]
        if label in result.stored_clusters:  # joins a cluster already written
            cluster = label
            meta["clusters"][str(cluster)]["tasks"].append(task)
        else:
            cluster = cluster_ids.get(label) if label is not None else None
        meta["tasks"][task] = {
            "id": tid,
            "cluster": cluster,
            "kind": result.kind[task],
            "source": sources[task],
            "raw_bytes": raw_bytes(shapes),
            "rel_error": result.rel_error[task],
            "energy": result.energy[task],
            "added": (previous or {}).get(task, {}).get("added", utc_now()),
            "params": params.to_dict(),
            **({"coefficients": list(coefficients)} if coefficients is not None else {}),
            # the seed and threshold of the task's sparse residuals' positions (tvbase.codec.sparse)
            **({"sparse": dict(result.sparse[task])} if task in result.sparse else {}),
        }

    rows, start = [], offset
    for owner, key, name, role, q in packing_order(result.clusters, result.tasks):
        kind, owner_id = (OWNER_SHARED, cluster_ids[key]) if owner == "cluster" else (OWNER_TASK, task_ids[key])
        rows.append([kind, owner_id, tensor_id[name], ROLES.index(role), q.shape[0], q.shape[1], q.bits, offset, q.nbytes])
        offset += q.nbytes
    payload.resize((offset,))
    _write_payload(payload, (q for *_, q in packing_order(result.clusters, result.tasks)), start)
    new_rows = np.asarray(rows, dtype=np.int64).reshape(-1, len(INDEX_COLUMNS))
    write_index(index_array, np.concatenate([index, new_rows]))


def _write_payload(payload, factors, start, block=32 * PAYLOAD_CHUNK):
    """Write the factors' bytes back to back from ``start``, a block of whole chunks at a time:
    a copy of the whole new payload would be as large as every fitted factor together."""
    pending, at = bytearray(), start
    for q in factors:
        pending += q.to_bytes()
        if len(pending) >= block:
            n = len(pending) - (at + len(pending)) % PAYLOAD_CHUNK  # end the block on a chunk boundary
            payload[at : at + n] = np.frombuffer(bytes(pending[:n]), dtype=np.uint8)
            del pending[:n]
            at += n
    if pending:
        payload[at : at + len(pending)] = np.frombuffer(bytes(pending), dtype=np.uint8)


def drop_tasks(root, meta, index, names):
    """Remove tasks ``names`` from ``meta`` (in place) and their index rows from ``root``, with
    the clusters left without a task."""
    ids = {meta["tasks"][n]["id"] for n in names}
    for n in names:
        del meta["tasks"][n]
    live_clusters = {tm["cluster"] for tm in meta["tasks"].values()}
    dead = {int(c) for c in meta["clusters"] if int(c) not in live_clusters}
    for c in dead:
        del meta["clusters"][str(c)]
    owned_by_dead = ((index[:, 0] == OWNER_TASK) & np.isin(index[:, 1], list(ids))) | (
        (index[:, 0] == OWNER_SHARED) & np.isin(index[:, 1], list(dead))
    )
    write_index(root["index"], index[~owned_by_dead])
    for c in meta["clusters"].values():
        c["tasks"] = [t for t in c["tasks"] if t in meta["tasks"]]


def index_row_problems(row, where, tensors, shapes, payload_length):
    """What is wrong with one offset-table row (its owner aside).

    Parameters
    ----------
    row : sequence of 9 ints, the columns of ``INDEX_COLUMNS``.
    where : str, how messages name the row's owner and tensor.
    tensors : list of tensor names (tensor id -> name).
    shapes : dict tensor name -> shape.
    payload_length : int, bytes in the payload.
    """
    _, _, tensor, role, rows, cols, bits, offset, nbytes = (int(v) for v in row)
    if not 0 <= tensor < len(tensors) or not 0 <= role < len(ROLES) or bits not in VALID_BITS:
        return [f"index row for {where} has an invalid tensor, role or bit width"]
    role = ROLES[role]
    if offset < 0 or offset + nbytes > payload_length:
        return [f"{where}: factor {role} lies outside the payload ({offset}+{nbytes} > {payload_length})"]
    if nbytes != payload_nbytes(rows, cols, bits):
        return [f"{where}: factor {role} has {nbytes} bytes, its shape and bits need {payload_nbytes(rows, cols, bits)}"]
    return [f"{where}: {p}" for p in factor_shape_problems(shapes[tensors[tensor]], role, rows, cols)]


def factor_shape_problems(shape, role, rows, cols):
    """The shape rules of a stored factor of ``role`` for a tensor of ``shape``."""
    mshape = matrix_shape(shape)
    numel = math.prod(int(s) for s in shape)
    if role in ("dense", "mu"):
        return [] if (rows, cols) == (numel, 1) else [f"{role} factor has shape {(rows, cols)}, expected {(numel, 1)}"]
    if role == "new_rows":  # one column per added row, as long as a row
        row = numel // int(shape[0]) if shape else 1
        return [] if rows == row else [f"new_rows has {rows} rows, expected {row} (the size of one row)"]
    if role == "S":
        return [] if rows == numel else [f"seed basis S has {rows} rows, expected {numel}"]
    if mshape is None:
        return [f"factor {role} stored for a tensor that is stored densely"]
    if role == "sparse" and (cols != 1 or rows > mshape[0] * mshape[1]):
        return [f"sparse residual has shape {(rows, cols)}, expected (k, 1) with k at most {mshape[0] * mshape[1]}"]
    if role == "row_ids" and rows != 1:
        return [f"row_ids has shape {(rows, cols)}, expected (1, s)"]
    expected_rows = {"U": mshape[0], "A": mshape[0], "V": mshape[1], "B": mshape[1], "rows": mshape[1]}.get(role)
    if expected_rows is not None and rows != expected_rows:
        return [f"factor {role} has {rows} rows, expected {expected_rows}"]
    return []


def sparse_mask_problems(record, name, shape, count):
    """What is wrong with a task's sparse residual of ``count`` values for tensor ``name``: its
    record must hold the seed and threshold of the positions, and they must pick ``count``."""
    sparse = record.get("sparse")
    problem = record_problem(sparse)
    if problem:
        return [problem]
    m, n = matrix_shape(shape)
    _, problem = checked_positions(m * n, tensor_seed(sparse["seed"], name), sparse["threshold"], count)
    return [problem] if problem else []


def task_record_problems(meta):
    """What is wrong with the task records of ``meta``."""
    problems = []
    for task, tm in meta["tasks"].items():
        missing = TASK_FIELDS - set(tm)
        if missing:
            problems.append(f"task {task!r}: metadata lacks {', '.join(sorted(missing))}")
        elif tm["cluster"] is not None and str(tm["cluster"]) not in meta["clusters"]:
            problems.append(f"task {task!r}: its cluster {tm['cluster']} is not in the metadata")
    return problems
