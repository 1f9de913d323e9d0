"""Bit widths of stored factors and the exact size of their payloads: no torch needed, so the
command line and the store format can use them without loading it. See :mod:`.quantize` for
the payload layout."""

from __future__ import annotations

import math
import numbers

from tvbase.errors import InvalidInputError

# Name -> bits. Integer codes follow the symmetric absmax scheme of LLM.int8()/GPTQ-style
# per-channel quantization (Dettmers et al., 2022), here per column of a factor matrix.
QUANTIZERS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}

_VALID_BITS = tuple(QUANTIZERS.values())  # (32, 16, 8, 4, 2)
_FLOAT_BYTES = {32: 4, 16: 2}
_SCALE_BYTES = 4  # one float32 scale per column


def _choices() -> str:
    names = ", ".join(QUANTIZERS)
    bits = ", ".join(str(b) for b in _VALID_BITS)
    return f"{names} (or bits {bits})"


def parse_bits(name_or_int: str | int) -> int:
    """Bits of a quantizer given by name (``"int8"``) or by bit count (``8`` or ``"8"``).

    Parameters
    ----------
    name_or_int : str or int
        A key of :data:`QUANTIZERS` (case-insensitive) or one of 32, 16, 8, 4, 2.

    Returns
    -------
    int
        One of 32, 16, 8, 4, 2.

    Raises
    ------
    InvalidInputError
        For anything else; the message lists the valid choices.
    """
    if isinstance(name_or_int, str):
        key = name_or_int.strip().lower()
        if key in QUANTIZERS:
            return QUANTIZERS[key]
        if key.isdigit() and int(key) in _VALID_BITS:
            return int(key)
    elif isinstance(name_or_int, numbers.Integral) and not isinstance(name_or_int, bool):
        if int(name_or_int) in _VALID_BITS:
            return int(name_or_int)
    raise InvalidInputError(f"unknown quantizer {name_or_int!r}; valid choices: {_choices()}")


def _check_shape(shape) -> tuple[int, int]:
    try:
        rows, cols = shape
    except (TypeError, ValueError):
        raise InvalidInputError(f"shape must be (rows, cols), got {shape!r}") from None
    for n in (rows, cols):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise InvalidInputError(
                f"shape must be two non-negative integers, got {shape!r}"
            )
    return int(rows), int(cols)


def payload_nbytes(rows: int, cols: int, bits: int) -> int:
    """Exact size in bytes of the payload of a ``(rows, cols)`` matrix quantized to ``bits``.

    Used by the budget allocator before anything is quantized; equals
    ``len(quantize(x, bits).to_bytes())`` for every ``x`` of that shape.
    """
    rows, cols = _check_shape((rows, cols))
    bits = parse_bits(bits)
    if bits in _FLOAT_BYTES:
        return rows * cols * _FLOAT_BYTES[bits]
    return cols * _SCALE_BYTES + math.ceil(rows * cols * bits / 8)
