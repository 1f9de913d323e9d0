"""Tests for per-column absmax quantization of factor matrices (tvbase.codec.quantize)."""

import dataclasses

import numpy as np
import pytest
import torch

from tvbase.errors import InvalidInputError
from tvbase.codec.quantize import (
    QUANTIZERS,
    QuantizedMatrix,
    _pack_codes,
    _unpack_codes,
    dequantize,
    keep_columns,
    parse_bits,
    payload_nbytes,
    quantize,
)

SHAPES = [(1, 1), (7, 5), (16, 3), (33, 7), (64, 1), (5, 64), (3, 2)]
INT_BITS = [8, 4, 2]
ALL_BITS = [32, 16, 8, 4, 2]
EPS32 = float(np.finfo(np.float32).eps)


def _matrix(shape, seed, zero_column=True):
    """Random (rows, cols) float32 matrix: column scales from 1e-4 to 1e2, one zero column."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    x = torch.randn(rows, cols, generator=gen)
    x *= torch.logspace(-4, 2, cols)[None, :]  # per-column scales from 1e-4 to 1e2
    if zero_column and cols > 1:
        x[:, cols // 2] = 0.0
    return x


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_round_trip_is_exact(shape):
    x = _matrix(shape, seed=0)
    y = dequantize(quantize(x, 32))
    assert y.dtype == torch.float32 and y.shape == shape
    assert torch.equal(y, x)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_matches_a_float16_cast(shape):
    x = _matrix(shape, seed=1)
    y = dequantize(quantize(x, "fp16"))
    assert torch.equal(y, x.half().float())
    # float16 has an 11-bit significand: relative error <= 2**-11 for normal values, and
    # absolute error <= 2**-25 (half the smallest subnormal step) below the normal range.
    assert torch.all((y - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25)


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_integer_error_within_half_a_step(bits, shape, seed):
    x = _matrix(shape, seed)
    q = quantize(x, bits)
    qmax = 2 ** (bits - 1) - 1
    scales = torch.from_numpy(q.scales.copy())  # (cols,)
    codes = torch.from_numpy(q.codes.astype(np.int64))  # (rows, cols)

    # Scale is the column absmax over qmax (as float32); a zero column gets 0.
    absmax = x.abs().amax(dim=0)
    assert torch.equal(scales, absmax / qmax)
    assert codes.abs().max() <= qmax
    # The absmax element of each non-zero column maps to +-qmax.
    nonzero = absmax > 0
    assert torch.all(codes.abs().amax(dim=0)[nonzero] == qmax)

    y = dequantize(q)
    assert y.dtype == torch.float32 and y.shape == shape
    # Round to nearest: |x - q*scale| <= scale/2, up to float32 rounding of x/scale and q*scale.
    err = (y.double() - x.double()).abs()
    bound = scales.double()[None, :] / 2 + 4 * EPS32 * x.abs().double()
    assert torch.all(err <= bound), (err - bound).max()
    if cols_with_zero := (~nonzero).nonzero().flatten().tolist():
        assert torch.all(y[:, cols_with_zero] == 0)
        assert torch.all(codes[:, cols_with_zero] == 0)


@pytest.mark.parametrize("bits", INT_BITS)
def test_codes_are_round_to_nearest(bits):
    x = _matrix((9, 4), seed=7)
    q = quantize(x, bits)
    scales = torch.from_numpy(q.scales.copy())
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    expected = torch.round(x / safe).to(torch.int8).numpy()
    np.testing.assert_array_equal(q.codes, expected)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 8, 13, 64, 101])
def test_packing_round_trip_is_exact(bits, count):
    qmax = 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(count)
    codes = torch.randint(-qmax, qmax + 1, (count,), generator=gen, dtype=torch.int8)
    packed = _pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-count * bits // 8)  # ceil
    assert torch.equal(_unpack_codes(packed, bits, count), codes)


def test_packing_layout_first_element_in_low_bits():
    # 4 bits: fields are code + 8, two per byte, first element in the low nibble.
    codes4 = torch.tensor([-7, 7, 0], dtype=torch.int8)  # fields 1, 15, 8
    assert _pack_codes(codes4, 4).tolist() == [1 | 15 << 4, 8]
    # 2 bits: fields are code + 2, four per byte, first element in the lowest two bits.
    codes2 = torch.tensor([-1, 0, 1, 1, -1], dtype=torch.int8)  # fields 1, 2, 3, 3, 1
    assert _pack_codes(codes2, 2).tolist() == [1 | 2 << 2 | 3 << 4 | 3 << 6, 1]
    # 8 bits: two's complement bytes.
    assert _pack_codes(torch.tensor([-1, 127, -127], dtype=torch.int8), 8).tolist() == [
        255, 127, 129
    ]


@pytest.mark.parametrize("bits", INT_BITS)
def test_payload_layout_scales_then_codes(bits):
    x = _matrix((6, 5), seed=3)
    q = quantize(x, bits)
    data = q.to_bytes()
    np.testing.assert_array_equal(np.frombuffer(data[:20], dtype="<f4"), q.scales)
    packed = torch.frombuffer(bytearray(data[20:]), dtype=torch.uint8)
    np.testing.assert_array_equal(_unpack_codes(packed, bits, 30).numpy().reshape(6, 5), q.codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", SHAPES + [(0, 4), (4, 0), (0, 0)])
def test_nbytes_and_bytes_round_trip(bits, shape):
    x = _matrix(shape, seed=11)
    q = quantize(x, bits)
    assert q.bits == bits and q.shape == shape
    assert q.nbytes == len(q.to_bytes()) == payload_nbytes(*shape, bits)
    data = q.to_bytes()
    for buffer in (data, bytearray(data), memoryview(data), np.frombuffer(data, dtype=np.uint8)):
        again = QuantizedMatrix.from_bytes(buffer, bits, shape)
        assert again == q and hash(again) == hash(q)
        assert torch.equal(dequantize(again), dequantize(q))


def test_payload_nbytes_formula():
    assert payload_nbytes(10, 3, 32) == 120
    assert payload_nbytes(10, 3, 16) == 60
    assert payload_nbytes(10, 3, 8) == 12 + 30
    assert payload_nbytes(10, 3, 4) == 12 + 15
    assert payload_nbytes(10, 3, 2) == 12 + 8  # 30 codes -> 7.5 bytes -> 8
    assert payload_nbytes(3, 3, "int4") == 12 + 5


def test_from_bytes_rejects_wrong_length_and_dtype():
    q = quantize(_matrix((4, 4), seed=0), 8)
    with pytest.raises(InvalidInputError, match="must be 32 bytes, got 31"):
        QuantizedMatrix.from_bytes(q.to_bytes()[:-1], 8, (4, 4))
    with pytest.raises(InvalidInputError, match="dtype uint8"):
        QuantizedMatrix.from_bytes(np.zeros(8, dtype=np.float32), 8, (4, 4))
    with pytest.raises(InvalidInputError, match="shape must be"):
        QuantizedMatrix.from_bytes(q.to_bytes(), 8, (4, 4, 1))


def test_quantized_matrix_is_frozen():
    q = quantize(_matrix((2, 2), seed=0), 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.bits = 8


def test_parse_bits():
    for name, bits in QUANTIZERS.items():
        assert parse_bits(name) == bits
        assert parse_bits(name.upper()) == bits
        assert parse_bits(bits) == bits
        assert parse_bits(str(bits)) == bits
    assert parse_bits(np.int64(8)) == 8


@pytest.mark.parametrize("bad", ["int3", "float8", "", 3, 64, True, 8.0, None])
def test_unknown_quantizer_lists_choices(bad):
    with pytest.raises(InvalidInputError) as info:
        parse_bits(bad)
    message = str(info.value)
    assert f"unknown quantizer {bad!r}" in message
    assert "fp32, fp16, int8, int4, int2" in message and "32, 16, 8, 4, 2" in message


def test_quantize_rejects_bad_input():
    with pytest.raises(InvalidInputError, match="2-D floating"):
        quantize(torch.zeros(3), 8)
    with pytest.raises(InvalidInputError, match="2-D floating"):
        quantize(torch.zeros(3, 3, dtype=torch.int32), 8)
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        quantize(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(InvalidInputError, match="overflow float16"):
        quantize(torch.tensor([[1e5]]), 16)
    with pytest.raises(InvalidInputError, match="unknown quantizer 'int5'"):
        quantize(torch.zeros(2, 2), "int5")


def test_other_float_dtypes_are_cast_to_float32():
    x = _matrix((5, 3), seed=2)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        assert torch.equal(dequantize(quantize(xd, 32)), xd.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", ALL_BITS)
def test_dequantize_on_cuda_matches_cpu(bits):
    x = _matrix((33, 7), seed=5)
    q = quantize(x, bits)
    y = dequantize(q, device="cuda")
    assert y.device.type == "cuda" and y.dtype == torch.float32
    assert torch.equal(y.cpu(), dequantize(q))
    # Quantizing on the GPU gives the same payload as on the CPU.
    assert quantize(x.cuda(), bits) == q


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("shape", [(7, 5), (1000, 33), (3, 1)])
def test_keep_columns_equals_quantizing_the_kept_columns(bits, shape):
    q = quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(1)), bits)
    for cols in range(shape[1] + 1):
        assert keep_columns(q, cols) == quantize(dequantize(q)[:, :cols].contiguous(), bits)
    with pytest.raises(InvalidInputError, match="cannot keep"):
        keep_columns(q, shape[1] + 1)
