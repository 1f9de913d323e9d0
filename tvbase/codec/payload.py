"""How the store packs factors into its payload on disk, and what that costs, in one place.

The store writes every factor into one uint8 array cut into ``PAYLOAD_CHUNK`` chunks, each
compressed with zstd and checksummed with crc32c, in the order :func:`packing_order` gives. The
fit uses :func:`compressed_nbytes` over that same order, and the bookkeeping sizes below, to
predict what a write takes on disk, so that a byte budget counts what the store really grows by.
"""

import math

from numcodecs import Zstd
from zarr.codecs import Crc32cCodec, ZstdCodec

PAYLOAD_CHUNK = 2 * 1024 * 1024  # bytes: chunks of 1-8 MiB keep object-store reads efficient and few
PAYLOAD_ZSTD_LEVEL = 3

# What the store spends on disk besides the payload, measured on the test and benchmark zoos
# and rounded up (the fit subtracts them from a byte budget; `tvbase info` shows the real size):
INDEX_ROW_DISK_BYTES = 8  # one offset-table row (9 int64) after zstd: 6-8
TASK_METADATA_DISK_BYTES = 300  # one task's entry (name, source path, hashes, errors): 100-350


def commit_disk_bytes(n_tensors):
    """Bytes of one commit besides its payload and task entries: the snapshot repeats the base's
    fingerprint and the parameters; plus the transaction log and manifests."""
    return 1024 + 16 * n_tensors


def store_disk_bytes(n_tensors):
    """Bytes of an empty store: configuration, refs and the first snapshot with the base's
    fingerprint (1.6 KB for 5 tensors, 1.7 KB for 14, 1.9 KB for 41)."""
    return 1536 + 16 * n_tensors


def raw_bytes(shapes):
    """Bytes of one task vector in fp32, for ``shapes`` a dict tensor name -> shape."""
    return 4 * sum(math.prod(int(s) for s in shape) for shape in shapes.values())


def packing_order(clusters, tasks):
    """Every factor of a fit in the order the store packs them into its payload.

    Parameters
    ----------
    clusters : dict cluster key -> {tensor name: SharedBasis}
    tasks : dict task -> {tensor name: TaskTensor}

    Yields
    ------
    (owner, key, tensor name, role, QuantizedMatrix), ``owner`` being ``"cluster"`` or ``"task"``.
    Clusters in sorted key order, then every task's factors, then every task's dense tensors:
    interleaved with the factors in zstd blocks, dense tensors compressed worse (1.2% of the
    payload of the 3% ViT store, with int8 dense tensors).
    """
    for c in sorted(clusters):
        for name, basis in clusters[c].items():
            for role, q in basis.parts():
                yield "cluster", c, name, role, q
    for task, tensors in tasks.items():
        for name, tt in tensors.items():
            for role, q in tt.parts():
                if role != "dense":
                    yield "task", task, name, role, q
    for task, tensors in tasks.items():
        for name, tt in tensors.items():
            if tt.dense is not None:
                yield "task", task, name, "dense", tt.dense


def zarr_compressors():
    """The zarr v3 compressor chain of the store's arrays."""
    return [ZstdCodec(level=PAYLOAD_ZSTD_LEVEL), Crc32cCodec()]


def compressed_nbytes(payloads):
    """Bytes that ``payloads`` (an iterable of bytes) take written back to back and compressed
    chunk by chunk, as the store's payload array compresses them (checksums aside)."""
    codec = Zstd(level=PAYLOAD_ZSTD_LEVEL)
    total, pending = 0, bytearray()
    for data in payloads:
        pending += data
        while len(pending) >= PAYLOAD_CHUNK:
            total += len(codec.encode(bytes(pending[:PAYLOAD_CHUNK])))
            del pending[:PAYLOAD_CHUNK]
    if pending:
        total += len(codec.encode(bytes(pending)))
    return total
