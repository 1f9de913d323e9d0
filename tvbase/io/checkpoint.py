"""Read safetensors checkpoints: the only way model weights enter tvbase.

A :class:`Checkpoint` is a read-only, lazy view of one checkpoint, either a single ``.safetensors`` file
or a directory of shards with a Hugging Face ``model.safetensors.index.json``, on a local disk or
in object storage (``s3://BUCKET/KEY``, read through s3fs: see :func:`_open_s3`). Everything that can be
checked without reading tensor data is checked in :meth:`Checkpoint.open`, so later code trusts it:
the safetensors headers are parsed and validated by our own code before the file reaches the
safetensors library, shard paths may not escape the directory (a snapshot folder of the Hugging
Face cache may link into its own cache entry's ``blobs/``, see :mod:`tvbase.io.hub`), and pickle
checkpoints are refused.

:func:`check_compatible` compares a checkpoint with the store's base model and :func:`task_vector`
turns one tensor of a fine-tune into ``finetuned - base``, computed in fp32 whatever the float
precision of either side. Only float tensors are differenced: integer and boolean tensors (buffers
such as position ids, masks) must equal the base's, and their delta is zero. Writing is
:mod:`tvbase.io.save`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load

from tvbase.errors import BaseMismatchError, InvalidInputError, NotFoundError
from tvbase.s3 import S3Settings, is_s3_url, split_url, storage_errors

from .hub import cache_blobs

__all__ = ["Checkpoint", "check_compatible", "grows_rows", "new_rows", "task_vector"]

# Same limit as the safetensors library (MAX_HEADER_SIZE), so a header we accept it accepts too.
_MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_HASH_CHUNK_BYTES = 16 * 1024**2  # bounds fingerprint memory whatever the tensor size
_FINGERPRINT_VERSION = b"tvbase-fingerprint-v1\0"  # change if the hashed byte layout ever changes

# Bits per element of every dtype the safetensors format defines (sub-byte types pack several per byte).
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}  # fmt: skip
# Float tensors are differenced, whatever the precision of each side; every other dtype (integers,
# bool, complex) is carried unchanged from the base and must be equal in a fine-tune.
_FLOAT_DTYPES = frozenset({"BF16", *(dtype for dtype in _DTYPE_BITS if dtype.startswith("F"))})  # F16, F8_*, ...
_FIRST_COMPARE_BYTES = 64 * 1024  # byte comparisons start small: unequal tensors differ early
# dtypes read with a plain file read into memory of our own; the rest go through safetensors.
_TORCH_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip



class _Entry(NamedTuple):
    """Where one tensor lives: ``begin``/``end`` are absolute byte offsets in ``file`` (a local
    path, or the ``s3://`` URL of an object)."""

    file: Path | str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class Checkpoint:
    """A read-only, lazy view of a safetensors checkpoint.

    Build one with :meth:`Checkpoint.open`; it validates every header up front and reads tensor
    data only when asked (:meth:`get`, :meth:`fingerprint`). Files are opened lazily, one handle
    per shard, kept until :meth:`close` (or the end of a ``with`` block).

    Tensors are read with plain file reads into fresh memory, not through a memory map: pages of
    a mapped file stay in the process's resident set while it is open, and a fit keeps every
    input open, so a memory map made its peak RSS grow by the size of every input it touched.

    Attributes
    ----------
    path : Path or str
        The path given to :meth:`open` (an ``s3://`` URL stays a str).
    files : list of Path or str
        The safetensors files (or objects) holding the tensors, sorted.
    names : list of str
        Every tensor name, sorted.
    """

    def __init__(self, path: Path | str, entries: dict[str, _Entry]):
        # Private: use Checkpoint.open, which validates ``entries``.
        self.path = path
        self._s3 = None  # the s3fs file system, made on the first read of an s3:// object
        self._entries = dict(sorted(entries.items()))
        self.names = list(self._entries)
        self.files = sorted({entry.file for entry in self._entries.values()})
        self._handles = {}
        self._fingerprint = None
        self._same = {}  # (name, name) -> same_content answer

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """Open and validate a checkpoint.

        Parameters
        ----------
        path : str or os.PathLike
            A ``.safetensors`` file; a directory with ``model.safetensors.index.json`` and its
            shards; a directory holding exactly one ``.safetensors`` file; or the index file itself.
            Each may be in object storage: ``s3://BUCKET/KEY`` of a file, or of a prefix holding
            the files as a directory would. A directory may be a snapshot folder of the Hugging Face cache, whose files link into
            the cache entry's ``blobs/``. (A hub id is resolved to such a folder by
            :func:`tvbase.io.hub.resolve_model_path`, not here.)

        Returns
        -------
        Checkpoint

        Raises
        ------
        NotFoundError
            If ``path`` (or its bucket) does not exist.
        StorageError
            If object storage cannot be reached or refuses access.
        InvalidInputError
            If the checkpoint is a pickle format, a header or index is malformed or truncated, a
            shard is missing or lies outside the directory (or its cache entry's blobs), or it
            holds no tensors.
        """
        if is_s3_url(path):
            entries = _open_s3(path)
            if not entries:
                raise InvalidInputError(f"checkpoint {path!r} holds no tensors: expected at least one.")
            return cls(path, entries)
        path = Path(path)
        if not path.exists():
            raise NotFoundError(
                f"checkpoint {str(path)!r} does not exist: expected a .safetensors file or a directory "
                "of safetensors shards; check the path."
            )
        if path.is_dir():
            entries = _open_directory(path)
        elif path.name.endswith(".safetensors.index.json"):
            entries = _read_index(path, path.parent)
        else:
            _refuse_non_safetensors(path)
            entries = _read_header(path)
        if not entries:
            raise InvalidInputError(
                f"checkpoint {str(path)!r} holds no tensors: expected at least one; "
                "check that this is a model checkpoint and not an empty or metadata-only file."
            )
        return cls(path, entries)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the open shard handles; a later :meth:`get` reopens them as needed."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.names)} tensors, {len(self.files)} files)"

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def spec(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and safetensors dtype string (``"F32"``, ``"BF16"``, ``"I64"``, ...) of one tensor."""
        entry = self._entry(name)
        return entry.shape, entry.dtype

    def numel(self, name: str) -> int:
        """Number of elements of one tensor (1 for a scalar)."""
        return math.prod(self._entry(name).shape)

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Read one tensor from disk.

        Parameters
        ----------
        name : str
            Tensor name, one of :attr:`names`.
        dtype : torch.dtype or None, default torch.float32
            Dtype to convert to; ``None`` keeps the stored dtype.

        Returns
        -------
        Tensor of shape ``spec(name)[0]`` on CPU, of ``dtype``.

        Raises
        ------
        NotFoundError
            If the checkpoint has no tensor ``name``.
        """
        entry = self._entry(name)
        if entry.dtype in _TORCH_DTYPES and sys.byteorder == "little":  # the file is little-endian
            tensor = self._read(entry).view(_TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
        else:
            tensor = self._read_with_safetensors(entry, name)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def same_content(self, name: str, other: str) -> bool:
        """Whether two tensors of this checkpoint have the same shape, dtype and bytes.

        This is how tied weights are told (``lm_head.weight`` saved as a copy of
        ``model.embed_tokens.weight``); the answer is remembered, so many fine-tunes checked
        against one base read its tensors once.
        """
        key = (min(name, other), max(name, other))
        if key not in self._same:
            self._same[key] = self.spec(name) == self.spec(other) and _same_bytes(self, name, self, other)
        return self._same[key]

    def _read(self, entry: _Entry) -> torch.Tensor:
        """The raw bytes of one tensor, (nbytes,) uint8."""
        buffer = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
        self._read_into(entry.file, entry.begin, memoryview(buffer.numpy()))
        return buffer

    def _read_into(self, file: Path, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of ``file`` from ``offset`` on."""
        handle = self._handle(file)
        handle.seek(offset)
        done = 0
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                raise InvalidInputError(
                    f"safetensors file {str(file)!r} ended early while reading; it changed since it "
                    "was opened: re-export or re-download it."
                )
            done += got

    def _read_with_safetensors(self, entry: _Entry, name: str) -> torch.Tensor:
        """A dtype we do not decode ourselves: safetensors reads it, mapped only for this call."""
        if isinstance(entry.file, str):  # an object: its bytes, in a one-tensor safetensors buffer
            header = json.dumps({name: {"dtype": entry.dtype, "shape": list(entry.shape),
                                        "data_offsets": [0, entry.end - entry.begin]}}).encode()
            buffer = struct.pack("<Q", len(header)) + header + self._read(entry).numpy().tobytes()
            try:
                return safetensors_load(buffer)[name]
            except SafetensorError as error:
                raise InvalidInputError(f"cannot read tensor {name!r} ({entry.dtype}) from {entry.file!r}: {error}") from error
        try:
            with safe_open(str(entry.file), framework="pt", device="cpu") as f:
                return f.get_tensor(name).clone()
        except (SafetensorError, OSError) as error:
            raise InvalidInputError(
                f"cannot read tensor {name!r} ({entry.dtype}) from {str(entry.file)!r}: {error}; "
                "the file may have changed since it was opened, or torch cannot load this dtype."
            ) from error

    def fingerprint(self) -> dict:
        """Names, shapes, dtypes and a content hash that does not depend on sharding.

        The hash is a sha256 over, for each tensor in sorted name order, its name, dtype, shape and
        raw little-endian bytes, read tensor by tensor in bounded chunks. It is computed once.

        Returns
        -------
        dict
            ``{"tensors": {name: {"shape": [int, ...], "dtype": str}}, "hash": str}``; the hash
            is 64 hex digits.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(_FINGERPRINT_VERSION)
            for name, entry in self._entries.items():
                digest.update(json.dumps([name, entry.dtype, list(entry.shape)]).encode())
                _hash_range(digest, self._handle(entry.file), entry)
            self._fingerprint = {
                "tensors": {
                    name: {"shape": list(entry.shape), "dtype": entry.dtype}
                    for name, entry in self._entries.items()
                },
                "hash": digest.hexdigest(),
            }
        # A copy, so callers cannot corrupt the cached value.
        return json.loads(json.dumps(self._fingerprint))

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise NotFoundError(
                f"tensor {name!r} is not in checkpoint {str(self.path)!r} ({len(self._entries)} tensors); "
                "see Checkpoint.names for the tensors it holds."
            ) from None

    def _handle(self, file: Path | str):
        if file not in self._handles and isinstance(file, str):  # an s3:// object: ranged reads
            if self._s3 is None:
                self._s3 = S3Settings.from_env().filesystem()
            self._handles[file] = _S3Reader(self._s3, file)
        if file not in self._handles:
            try:
                self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115 (closed by close())
            except OSError as error:
                raise InvalidInputError(
                    f"cannot open {str(file)!r}: {error}; "
                    "the file may have changed since it was opened; re-export or re-download it."
                ) from error
        return self._handles[file]


def check_compatible(reference: dict, checkpoint: Checkpoint, label: str, base: Checkpoint | None = None) -> dict:
    """Check that ``checkpoint`` has the reference's tensor names, shapes and dtypes.

    Without ``base`` the match must be exact (a base model opened again). With ``base``,
    ``checkpoint`` is checked as a fine-tune of it, which may differ from the base in three ways
    and must agree in one more:

    - a float tensor may have another float dtype (F32, F16, BF16, F64, ...): task vectors are
      computed in fp32 (see :func:`task_vector`);
    - a tensor may be missing when the base ties it to a tensor the fine-tune has (same shape,
      dtype and bytes in the base, and not constant, as transformers saves ``lm_head.weight``
      tied to ``model.embed_tokens.weight``); its delta is the delta of that tensor;
    - a tensor the base lacks may be present when the fine-tune ties it to a tensor the base has
      (same shape, dtype and bytes in the fine-tune): a base saved tied gets its tie back on load,
      so the copy carries nothing and is never read. An untied one (other bytes) is refused;
    - every non-float tensor (integer or boolean buffers such as position ids or masks) must
      equal the base's: they are never differenced;
    - a float tensor may have more rows than the base's (an embedding or head of a fine-tune
      that added tokens): the rows the base has give the delta, the others are new
      (:func:`grows_rows`).

    Ties are told by content rather than by ``tie_word_embeddings`` in a ``config.json``: that
    works for a bare safetensors file, and for any tie, not only the head's.

    Parameters
    ----------
    reference : dict
        ``{name: {"shape": [int, ...], "dtype": str}}``, the ``"tensors"`` part of
        :meth:`Checkpoint.fingerprint` of the store's base model.
    checkpoint : Checkpoint
        The checkpoint to check, usually a fine-tune.
    label : str
        How to name the checkpoint in the message, e.g. ``"task 'math' (/path/to/ckpt)"``.
    base : Checkpoint, optional
        The base model ``reference`` describes; given, ``checkpoint`` is checked as its fine-tune.

    Returns
    -------
    dict of str to str
        Tensor missing from ``checkpoint`` -> the tensor it is tied to in the base, whose delta
        it takes; empty without ``base``.

    Raises
    ------
    BaseMismatchError
        Listing missing and extra tensors and shape and dtype mismatches, up to five of each
        with their counts; or, when the structure matches, the non-float tensors that differ
        from the base's.
    """
    found = set(checkpoint.names)
    shared = sorted(set(reference) & found)
    missing = sorted(set(reference) - found)
    extra = sorted(found - set(reference))
    tied = {}
    if base is not None:
        for name in missing:
            if (tied_to := _tied_to(base, name, shared)) is not None:
                tied[name] = tied_to
        missing = [name for name in missing if name not in tied]
        extra = [name for name in extra if _tied_to(checkpoint, name, shared) is None]
    shapes, dtypes = [], []
    for name in shared:
        shape, dtype = checkpoint.spec(name)
        expected_shape, expected_dtype = [int(size) for size in reference[name]["shape"]], reference[name]["dtype"]
        floats = dtype in _FLOAT_DTYPES and expected_dtype in _FLOAT_DTYPES
        if list(shape) != expected_shape and not (base is not None and floats and grows_rows(expected_shape, shape)):
            shapes.append(f"{name!r} expected {expected_shape}, found {list(shape)}")
        if dtype != expected_dtype and not (base is not None and floats):
            dtypes.append(f"{name!r} expected {expected_dtype}, found {dtype}")
    problems = [
        _summarize("missing tensor", [repr(name) for name in missing]),
        _summarize("extra tensor", [repr(name) for name in extra]),
        _summarize("shape mismatch", shapes, plural="shape mismatches"),
        _summarize("dtype mismatch", dtypes, plural="dtype mismatches"),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        rules = ""
        if base is not None:
            rules = (
                " A float tensor may differ in precision or have more rows (added tokens); a tensor may be missing "
                "only when the base ties it to "
                "one the fine-tune has (same bytes), and be extra only when the fine-tune ties it so."
            )
        raise BaseMismatchError(
            f"{label} does not match the store's base model: {'; '.join(problems)}. "
            "It must be a fine-tune of the store's base model, with the same tensor names, shapes "
            f"and dtypes; check that you passed the right checkpoint (and base).{rules}"
        )
    if base is not None:
        changed = [name for name in shared if not _same_non_float(base, checkpoint, name)]
        if changed:
            raise _changed_non_float_error(label, changed, base)
    return tied


def task_vector(base: Checkpoint, finetuned: Checkpoint, name: str, label: str) -> torch.Tensor:
    """One tensor of a task vector, ``finetuned - base``.

    A float tensor is converted to float32 on each side, whatever either's float dtype, and
    subtracted: a bf16 fine-tune of an fp32 base works, and so does the reverse. (When either
    side is F64 the subtraction is done in float64 and rounded after, so that precision is not
    lost to cancellation.) A non-float tensor (integer or boolean buffer) must equal the base's;
    its delta is zero.

    Parameters
    ----------
    base, finetuned : Checkpoint
        The base model and a fine-tune of it (see :func:`check_compatible`).
    name : str
        Tensor name present in both.
    label : str
        How to name the fine-tune in messages, e.g. ``"task 'math' (/path/to/ckpt)"``.

    Returns
    -------
    Tensor of shape ``base.spec(name)[0]``, float32, on CPU.

    Raises
    ------
    InvalidInputError
        If the fine-tuned tensor holds NaN or Inf values.
    BaseMismatchError
        If the two tensors differ in shape, or a non-float tensor differs from the base's.
    """
    base_shape, base_dtype = base.spec(name)
    shape, dtype = finetuned.spec(name)
    grown = base_dtype in _FLOAT_DTYPES and grows_rows(base_shape, shape)
    if shape != base_shape and not grown:
        raise BaseMismatchError(
            f"{label}: tensor {name!r} has shape {list(shape)}, the base has {list(base_shape)}; "
            "the checkpoint must be a fine-tune of the store's base model."
        )
    if not _same_non_float(base, finetuned, name):
        raise _changed_non_float_error(label, [name], base)
    if base_dtype not in _FLOAT_DTYPES:
        return torch.zeros(base_shape, dtype=torch.float32)
    work_dtype = torch.float64 if "F64" in (dtype, base_dtype) else torch.float32
    tuned = finetuned.get(name, dtype=work_dtype)
    bad = int((~torch.isfinite(tuned)).sum())
    if bad:
        raise InvalidInputError(
            f"{label}: tensor {name!r} holds {bad} NaN/Inf value{'s' if bad != 1 else ''} "
            f"out of {tuned.numel()}; the fine-tune diverged or was saved incorrectly: fix or retrain it."
        )
    if grown:  # rows after the base's are new: see new_rows
        tuned = tuned[: base_shape[0]]
    return (tuned - base.get(name, dtype=work_dtype)).to(torch.float32)


def grows_rows(base_shape, shape) -> bool:
    """Whether ``shape`` is ``base_shape`` with more rows (first dimension) and nothing else changed."""
    base_shape, shape = tuple(int(d) for d in base_shape), tuple(int(d) for d in shape)
    return len(shape) == len(base_shape) >= 1 and shape[1:] == base_shape[1:] and shape[0] > base_shape[0]


def new_rows(base: Checkpoint, finetuned: Checkpoint, name: str) -> torch.Tensor | None:
    """The rows of tensor ``name`` that ``finetuned`` has after the base's (tokens it added), as
    float32 (k, size of one row), or None when it has the base's rows."""
    (base_shape, _), (shape, _) = base.spec(name), finetuned.spec(name)
    if not grows_rows(base_shape, shape):
        return None
    rows = finetuned.get(name, dtype=torch.float32)[base_shape[0] :]  # (k, ...)
    return rows.reshape(len(rows), -1)


def _tied_to(checkpoint: Checkpoint, name: str, candidates: list[str]) -> str | None:
    """The first of ``candidates`` with the shape, dtype and bytes of tensor ``name``, or None.

    A constant tensor (all zeros, all ones) is never taken as tied: two of them are equal by
    coincidence, and taking one for the other would hide a tensor that is really missing.
    """
    other = next((candidate for candidate in candidates if checkpoint.same_content(name, candidate)), None)
    return None if other is None or _is_constant(checkpoint, name) else other


def _is_constant(checkpoint: Checkpoint, name: str) -> bool:
    """Whether every element of a tensor has the bytes of the first (read until one differs)."""
    entry = checkpoint._entry(name)
    size, width = entry.end - entry.begin, max(1, _DTYPE_BITS[entry.dtype] // 8)
    if size <= width:
        return True
    first = bytearray(width)
    checkpoint._read_into(entry.file, entry.begin, memoryview(first))
    done, chunk = 0, _FIRST_COMPARE_BYTES  # powers of two: whole elements in every chunk
    while done < size:
        step = min(chunk, size - done)
        block = bytearray(step)
        checkpoint._read_into(entry.file, entry.begin + done, memoryview(block))
        if block != first * (step // width):
            return False
        done, chunk = done + step, min(2 * chunk, _HASH_CHUNK_BYTES)
    return True


def _same_non_float(base: Checkpoint, finetuned: Checkpoint, name: str) -> bool:
    """True for a float tensor; for any other, whether the fine-tune's equals the base's."""
    (_, base_dtype), (_, dtype) = base.spec(name), finetuned.spec(name)
    if base_dtype in _FLOAT_DTYPES and dtype in _FLOAT_DTYPES:
        return True
    return base.spec(name) == finetuned.spec(name) and _same_bytes(base, name, finetuned, name)


def _changed_non_float_error(label: str, names: list[str], base: Checkpoint) -> BaseMismatchError:
    changed = [f"{name!r} ({base.spec(name)[1]})" for name in names]
    summary = _summarize("non-float tensor", changed, plural="non-float tensors")
    return BaseMismatchError(
        f"{label} does not match the store's base model: {summary} differ{'s' if len(names) == 1 else ''} "
        "from the base's. Integer and boolean tensors (buffers such as position ids or masks) are never "
        "differenced: tvbase keeps the base's, so a fine-tune must carry them unchanged; copy them from "
        "the base into the fine-tune, or check that it is a fine-tune of this base."
    )


def _same_bytes(a: Checkpoint, name_a: str, b: Checkpoint, name_b: str) -> bool:
    """Whether two tensors (of one checkpoint or two) hold the same bytes.

    Read in chunks that grow from 64 KiB to 16 MiB: tensors that differ are told apart after
    little reading, equal ones are read in bounded memory.
    """
    entry_a, entry_b = a._entry(name_a), b._entry(name_b)
    size = entry_a.end - entry_a.begin
    if size != entry_b.end - entry_b.begin:
        return False
    done, chunk = 0, _FIRST_COMPARE_BYTES
    while done < size:
        step = min(chunk, size - done)
        left, right = bytearray(step), bytearray(step)
        a._read_into(entry_a.file, entry_a.begin + done, memoryview(left))
        b._read_into(entry_b.file, entry_b.begin + done, memoryview(right))
        if left != right:
            return False
        done, chunk = done + step, min(2 * chunk, _HASH_CHUNK_BYTES)
    return True


# --- opening -------------------------------------------------------------------------------------------


def _open_directory(directory: Path) -> dict[str, _Entry]:
    names = [p.name for p in directory.iterdir() if p.is_file() or p.is_symlink()]
    kind, name = _choose_files(directory, names)
    path = directory / name
    _check_inside(path, directory, what="index" if kind == "index" else "safetensors file")
    return _read_index(path, directory) if kind == "index" else _read_header(path)


def _choose_files(directory: Path | str, names: list[str]) -> tuple[str, str]:
    """What to read of a checkpoint directory (or ``s3://`` prefix) holding files ``names``:
    ``("index", name)`` of its shard index or ``("weights", name)`` of its one safetensors file.

    Raises InvalidInputError, saying what to do, when there is no such choice.
    """
    indexes = sorted(name for name in names if name.endswith(".safetensors.index.json"))
    if INDEX_NAME in indexes:
        indexes = [INDEX_NAME]
    if len(indexes) > 1:
        raise InvalidInputError(
            f"checkpoint directory {str(directory)!r} holds {len(indexes)} safetensors indexes "
            f"({', '.join(indexes)}): expected one; pass the index file to open."
        )
    if indexes:
        return "index", indexes[0]
    # Hidden files are editor or OS droppings (e.g. macOS "._model.safetensors"), never weights.
    weights = sorted(name for name in names if name.endswith(".safetensors") and not name.startswith("."))
    if len(weights) == 1:
        return "weights", weights[0]
    if len(weights) > 1:
        raise InvalidInputError(
            f"checkpoint directory {str(directory)!r} holds {len(weights)} .safetensors files "
            f"({_first_names(weights)}) but no {INDEX_NAME}: expected one file, or shards with an index; "
            "add the index, or open a single file."
        )
    pickles = sorted(name for name in names if Path(name).suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidInputError(
            f"checkpoint directory {str(directory)!r} holds only pickle weight files ({_first_names(pickles)}): "
            "pickle checkpoints are refused for safety (loading them can run arbitrary code); "
            "convert them to safetensors (e.g. safetensors.torch.save_file on a state dict loaded "
            "with torch.load(weights_only=True))."
        )
    raise InvalidInputError(
        f"checkpoint directory {str(directory)!r} holds no .safetensors file: expected a model.safetensors "
        f"or shards with {INDEX_NAME}; check the path."
    )


def _refuse_non_safetensors(file: Path | str) -> None:
    suffix = Path(file).suffix  # also of an s3:// URL, which str(file) keeps whole for messages
    if suffix in PICKLE_SUFFIXES:
        raise InvalidInputError(
            f"{str(file)!r} is a pickle checkpoint ({suffix}): pickle checkpoints are refused for "
            "safety (loading them can run arbitrary code); convert it to safetensors (e.g. "
            "safetensors.torch.save_file on a state dict loaded with torch.load(weights_only=True))."
        )
    if suffix != ".safetensors":
        raise InvalidInputError(
            f"{str(file)!r} is not a safetensors file: expected a .safetensors suffix, found "
            f"{suffix or 'none'!r}; convert the checkpoint to safetensors."
        )


def _check_inside(file: Path, directory: Path, what: str) -> None:
    # A symlink may point anywhere; only what lies inside the checkpoint directory is part of it,
    # and, for a snapshot folder of the Hugging Face cache, its own cache entry's blobs/.
    target = file.resolve()
    if target.is_relative_to(directory.resolve()):
        return
    blobs = cache_blobs(directory)
    if blobs is None:
        raise InvalidInputError(
            f"{what} {str(file)!r} resolves to {str(target)!r}, outside the checkpoint directory "
            f"{str(directory)!r}: a checkpoint's files must lie inside it (a link out of it could pull in "
            "any file); copy the real files into the directory."
        )
    if not target.is_relative_to(blobs):
        raise InvalidInputError(
            f"{what} {str(file)!r} resolves to {str(target)!r}, outside the checkpoint directory "
            f"{str(directory)!r} and outside {str(blobs)!r}, the blobs folder of its Hugging Face cache entry: "
            "a cached model's files may only link into their own entry's blobs; download the model "
            "again, or copy the real files into the directory."
        )


def _read_index(index: Path | str, directory: Path | str, files=None) -> dict[str, _Entry]:
    """Entries of every tensor of a sharded checkpoint; ``files``: the s3fs file system that
    ``index`` and ``directory`` (then ``s3://`` URLs) are read through, None for local paths."""
    try:
        text = index.read_text(encoding="utf-8") if files is None else files.cat_file(_s3_key(index)).decode("utf-8")
        content = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(
            f"index {str(index)!r} is not valid JSON ({error}): expected "
            '{"metadata": ..., "weight_map": {tensor: shard}}; re-export or re-download it.'
        ) from error
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(shard, str) for name, shard in weight_map.items()
    ):
        raise InvalidInputError(
            f"index {str(index)!r} has no valid weight_map: expected an object mapping tensor names "
            f"to shard file names, found {type(weight_map).__name__}; re-export or re-download it."
        )
    headers = {}
    for shard in sorted(set(weight_map.values())):
        path = _shard_path(shard, index, directory) if files is None else _s3_shard(files, shard, index, directory)
        headers[shard] = _read_header(path, files)
    entries = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise InvalidInputError(
                f"index {str(index)!r} puts tensor {name!r} in shard {shard!r}, but that shard does "
                f"not hold it ({len(headers[shard])} tensors); the index and shards come from "
                "different exports: re-export or re-download the checkpoint."
            )
        entries[name] = headers[shard][name]
    return entries


def _check_shard_name(shard: str, index: Path | str) -> None:
    parts = PurePosixPath(shard).parts + PureWindowsPath(shard).parts
    if not shard or PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute() or ".." in parts:
        raise InvalidInputError(
            f"index {str(index)!r} names shard {shard!r}: expected a file name relative to the "
            "checkpoint directory, without '..' or an absolute path; fix the index."
        )


def _missing_shard(shard: str, index: Path | str, directory: Path | str) -> InvalidInputError:
    return InvalidInputError(
        f"index {str(index)!r} names shard {shard!r}, which is missing from {str(directory)!r}; "
        "download or copy the missing shard."
    )


def _shard_path(shard: str, index: Path, directory: Path) -> Path:
    _check_shard_name(shard, index)
    path = directory / shard
    if not path.is_file():
        raise _missing_shard(shard, index, directory)
    _check_inside(path, directory, what="shard")
    _refuse_non_safetensors(path)
    return path


def _read_header(file: Path | str, files=None) -> dict[str, _Entry]:
    """Parse and validate a safetensors header without trusting any of it; ``files``: the s3fs
    file system an ``s3://`` ``file`` is read through (two ranged reads), None for a local path."""
    size = file.stat().st_size if files is None else files.size(_s3_key(file))
    where = f"safetensors file {str(file)!r}"
    if size < 8:
        raise InvalidInputError(
            f"{where} is {size} bytes: expected at least 8 (the header length); "
            "the file is truncated or not safetensors: re-export or re-download it."
        )
    with open(file, "rb") if files is None else _S3Reader(files, file) as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(8))
        if header_bytes > _MAX_HEADER_BYTES:
            raise InvalidInputError(
                f"{where} declares an oversized header of {header_bytes} bytes: expected at most "
                f"{_MAX_HEADER_BYTES}; the file is corrupt or not safetensors: re-export or re-download it."
            )
        if 8 + header_bytes > size:
            raise InvalidInputError(
                f"{where} is truncated: its header needs {8 + header_bytes} bytes, the file has {size}; "
                "re-export or re-download it."
            )
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKeyError) as error:
        raise InvalidInputError(
            f"{where} has a header that is not valid UTF-8 JSON ({error}); the file is corrupt or "
            "not safetensors: re-export or re-download it."
        ) from error
    if not isinstance(header, dict):
        raise InvalidInputError(
            f"{where} has a header that is a JSON {type(header).__name__}: expected an object; "
            "the file is corrupt: re-export or re-download it."
        )
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidInputError(
            f"{where} has __metadata__ that is not an object of strings; re-export the file."
        )
    data_start, data_bytes = 8 + header_bytes, size - 8 - header_bytes
    entries = {}
    for name, info in header.items():
        dtype, shape, begin, end = _check_entry(where, name, info)
        if end > data_bytes:
            raise InvalidInputError(
                f"{where}: tensor {name!r} ends at data byte {end}, past the {data_bytes} bytes the file "
                "holds; the file is truncated or corrupt: re-export or re-download it."
            )
        entries[name] = _Entry(file, dtype, shape, data_start + begin, data_start + end)
    _check_layout(where, entries, data_start, data_bytes)
    return entries


def _check_entry(where: str, name: str, info: object) -> tuple[str, tuple[int, ...], int, int]:
    def bad(what: str) -> InvalidInputError:
        return InvalidInputError(f"{where}: tensor {name!r} {what}; the file is corrupt: re-export it.")

    if not isinstance(info, dict):
        raise bad(f"has a header entry of type {type(info).__name__}: expected an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise bad(f"has dtype {dtype!r}: expected one of {', '.join(sorted(_DTYPE_BITS))}")
    if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
        raise bad(f"has shape {shape!r}: expected a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(offset) for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"has data_offsets {offsets!r}: expected [begin, end] with 0 <= begin <= end")
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise bad(
            f"has data_offsets {offsets} spanning {offsets[1] - offsets[0]} bytes: shape {shape} of "
            f"{dtype} needs {bits / 8:g}"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_layout(where: str, entries: dict[str, _Entry], data_start: int, data_bytes: int) -> None:
    # safetensors requires the tensors to tile the data region exactly: no overlap, no gap, no tail.
    position = data_start
    previous = None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise InvalidInputError(
                f"{where}: tensors {previous!r} and {name!r} overlap (data bytes "
                f"{entry.begin - data_start} < {position - data_start}); the file is corrupt: re-export it."
            )
        if entry.begin > position:
            raise InvalidInputError(
                f"{where}: a gap of {entry.begin - position} bytes precedes tensor {name!r}; expected "
                "tensors packed back to back; the file is corrupt: re-export it."
            )
        position, previous = entry.end, name
    if position != data_start + data_bytes:
        raise InvalidInputError(
            f"{where}: the tensors cover {position - data_start} data bytes but the file holds {data_bytes}; "
            "expected no trailing bytes; the file is corrupt: re-export it."
        )


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads would silently keep the last duplicate; a header naming a tensor twice is corrupt.
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _hash_range(digest, file, entry: _Entry) -> None:
    file.seek(entry.begin)
    remaining = entry.end - entry.begin
    while remaining:
        chunk = file.read(min(remaining, _HASH_CHUNK_BYTES))
        if not chunk:
            raise InvalidInputError(
                f"safetensors file {str(entry.file)!r} ended early while hashing; it changed since it "
                "was opened: re-export or re-download it."
            )
        digest.update(chunk)
        remaining -= len(chunk)


def _first_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _summarize(kind: str, items: list[str], plural: str | None = None, limit: int = 5) -> str:
    if not items:
        return ""
    noun = kind if len(items) == 1 else plural or kind + "s"
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {noun}: {shown}{more}"


# --- object storage ------------------------------------------------------------------------------------


def _s3_key(url: str) -> str:
    """``s3://BUCKET/KEY`` -> ``BUCKET/KEY``, the path s3fs takes."""
    return url[len("s3://") :]


def _open_s3(url: str) -> dict[str, _Entry]:
    """Entries of a checkpoint in object storage, checked by the same code as a local one.

    ``url`` names a ``.safetensors`` object, a shard index, or a prefix holding what a
    checkpoint directory would (``model.safetensors.index.json`` and its shards, or one
    ``.safetensors`` object). Only the headers and the index are read here, with ranged reads.
    A LoRA adapter folder is read from a local disk only.
    """
    split_url(url)  # refuses a malformed bucket name before any request
    settings = S3Settings.from_env()
    settings.check_reachable(url)
    files = settings.filesystem()
    key = _s3_key(url).rstrip("/")
    with storage_errors(url):
        try:
            kind = files.info(key)["type"]
        except FileNotFoundError as error:
            if "bucket" in str(error).lower():
                raise  # storage_errors names the missing bucket
            raise NotFoundError(
                f"checkpoint {url!r} does not exist: expected a .safetensors object, or a prefix holding "
                f"{INDEX_NAME} and its shards (or one .safetensors object); check the URL."
            ) from None
        if kind == "directory":
            prefix = url.rstrip("/")
            names = [PurePosixPath(path).name for path in files.ls(key, detail=False)]
            if "adapter_config.json" in names:
                raise InvalidInputError(
                    f"{prefix!r} holds a PEFT LoRA adapter (adapter_config.json): adapters are read from a local "
                    "folder only; copy it to a local disk first (e.g. `aws s3 cp --recursive`)."
                )
            kind, name = _choose_files(prefix, names)
            found = f"{prefix}/{name}"
            return _read_index(found, prefix, files) if kind == "index" else _read_header(found, files)
        if key.endswith(".safetensors.index.json"):
            return _read_index(url, url.rsplit("/", 1)[0], files)
        _refuse_non_safetensors(url)
        return _read_header(url, files)


def _s3_shard(files, shard: str, index: str, prefix: str) -> str:
    """The URL of a shard the index at ``index`` names (objects are no links: a name without
    ``..`` stays under the prefix)."""
    _check_shard_name(shard, index)
    url = f"{prefix}/{shard}"
    if not files.isfile(_s3_key(url)):
        raise _missing_shard(shard, index, prefix)
    _refuse_non_safetensors(url)
    return url


class _S3Reader:
    """One ``s3://`` object opened for reading with ranged GETs of the bytes asked for and no
    more (fsspec's ``cache_type="none"``: nothing read ahead, nothing kept), every failure a
    tvbase error."""

    def __init__(self, files, url: str):
        self.url = url
        with storage_errors(url):
            try:
                self._file = files.open(_s3_key(url), "rb", cache_type="none")
            except FileNotFoundError:
                raise InvalidInputError(
                    f"cannot open {url!r}: the object is gone; it changed since it was opened: upload it again."
                ) from None

    def seek(self, offset: int) -> None:
        self._file.seek(offset)

    def read(self, n: int) -> bytes:
        with storage_errors(self.url):
            return self._file.read(n)

    def readinto(self, view) -> int:
        with storage_errors(self.url):
            return self._file.readinto(view)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
