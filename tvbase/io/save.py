"""Write tensors out as (sharded) safetensors checkpoints, each file atomically.

The only way model weights leave tvbase: :func:`save_checkpoint` streams tensors to one
``.safetensors`` file or to Hugging Face style shards plus ``model.safetensors.index.json``.
Given a plan (every tensor's name, shape and dtype, in order), it writes each file's header
first and then each tensor's bytes as it comes, on a writer thread, so that one tensor is
written while the next is computed and no file is ever held whole in memory; safetensors
itself only writes a whole dict (it needs every shape for the header, which a plan gives).
:func:`write_atomic` is the one atomic-replace helper every writer of a file uses, and
:func:`write_directory_atomic` its counterpart for a whole new directory (a model folder).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from tvbase.errors import InvalidInputError

from .checkpoint import INDEX_NAME, PICKLE_SUFFIXES

__all__ = ["check_new_directory", "save_checkpoint", "torch_dtype", "write_atomic", "write_directory_atomic"]

_SINGLE_NAME = "model.safetensors"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# torch dtypes save_checkpoint accepts, with their safetensors names.
_TORCH_TO_SAFETENSORS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
}  # fmt: skip
_SAFETENSORS_TO_TORCH = {name: dtype for dtype, name in _TORCH_TO_SAFETENSORS.items()}


def torch_dtype(safetensors_dtype: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (``"F32"``, ``"BF16"``, ...), or None for one
    that :func:`save_checkpoint` cannot write."""
    return _SAFETENSORS_TO_TORCH.get(safetensors_dtype)


def save_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    path: str | os.PathLike,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: dict[str, str] | None = None,
    durable: bool = False,
    plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]] | None = None,
) -> list[Path]:
    """Write tensors as safetensors, streaming, each file atomically.

    Parameters
    ----------
    tensors : iterable of (str, Tensor)
        Names and tensors, any device and layout; may be a generator. At most one shard's worth
        of tensors is held at a time.
    path : str or os.PathLike
        A path ending in ``.safetensors`` gets one file whatever its size. Any other path is a
        directory (created if needed): one ``model.safetensors`` if everything fits in one shard,
        else ``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``.
        Files of an earlier checkpoint written there under these names are replaced or removed;
        other files are left alone.
    max_shard_bytes : int, default 2 GiB
        Most tensor bytes per shard; a single larger tensor gets a shard of its own.
    metadata : dict of str to str, optional
        Stored in every file's header (``"format": "pt"`` is added unless given) and in the index.
    durable : bool, default False
        Flush each file to disk before it takes its final name. Off by default: what tvbase
        writes here is rebuilt from the store at will, readers see the old or the whole new
        file either way, and the flush of a 440 MB task vector took 0.8 s, as long as its rebuild
        (a crash right after a write may then leave an empty file, which fails to open loudly).
    plan : sequence of (str, tuple of int, torch.dtype), optional
        The name, shape and dtype of every tensor ``tensors`` will yield, in that order. With
        it, files are written as the tensors come, each one's bytes on a writer thread while the
        next is made, holding at most three tensors; shards are cut where they would be without
        it. Without it, a whole file's tensors are held until that file is written.

    Returns
    -------
    list of Path
        The files written: the shards in order, then the index if there is one.

    Raises
    ------
    InvalidInputError
        On a bad name, duplicate name, unsupported dtype, bad ``max_shard_bytes``, ``metadata``
        or ``plan``, a tensor other than the plan's next one, or no tensors at all.
    """
    path = Path(path)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise InvalidInputError(
            f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}; pass e.g. 2 * 1024**3."
        )
    header_metadata = {"format": "pt", **_check_metadata(metadata)}
    plan = _check_plan(plan)
    if path.suffix in PICKLE_SUFFIXES:
        raise InvalidInputError(
            f"cannot save to {str(path)!r}: tvbase writes safetensors only, never pickle; "
            "use a path ending in .safetensors, or a directory."
        )
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        shard = next(_shards(tensors, None, header_metadata, plan), None)  # one file whatever its size
        if shard is None:
            raise _no_tensors(path)
        write_atomic(path, shard.write, durable)
        return [path]
    if path.exists() and not path.is_dir():
        raise InvalidInputError(
            f"cannot save to {str(path)!r}: it is an existing file and not a .safetensors path; "
            "give a directory, or a path ending in .safetensors."
        )
    path.mkdir(parents=True, exist_ok=True)
    return _save_sharded(_shards(tensors, max_shard_bytes, header_metadata, plan), path, metadata or {}, durable)


# --- saving --------------------------------------------------------------------------------------------


def _check_metadata(metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise InvalidInputError(
            f"metadata must be a dict of str to str (safetensors stores text only), got {metadata!r}; "
            "convert values with str() or json.dumps()."
        )
    return dict(metadata)


def _saveable(tensors: Iterable[tuple[str, torch.Tensor]], own_storage: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Validate names and yield each tensor as a dense, contiguous CPU tensor, owning its storage
    if ``own_storage`` (what ``save_file`` needs; a streamed file takes any tensor's bytes)."""
    seen, storages = set(), set()
    for item in tensors:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise InvalidInputError(
                f"save_checkpoint expects (name, tensor) pairs, got {type(item).__name__}; "
                "pass e.g. state_dict.items()."
            )
        name, tensor = item
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise InvalidInputError(
                f"tensor name {name!r} is not allowed: expected a non-empty string other than "
                "'__metadata__'; rename the tensor."
            )
        if name in seen:
            raise InvalidInputError(f"tensor name {name!r} appears twice: names must be unique; rename one.")
        seen.add(name)
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta:
            raise InvalidInputError(
                f"tensor {name!r} is {_describe(tensor)}: expected a dense torch.Tensor with data; "
                "convert it with .to_dense() or materialize it first."
            )
        if tensor.dtype not in _TORCH_TO_SAFETENSORS:
            raise InvalidInputError(
                f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store here: expected "
                f"one of {', '.join(sorted(str(d) for d in _TORCH_TO_SAFETENSORS))}; convert it first."
            )
        tensor = tensor.detach().to("cpu").contiguous()
        if not own_storage:
            yield name, tensor
            continue
        # safetensors refuses tensors sharing storage (tied weights) and a view would drag its
        # whole storage along, so give such tensors storage of their own.
        storage = tensor.untyped_storage()
        if storage.nbytes() != tensor.nbytes or tensor.storage_offset() or storage.data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        yield name, tensor


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "a meta tensor" if value.is_meta else f"a tensor of layout {value.layout}"
    return f"a {type(value).__name__}"


class _Shard:
    """One file to write: its tensor names and bytes, and ``write(path)``, which writes it."""

    def __init__(self, names: list[str], nbytes: int, write):
        self.names, self.nbytes, self.write = names, nbytes, write


def _shards(tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int | None,
            header_metadata: dict[str, str], plan: list[tuple[str, tuple[int, ...], torch.dtype]] | None) -> Iterator[_Shard]:
    """The files of a checkpoint, in order; each must be written before the next is asked for.

    A new file starts where adding a tensor would pass ``max_shard_bytes`` (None: one file), so a
    single larger tensor gets a file of its own.
    """
    items = _saveable(tensors, own_storage=plan is None)
    if plan is None:  # the tensors of a file are held until it is written
        shard, nbytes = {}, 0
        for name, tensor in items:
            if shard and max_shard_bytes is not None and nbytes + tensor.nbytes > max_shard_bytes:
                yield _Shard(list(shard), nbytes, partial(save_file, shard, metadata=header_metadata))
                shard, nbytes = {}, 0
            shard[name] = tensor
            nbytes += tensor.nbytes
        if shard:
            yield _Shard(list(shard), nbytes, partial(save_file, shard, metadata=header_metadata))
        return
    groups, nbytes = [], 0
    for spec in plan:
        size = _nbytes(spec)
        if not groups or (max_shard_bytes is not None and nbytes + size > max_shard_bytes):
            groups.append([])
            nbytes = 0
        groups[-1].append(spec)
        nbytes += size
    for i, group in enumerate(groups):
        last = i == len(groups) - 1
        write = partial(_stream_file, group=group, items=items, header_metadata=header_metadata, last=last)
        yield _Shard([name for name, _, _ in group], sum(map(_nbytes, group)), write)


def _stream_file(path, group, items, header_metadata, last):
    """Write the tensors of ``group`` (a plan's part) to ``path`` as ``items`` yields them: the
    header first, then each tensor's bytes on a writer thread while the next one is made."""
    header, offset = {"__metadata__": header_metadata}, 0
    for spec in group:
        name, shape, dtype = spec
        end = offset + _nbytes(spec)
        header[name] = {"dtype": _TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as file, ThreadPoolExecutor(1, thread_name_prefix="tvbase-save") as writer:
        file.write(struct.pack("<Q", len(text)) + text)
        pending = deque()  # writes in flight, in order: at most two tensors wait for the disk
        for spec in group:
            item = next(items, None)
            if item is None:
                raise InvalidInputError(f"the tensors ended before {spec[0]!r}, which the plan of the checkpoint lists")
            name, tensor = item
            if (name, tuple(tensor.shape), tensor.dtype) != spec:
                raise InvalidInputError(
                    f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} is not the plan's next one, "
                    f"{spec[0]!r} {spec[1]} {spec[2]}: the plan must list every tensor, in order"
                )
            pending.append(writer.submit(file.write, tensor.reshape(-1).view(torch.uint8).numpy()))
            if len(pending) > 2:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    if last and next(items, None) is not None:
        raise InvalidInputError("more tensors came than the plan of the checkpoint lists")


def _nbytes(spec) -> int:
    _, shape, dtype = spec
    return math.prod(shape) * dtype.itemsize


def _check_plan(plan) -> list[tuple[str, tuple[int, ...], torch.dtype]] | None:
    """The plan as a list of (name, shape, dtype), or None where files cannot be streamed (no
    plan, or a big-endian machine: safetensors files are little-endian)."""
    if plan is None or sys.byteorder != "little":
        return None
    checked, seen = [], set()
    for spec in plan:
        ok = isinstance(spec, (tuple, list)) and len(spec) == 3
        name, shape, dtype = spec if ok else (None, None, None)
        ok = ok and isinstance(name, str) and name and name != "__metadata__" and name not in seen
        ok = ok and isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(d, int) and d >= 0 for d in shape)
        if not (ok and dtype in _TORCH_TO_SAFETENSORS):
            raise InvalidInputError(
                f"bad plan entry {spec!r}: expected (unique tensor name, shape as a tuple of int, torch dtype "
                "safetensors stores)"
            )
        seen.add(name)
        checked.append((name, tuple(shape), dtype))
    return checked


def _save_sharded(shards: Iterator[_Shard], directory: Path, index_metadata: dict[str, str], durable: bool) -> list[Path]:
    # The shard count is unknown until the stream ends, so shards get temporary names first.
    token = uuid.uuid4().hex
    temps, weight_maps, total_bytes = [], [], 0
    try:
        for shard in shards:
            temp = directory / f".tvbase-{token}-{len(temps):05d}.safetensors.tmp"
            temps.append(temp)
            shard.write(temp)
            if durable:
                _fsync(temp)
            weight_maps.append(shard.names)
            total_bytes += shard.nbytes
        shard = None  # release the last file's tensors (unplanned, it holds them) before renaming
        if not temps:
            raise _no_tensors(directory)
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise

    count = len(temps)
    names = [_SINGLE_NAME] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    finals = [directory / name for name in names]
    # Drop any old index first: a crash midway then leaves a checkpoint that fails to open loudly
    # (several shards, no index) rather than an old index silently mixing old and new shards.
    (directory / INDEX_NAME).unlink(missing_ok=True)
    for temp, final in zip(temps, finals):
        os.replace(temp, final)
    written = list(finals)
    if count > 1:
        # the layout transformers' from_pretrained reads: total_size is the tensor bytes
        index = {
            "metadata": {**index_metadata, "total_size": total_bytes},
            "weight_map": {name: final.name for final, shard_names in zip(finals, weight_maps) for name in shard_names},
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        write_atomic(directory / INDEX_NAME, lambda temp: Path(temp).write_text(text, encoding="utf-8"), durable)
        written.append(directory / INDEX_NAME)
    for stale in directory.iterdir():
        if stale not in finals and (stale.name == _SINGLE_NAME or _SHARD_NAME.fullmatch(stale.name)):
            stale.unlink()
    return written


def write_atomic(path: str | os.PathLike, write, durable: bool = True) -> None:
    """Call ``write(temp_path)``, then move the result to ``path`` in one step: readers see the
    old file or the whole new one; ``durable`` flushes it to disk first, so that a crash leaves
    no half-written file under ``path`` either."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temp)
        if durable:
            _fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def check_new_directory(path: str | os.PathLike) -> None:
    """Refuse ``path`` as the target of :func:`write_directory_atomic` unless it does not exist or
    is an empty directory; called first by writers that have slow work to do before writing.

    Raises
    ------
    InvalidInputError
        If ``path`` is an existing file, or a directory that holds anything.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(
            f"cannot write a directory to {str(path)!r}: it is an existing file; "
            "give a new directory, or a path ending in .safetensors for one weights file."
        )
    if path.is_dir() and any(path.iterdir()):
        raise InvalidInputError(
            f"output directory {str(path)!r} is not empty: the new files would mix with the ones there; "
            "give a new or empty directory, or remove this one first."
        )


def write_directory_atomic(path: str | os.PathLike, write) -> None:
    """Call ``write(temp_directory)`` on a new directory beside ``path``, then move it to ``path`` in
    one step: ``path`` then holds all the new files or, after a failure or crash, is as it was.

    Parameters
    ----------
    path : str or os.PathLike
        A directory that does not exist yet, or an empty one (see :func:`check_new_directory`).
        Missing parent directories are made, and removed again if the write fails.
    write : callable
        ``write(temp_directory: Path)`` writes every file; each is fsynced before the move.
    """
    check_new_directory(path)
    target = Path(path).resolve()  # through a symlink to an empty directory, fill that directory
    made = [parent for parent in target.parents if not parent.exists()]  # innermost first
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        temp.mkdir()
        write(temp)
        for file in temp.rglob("*"):
            if file.is_file():
                _fsync(file)
        try:
            os.replace(temp, target)  # also replaces an empty directory
        except OSError as error:  # something appeared there while we wrote
            raise InvalidInputError(f"cannot move the new files into {str(path)!r}: {error}; "
                                    "give a new or empty directory.") from error
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        for parent in made:
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _fsync(path: Path) -> None:
    # Without it a crash soon after os.replace could leave an empty file under the final name.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_tensors(path: Path) -> InvalidInputError:
    return InvalidInputError(f"no tensors to save to {str(path)!r}: expected at least one (name, tensor) pair.")
