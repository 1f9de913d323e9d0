"""What ``ls``, ``info`` and ``verify`` report about one version of a store."""

from .codec.payload import PAYLOAD_CHUNK
from .errors import IntegrityError
from .format import ROLES, OWNER_SHARED, OWNER_TASK, index_row_problems, read_array, sparse_mask_problems, task_record_problems


def ls(snapshot):
    """One dict per task: name, cluster, kind, stored bytes, raw bytes, relative error, whether
    it keeps sparse residuals."""
    meta = snapshot.meta
    shared_bytes = {int(c): snapshot.owned_bytes(OWNER_SHARED, int(c)) for c in meta["clusters"]}
    members = {}
    for task, tm in meta["tasks"].items():
        members.setdefault(tm["cluster"], []).append(task)
    out = []
    for task in sorted(meta["tasks"]):
        tm = meta["tasks"][task]
        own = snapshot.owned_bytes(OWNER_TASK, tm["id"])
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
                "sparse": "sparse" in tm,  # its error counts a sparse residual's noise
                "added": tm["added"],
            }
        )
    return out


def info(snapshot, path, disk_bytes):
    """Store summary: tasks, clusters, bytes on disk (``disk_bytes``, all versions) and in
    factors, against raw fp32.

    ``version_disk_bytes`` is what this version's arrays take on disk; ``history_bytes`` the rest
    of ``disk_bytes``: older versions, kept until ``gc`` expires them, and the repository's own
    files (snapshots, manifests, configuration).
    """
    meta, index = snapshot.meta, snapshot.index
    raw = sum(tm["raw_bytes"] for tm in meta["tasks"].values())
    live = int(index[:, 8].sum()) if len(index) else 0
    version_disk = min(snapshot.stored_bytes(), disk_bytes)
    return {
        "path": str(path),
        "version": snapshot.version,
        "format_version": meta["format_version"],
        "base": {"path": meta["base"]["path"], "hash": meta["base"]["hash"], "tensors": len(meta["tensors"])},
        "tasks": len(meta["tasks"]),
        "clusters": len(meta["clusters"]),
        "raw_fp32_bytes": raw,
        "factor_bytes": live,
        "payload_bytes": snapshot.payload_length,
        "reclaimable_bytes": snapshot.payload_length - live,
        "disk_bytes": disk_bytes,
        "version_disk_bytes": version_disk,
        "history_bytes": disk_bytes - version_disk,
        "factor_storage": live / raw if raw else 0.0,
        "disk_storage": disk_bytes / raw if raw else 0.0,
        "version_disk_storage": version_disk / raw if raw else 0.0,
        "params": meta["params"],
    }


def verify(snapshot):
    """Check every chunk's checksum, every offset-table row and every task's metadata.

    Returns
    -------
    dict with ``ok`` (bool), ``problems`` (list of str naming the damaged task or array) and
    ``checked`` (counts of what was read).
    """
    meta, index = snapshot.meta, snapshot.index
    names, shapes, length = meta["tensors"], snapshot.shapes, snapshot.payload_length
    owners = {(OWNER_TASK, tm["id"]): f"task {t!r}" for t, tm in meta["tasks"].items()}
    records = {(OWNER_TASK, tm["id"]): tm for tm in meta["tasks"].values()}
    owners.update({(OWNER_SHARED, int(c)): f"cluster {c} (tasks {', '.join(m['tasks'])})" for c, m in meta["clusters"].items()})

    def owner_of(row):
        return owners.get((int(row[0]), int(row[1])), f"unknown owner {int(row[0])}/{int(row[1])}")

    problems = []
    for row in index:
        tensor = int(row[2])
        where = f"{owner_of(row)}, tensor {names[tensor] if 0 <= tensor < len(names) else tensor}"
        if (int(row[0]), int(row[1])) not in owners:
            problems.append(f"index row for {where} belongs to no task or cluster in the metadata")
        row_problems = index_row_problems(row, where, names, shapes, length)
        problems += row_problems
        record = records.get((int(row[0]), int(row[1])))
        if not row_problems and record is not None and ROLES[int(row[3])] == "sparse":
            problems += [f"{where}: {p}" for p in sparse_mask_problems(record, names[tensor], shapes[names[tensor]], int(row[4]))]
    problems += task_record_problems(meta)
    # every payload chunk: zarr checks the crc32c when it decodes a chunk
    chunks = (length + PAYLOAD_CHUNK - 1) // PAYLOAD_CHUNK
    for i in range(chunks):
        lo, hi = i * PAYLOAD_CHUNK, min(length, (i + 1) * PAYLOAD_CHUNK)
        try:
            read_array(snapshot.payload, "payload", slice(lo, hi))
        except IntegrityError:
            hit = index[(index[:, 7] < hi) & (index[:, 7] + index[:, 8] > lo)]
            affected = sorted({owner_of(row) for row in hit}) or ["no live data (reclaimable bytes)"]
            problems.append(f"payload chunk {i} (bytes {lo}-{hi}) fails its checksum; affected: {'; '.join(affected)}")
    return {"ok": not problems, "problems": problems, "checked": {"index_rows": len(index), "payload_chunks": chunks, "tasks": len(meta["tasks"])}}
