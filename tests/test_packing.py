"""tvbase.bench.packing: codes of any width and coded positions, at their real size."""

import math

import numpy as np
import pytest

from tvbase.bench.packing import pack_positions, pack_uint, unpack_positions, unpack_uint


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8, 11, 16, 32])
def test_uint_round_trip_at_its_bit_width(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=1001)
    packed = pack_uint(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(1001 * bits / 8)
    np.testing.assert_array_equal(unpack_uint(packed, bits, 1001), codes)


def test_uint_refuses_codes_out_of_range():
    with pytest.raises(ValueError, match="out of range for 3 bits"):
        pack_uint(np.array([0, 8]), 3)
    with pytest.raises(ValueError, match="bits must be"):
        pack_uint(np.array([0]), 0)
    with pytest.raises(ValueError, match="bits must be"):
        pack_uint(np.array([0]), 33)


@pytest.mark.parametrize("n, density", [(0, 0.0), (1, 1.0), (1000, 0.0), (1000, 0.5), (1000, 1.0), (200_000, 0.01), (50_001, 0.03)])
def test_positions_round_trip(n, density):
    mask = np.random.default_rng(n).random(n) < density
    np.testing.assert_array_equal(unpack_positions(pack_positions(mask), n), mask)


def test_very_sparse_positions_need_wide_remainders():
    """A few entries of a 30522 x 384 embedding: gaps of millions, Rice remainders over 16 bits."""
    n = 30522 * 384
    mask = np.zeros(n, dtype=np.bool_)
    mask[[5, 4_000_000, n - 1]] = True
    packed = pack_positions(mask)
    assert packed.size < 32
    np.testing.assert_array_equal(unpack_positions(packed, n), mask)


def test_sparse_positions_cost_about_their_entropy():
    n, density = 400_000, 0.01
    mask = np.random.default_rng(0).random(n) < density
    p = mask.mean()
    entropy_bytes = n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8
    packed = pack_positions(mask)
    assert packed.size < 1.05 * entropy_bytes + 16  # Rice codes are within a few % of it
    assert packed.size < n / 8 / 10  # a tenth of a bitmap


def test_dense_positions_fall_back_to_a_bitmap():
    mask = np.random.default_rng(1).random(8000) < 0.5
    assert pack_positions(mask).size == 1 + 8000 // 8  # tag + bitmap
