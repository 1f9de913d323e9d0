"""Quantization of factor matrices with one absmax scale per column.

Factor matrices (``U``, ``V``, cores, per-task SVD factors) are small next to the tensors they
rebuild, and a pilot on a 24-task digits zoo measured int8 factors within 0.001 accuracy of fp32, so a
plain symmetric round-to-nearest quantizer is enough; no calibration, no outlier handling.

Payload layout (all little-endian, self-contained given ``bits`` and ``shape``):

- ``bits=32``: ``rows * cols`` float32 values, row-major.
- ``bits=16``: ``rows * cols`` float16 values, row-major.
- ``bits in {8, 4, 2}``: ``cols`` float32 scales, then the codes of the row-major flattened
  matrix. A code ``q`` in ``[-qmax, qmax]``, ``qmax = 2**(bits-1) - 1``, decodes to
  ``q * scale[col]``.

  - 8 bits: one int8 (two's complement) per element.
  - 4 and 2 bits: ``8 // bits`` codes per byte, stored offset-binary as ``q + 2**(bits-1)``
    (so 1..15 for 4 bits, 1..3 for 2 bits). Element ``k`` of the flattened matrix sits in byte
    ``k // per_byte`` at bit offset ``bits * (k % per_byte)``: the first element in the least
    significant bits. The last byte is padded with zero fields, which no code uses.

Note that 2 bits give three levels, ``{-scale, 0, +scale}``: symmetric codes leave one of the
four patterns unused, in exchange for an exact zero and no bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tvbase.errors import InvalidInputError

from .bits import QUANTIZERS, _check_shape, parse_bits, payload_nbytes

__all__ = [
    "QUANTIZERS",
    "QuantizedMatrix",
    "dequantize",
    "keep_columns",
    "parse_bits",
    "payload_nbytes",
    "quantize",
    "quantize_clipped",
]

_FLOAT_DTYPES = {32: np.dtype("<f4"), 16: np.dtype("<f2")}
_SCALE_DTYPE = np.dtype("<f4")
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes into bytes, first element in the low bits (see module docstring).

    Parameters
    ----------
    codes : torch.Tensor of shape (n,), integer dtype, values in [-qmax, qmax]
    bits : {8, 4, 2}

    Returns
    -------
    torch.Tensor of shape (ceil(n * bits / 8),), dtype uint8, same device as ``codes``
    """
    if bits == 8:
        return codes.to(torch.int8).view(torch.uint8)  # two's complement bytes
    per_byte = 8 // bits
    fields = (codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)  # offset binary, >= 1
    pad = (-fields.numel()) % per_byte
    fields = torch.nn.functional.pad(fields, (0, pad))  # zero fields: never a valid code
    fields = fields.view(-1, per_byte)  # (n_bytes, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per_byte,)
    # Fields occupy disjoint bits, so a sum is a bitwise OR.
    return (fields << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`_pack_codes`.

    Parameters
    ----------
    packed : torch.Tensor of shape (n_bytes,), dtype uint8, any device
    bits : {8, 4, 2}
    count : int
        Number of codes to return (drops the padding).

    Returns
    -------
    torch.Tensor of shape (count,), dtype int8, same device as ``packed``
    """
    if bits == 8:
        return packed[:count].view(torch.int8)
    return (_unpack_fields(packed, bits, count).view(torch.int8) - 2 ** (bits - 1)).to(torch.int8)


def _unpack_fields(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The offset-binary fields of :func:`_pack_codes` (codes + 2**(bits-1)), (count,) uint8.

    On the CPU numpy splits and interleaves the fields 3x faster than torch's uint8 kernels,
    which made int4 decoding the bulk of a rebuild; on a GPU torch's are fast.
    """
    per_byte, mask = 8 // bits, (1 << bits) - 1
    if packed.device.type == "cpu":
        p = packed.numpy()
        fields = np.stack([(p >> (i * bits)) & mask for i in range(per_byte)], axis=1)  # (n_bytes, per_byte)
        return torch.from_numpy(fields.reshape(-1)[:count])
    fields = torch.stack([(packed >> (i * bits)) & mask for i in range(per_byte)], dim=1)  # (n_bytes, per_byte)
    return fields.reshape(-1)[:count]


@dataclass(frozen=True)
class QuantizedMatrix:
    """A quantized ``(rows, cols)`` float32 matrix and its exact byte payload.

    Build with :func:`quantize` or :meth:`from_bytes`; decode with :func:`dequantize`.

    Parameters
    ----------
    bits : {32, 16, 8, 4, 2}
    shape : tuple of int (rows, cols)
    data : bytes
        The payload described in the module docstring; ``len(data) == payload_nbytes(*shape,
        bits)``. Immutable, so instances are hashable and compare by value.
    """

    bits: int
    shape: tuple[int, int]
    data: bytes

    def __post_init__(self):
        # Inner code trusts instances, so check the invariants once, here.
        object.__setattr__(self, "bits", parse_bits(self.bits))
        object.__setattr__(self, "shape", _check_shape(self.shape))
        if not isinstance(self.data, bytes):
            raise InvalidInputError(
                f"data must be bytes, got {type(self.data).__name__}; "
                "use QuantizedMatrix.from_bytes"
            )
        expected = payload_nbytes(*self.shape, self.bits)
        if len(self.data) != expected:
            raise InvalidInputError(
                f"payload of a {self.shape[0]}x{self.shape[1]} matrix at {self.bits} bits must be "
                f"{expected} bytes, got {len(self.data)}"
            )

    def __repr__(self) -> str:
        return f"QuantizedMatrix(bits={self.bits}, shape={self.shape}, nbytes={self.nbytes})"

    @property
    def nbytes(self) -> int:
        """Size of :meth:`to_bytes`, in bytes."""
        return len(self.data)

    @property
    def scales(self) -> np.ndarray | None:
        """Per-column scales, ndarray of shape (cols,), float32, read-only; None for 32/16 bits."""
        if self.bits in _FLOAT_DTYPES:
            return None
        return np.frombuffer(self.data, dtype=_SCALE_DTYPE, count=self.shape[1])

    @property
    def codes(self) -> np.ndarray | None:
        """Integer codes, ndarray of shape (rows, cols), int8, unpacked; None for 32/16 bits."""
        if self.bits in _FLOAT_DTYPES:
            return None
        rows, cols = self.shape
        packed = np.frombuffer(self.data, dtype=np.uint8, offset=cols * _SCALE_DTYPE.itemsize)
        codes = _unpack_codes(torch.from_numpy(packed.copy()), self.bits, rows * cols)  # (r*c,)
        return codes.numpy().reshape(rows, cols)

    def to_bytes(self) -> bytes:
        """The self-contained little-endian payload; see the module docstring for its layout."""
        return self.data

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview | np.ndarray, bits: int | str, shape
    ) -> "QuantizedMatrix":
        """Rebuild from a payload written by :meth:`to_bytes`.

        Parameters
        ----------
        data : bytes, bytearray, memoryview or ndarray of dtype uint8
            The payload; copied, so the caller may reuse its buffer.
        bits : int or str
            As given to :func:`quantize`.
        shape : tuple of int (rows, cols)

        Raises
        ------
        InvalidInputError
            If the length does not match ``payload_nbytes(rows, cols, bits)``.
        """
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8:
                raise InvalidInputError(f"payload array must have dtype uint8, got {data.dtype}")
            data = np.ascontiguousarray(data).tobytes()
        elif isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        elif not isinstance(data, bytes):
            raise InvalidInputError(
                f"payload must be bytes, memoryview or a uint8 array, got {type(data).__name__}"
            )
        return cls(bits=bits, shape=shape, data=data)


@torch.no_grad()
def quantize(x: torch.Tensor, bits: int | str) -> QuantizedMatrix:
    """Quantize a matrix with one absmax scale per column.

    Parameters
    ----------
    x : torch.Tensor of shape (rows, cols), floating dtype, any device
        Converted to float32 first. Must be finite.
    bits : int or str
        32, 16, 8, 4 or 2, or a name from :data:`QUANTIZERS`.

    Returns
    -------
    QuantizedMatrix
        For integer codes, ``scale = absmax(column) / qmax`` (float32, 0 for a zero column) and
        ``code = round(x / scale)`` (round half to even), so every element decodes within
        ``scale / 2`` of its float32 value.

    Raises
    ------
    InvalidInputError
        For a non-2-D or non-floating tensor, non-finite values, values outside the float16 range
        with ``bits=16``, or an unknown ``bits``.
    """
    bits = parse_bits(bits)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidInputError(f"expected a 2-D floating torch.Tensor, got {desc}")
    x = x.detach().to(torch.float32)
    if not torch.isfinite(x).all():
        raise InvalidInputError("matrix contains NaN or inf; cannot quantize")
    rows, cols = x.shape

    if bits in _FLOAT_DTYPES:
        if bits == 16 and x.numel() and x.abs().max().item() > _FP16_MAX:
            raise InvalidInputError(
                f"values up to {x.abs().max().item():.4g} overflow float16 (max {_FP16_MAX:g}); "
                "use bits=32 or an integer quantizer"
            )
        values = x.to(torch.float16 if bits == 16 else torch.float32).contiguous().cpu().numpy()
        data = values.astype(_FLOAT_DTYPES[bits], copy=False).tobytes()  # row-major
        return QuantizedMatrix(bits=bits, shape=(rows, cols), data=data)

    qmax = _qmax(bits)
    if rows:
        scale = x.abs().amax(dim=0) / qmax  # (cols,) float32
    else:
        scale = x.new_zeros(cols)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero column: codes are 0
    codes = torch.round(x / safe).clamp_(-qmax, qmax).to(torch.int8)  # (rows, cols)
    packed = _pack_codes(codes.reshape(-1), bits)  # (n_bytes,), row-major order
    data = scale.cpu().numpy().astype(_SCALE_DTYPE, copy=False).tobytes()
    data += packed.cpu().numpy().tobytes()
    return QuantizedMatrix(bits=bits, shape=(rows, cols), data=data)


# scales tried by quantize_clipped, as fractions of the absmax scale
_CLIP_RATIOS = (1.0, 0.8, 0.6, 0.45, 0.35, 0.25)


@torch.no_grad()
def quantize_clipped(x: torch.Tensor, bits: int | str) -> QuantizedMatrix:
    """Quantize a (rows, 1) column at the scale of least squared error among a few fractions
    of the absmax scale (entries beyond it are clipped); same payload as :func:`quantize`.

    For heavy-tailed values at few bits: at 2 bits (codes -1, 0, 1) the absmax scale rounds
    nearly every entry of a sparse residual to 0, a third of it keeps most of its energy.
    """
    bits = parse_bits(bits)
    if bits in _FLOAT_DTYPES or x.ndim != 2 or x.shape[1] != 1 or not x.numel():
        return quantize(x, bits)
    x = x.detach().to(torch.float32)
    if not torch.isfinite(x).all():
        raise InvalidInputError("matrix contains NaN or inf; cannot quantize")
    qmax, absmax = _qmax(bits), float(x.abs().max())
    if absmax == 0:
        return quantize(x, bits)
    best = None
    for ratio in _CLIP_RATIOS:
        scale = float(np.float32(absmax * ratio / qmax))  # as stored
        codes = torch.round(x / scale).clamp_(-qmax, qmax)
        error = float((codes * scale - x).square().sum())
        if best is None or error < best[0]:
            best = (error, scale, codes)
    _, scale, codes = best
    data = np.array([scale], dtype=_SCALE_DTYPE).tobytes() + _pack_codes(codes.to(torch.int8).reshape(-1), bits).cpu().numpy().tobytes()
    return QuantizedMatrix(bits=bits, shape=tuple(x.shape), data=data)


@torch.no_grad()
def dequantize(q: QuantizedMatrix, device: torch.device | str | None = None) -> torch.Tensor:
    """Decode a :class:`QuantizedMatrix` on ``device``.

    Only the payload bytes travel to the device; codes are unpacked and scaled there with torch
    ops, so a GPU rebuild moves ``bits / 32`` of the float32 size.

    Parameters
    ----------
    q : QuantizedMatrix
    device : torch.device or str, optional
        Defaults to the CPU.

    Returns
    -------
    torch.Tensor of shape (rows, cols), dtype float32, on ``device``
    """
    if not isinstance(q, QuantizedMatrix):
        raise InvalidInputError(f"expected a QuantizedMatrix, got {type(q).__name__}")
    device = torch.device("cpu") if device is None else torch.device(device)
    rows, cols = q.shape
    if not rows * cols:
        return torch.zeros(rows, cols, dtype=torch.float32, device=device)
    # numpy reads the little-endian payload into native-order arrays (astype copies, so torch
    # gets a writable buffer); only the payload-sized array then travels to the device.
    if q.bits in _FLOAT_DTYPES:
        wire = _FLOAT_DTYPES[q.bits]
        values = np.frombuffer(q.data, dtype=wire).astype(wire.newbyteorder("="))
        values = torch.from_numpy(values).to(device)  # (rows * cols,) float32 or float16
        return values.to(torch.float32).view(rows, cols)

    n_scale = cols * _SCALE_DTYPE.itemsize
    scale = np.frombuffer(q.data, dtype=_SCALE_DTYPE, count=cols).astype(np.float32)
    scale = torch.from_numpy(scale).to(device)  # (cols,)
    packed = torch.from_numpy(np.frombuffer(q.data, dtype=np.uint8, offset=n_scale).copy())
    if q.bits == 8:
        codes = _unpack_codes(packed.to(device), q.bits, rows * cols)  # (rows * cols,) int8
        return codes.to(torch.float32).view(rows, cols) * scale[None, :]  # (rows, cols)
    # fields are codes + offset: value = field * scale - offset * scale, in one fused op that
    # also promotes the uint8 fields to float32 (2.5x faster than a cast, then the arithmetic)
    fields = _unpack_fields(packed.to(device), q.bits, rows * cols).view(rows, cols)
    return torch.addcmul((-(2 ** (q.bits - 1)) * scale)[None, :], fields, scale[None, :])  # (rows, cols)


def keep_columns(q: QuantizedMatrix, cols: int) -> QuantizedMatrix:
    """The first ``cols`` columns of ``q``, from its codes: scales are per column, so the
    result is exactly what quantizing those columns gives, with no decode and re-encode."""
    rows, total = q.shape
    cols = int(cols)
    if not 0 <= cols <= total:
        raise InvalidInputError(f"cannot keep {cols} of the {total} columns of a matrix")
    if cols == total:
        return q
    if q.bits in _FLOAT_DTYPES:
        values = np.frombuffer(q.data, dtype=_FLOAT_DTYPES[q.bits]).reshape(rows, total)[:, :cols]
        return QuantizedMatrix(bits=q.bits, shape=(rows, cols), data=np.ascontiguousarray(values).tobytes())
    kept = torch.from_numpy(np.ascontiguousarray(q.codes[:, :cols])).reshape(-1)  # (rows * cols,) int8
    data = q.scales[:cols].tobytes() + _pack_codes(kept, q.bits).numpy().tobytes()
    return QuantizedMatrix(bits=q.bits, shape=(rows, cols), data=data)
