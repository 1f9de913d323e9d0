"""The low-bit peers (tvbase.bench.lowbit_peers): Delta-CoMe, TVQ and RTVQ on tiny tensors.

Byte counts are checked against sums worked out by hand in the comments; the rebuilds against the
property that defines each method (grid values within half a step, error correction, rank); fits
are deterministic, compose is the sum of rebuilds, and bad parameters raise ValueError.
"""

import math

import numpy as np
import pytest
import torch

from tvbase.bench.lowbit_peers import (
    PAPER_ALLOCATION,
    RTVQ,
    TVQ,
    DeltaCoMe,
    _dequantize_groups,
    _quantize_groups,
    variants,
)


def _task_vectors(shapes, n_tasks, seed=0, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    return {
        f"task{t}": {name: scale * torch.randn(shape, generator=g) for name, shape in shapes.items()}
        for t in range(n_tasks)
    }


def _low_rank(m, n, singular_values, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(singular_values), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(singular_values), generator=g))
    return (u * torch.tensor(singular_values)) @ v.T


def _packed_equal(a, b):
    return a.packed_.keys() == b.packed_.keys() and all(
        a.packed_[k].dtype == b.packed_[k].dtype and a.packed_[k].tobytes() == b.packed_[k].tobytes() for k in a.packed_
    )


# --------------------------------------------------------------------------------------------
# Byte counts
# --------------------------------------------------------------------------------------------


def test_tvq_bytes():
    tvs = _task_vectors({"w": (5, 7), "b": (5,)}, n_tasks=3)
    c = TVQ(bits=3).fit(tvs)
    # per task: w 35 codes * 3 bits = 105 bits -> 14 bytes, + scale and zero (fp32) 8 = 22;
    #           b 5 * 3 = 15 bits -> 2 bytes, + 8 = 10; 32 per task, 3 tasks
    assert c.nbytes_ == 96


def test_rtvq_bytes_count_the_base_once():
    tvs = _task_vectors({"w": (5, 7), "b": (5,)}, n_tasks=3)
    c = RTVQ(base_bits=3, offset_bits=2).fit(tvs)
    # base (once): w 14 + 8 = 22, b 2 + 8 = 10 -> 32
    # offsets (per task): w 70 bits -> 9 + 8 = 17, b 10 bits -> 2 + 8 = 10 -> 27, times 3 = 81
    assert c.nbytes_ == 32 + 81
    assert sum(1 for k in c.packed_ if k[0] == "shared") == 2 * 3  # codes, scale, zero per tensor


def test_delta_come_bytes():
    tvs = _task_vectors({"w": (40, 24), "b": (40,)}, n_tasks=2)
    c = DeltaCoMe().fit(tvs)
    # m*n/(m+n) = 15; r = round(16 * 1/16 * 15 * 1002/2048) = round(7.34) = 7;
    # 8 bits: max(1, round(7*2/1002)) = 1; 3 bits: round(7*32/1002) = 0; 2 bits: the other 6
    assert c.tiers_ == {"w": ((8, 1), (2, 6))}
    # U8 (40, 1): codes 40, fp16 scales 40*2 = 80, 8-bit zeros 40 -> 160
    # V8 (1, 24): codes 24, scale 2, zero 1 -> 27
    # U2 (40, 6): codes 240*2/8 = 60, scales 80, zeros 40*2/8 = 10 -> 150
    # V2 (6, 24): codes 144*2/8 = 36, scales 12, zeros ceil(12/8) = 2 -> 50
    # S: 7 bf16 = 14; the bias: 40 bf16 = 80 -> 481 per task
    assert c.nbytes_ == 2 * 481


def test_delta_come_bytes_with_groups():
    tvs = _task_vectors({"w": (40, 24), "b": (40,)}, n_tasks=1)
    c = DeltaCoMe(group_size=16).fit(tvs)
    # U blocks have <= 6 columns: one group per row, as above (160 + 150)
    # V8 (1, 24): 2 groups -> codes 24, scales 4, zeros 2 -> 30
    # V2 (6, 24): 2 groups per row -> codes 36, scales 24, zeros ceil(12*2/8) = 3 -> 63
    assert c.nbytes_ == 160 + 30 + 150 + 63 + 14 + 80


def test_delta_come_reproduces_the_paper_allocation():
    # run.sh of the paper's code: 2 vectors at 8 bits, 32 at 3, 968 at 2 for a 4096 x 4096 matrix
    assert DeltaCoMe(budget=1 / 16)._tiers(4096, 4096) == PAPER_ALLOCATION
    # same proportions at a quarter of the budget: 1002 / 4 = 250.5 -> 250 (round half to even)
    assert DeltaCoMe(budget=1 / 64)._tiers(4096, 4096) == ((8, 1), (3, 8), (2, 241))
    # never more vectors than the matrix has
    assert sum(k for _, k in DeltaCoMe(budget=1.0)._tiers(50, 10)) == 10


# --------------------------------------------------------------------------------------------
# What the rebuilds are
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tvq_rebuild_is_on_its_grid(bits):
    g = torch.Generator().manual_seed(1)
    tvs = {f"t{i}": {"w": 0.02 * torch.rand(40, 25, generator=g) - 0.005} for i in range(2)}  # uniform: every level used
    c = TVQ(bits=bits).fit(tvs)
    for t in c.tasks_:
        x, x_hat = tvs[t]["w"], c.rebuild(t)["w"]
        scale = float(c.packed_[t, "w", "scale"][0])
        zero = float(c.packed_[t, "w", "zero"][0])
        q = x_hat.double() * scale + zero
        assert torch.allclose(q, q.round(), atol=1e-3)  # (q - zero) / scale, q an integer code
        assert q.round().min() >= 0 and q.round().max() <= 2**bits - 1
        assert len(torch.unique(q.round())) == 2**bits
        assert (x - x_hat).abs().max() <= 0.5 / scale * (1 + 1e-4)
        assert scale == pytest.approx((2**bits - 1) / float(x.max() - x.min()), rel=1e-6)  # min-max over the tensor


def test_tvq_constant_tensors_are_exact():
    tvs = {"a": {"zero": torch.zeros(3), "const": torch.full((4,), 0.25), "scalar": torch.tensor([-0.5])}}
    out = TVQ(bits=2).fit(tvs).rebuild("a")
    for name, x in tvs["a"].items():
        assert torch.allclose(out[name], x, atol=1e-7), name


def test_rtvq_error_correction():
    # a strong shared component, so that a 2-bit base leaves a large error the offsets must absorb
    g = torch.Generator().manual_seed(2)
    shared = torch.randn(30, 20, generator=g)
    tvs = {f"t{i}": {"w": shared + 0.1 * torch.randn(30, 20, generator=g)} for i in range(4)}
    c = RTVQ(base_bits=2, offset_bits=2).fit(tvs)
    scale_b = float(c.packed_["shared", "w", "base", "scale"][0])
    zero_b = float(c.packed_["shared", "w", "base", "zero"][0])
    base_hat = c._get(("shared", "w", "base"), 2, (30, 20))
    qb = base_hat.double() * scale_b + zero_b
    assert torch.allclose(qb, qb.round(), atol=1e-3)  # the base is on its own 2-bit grid
    mean = sum(tv["w"] for tv in tvs.values()) / 4
    assert (mean - base_hat).abs().max() <= 0.5 / scale_b * (1 + 1e-4)  # the base is the task mean
    base_error = (mean - base_hat).abs().max()
    for t, tv in tvs.items():
        scale_o = float(c.packed_[t, "w", "offset", "scale"][0])
        err = (tv["w"] - c.rebuild(t)["w"]).abs().max()
        # offsets taken against the quantized base: only the offset's rounding is left
        assert err <= 0.5 / scale_o * (1 + 1e-4)
        assert base_error > 0.5 / scale_o  # uncorrected, the base's error alone would break that bound


def test_delta_come_rebuild_rank_and_dense_tensors():
    tvs = _task_vectors({"w": (40, 24), "b": (40,)}, n_tasks=2, seed=3)
    c = DeltaCoMe().fit(tvs)  # 7 singular vectors kept (test_delta_come_bytes)
    for t, tv in tvs.items():
        out = c.rebuild(t)
        s = torch.linalg.svdvals(out["w"].double())
        assert s[6] / s[0] > 1e-3 and s[7] / s[0] < 1e-5  # rank 7, up to float32 rounding
        assert torch.equal(out["b"], tv["b"].to(torch.bfloat16).to(torch.float32))  # 1-D in bf16
        assert out["w"].dtype == torch.float32 and out["w"].shape == (40, 24)


def test_delta_come_bits_set_the_error():
    # an exactly rank-3 matrix, all 3 singular vectors kept: the error is the quantization's
    tvs = {"a": {"w": _low_rank(64, 48, [3.0, 2.0, 1.0])}}
    errors = {}
    for bits in (8, 2):
        c = DeltaCoMe(budget=3 * bits / 16 * (64 + 48) / (64 * 48), allocation=((bits, 1),)).fit(tvs)
        assert c.tiers_["w"] == ((bits, 3),)
        x = tvs["a"]["w"]
        errors[bits] = float((c.rebuild("a")["w"] - x).norm() / x.norm())
    assert errors[8] < 0.01  # 8-bit singular vectors: within a percent
    assert errors[2] > 20 * errors[8]  # a 2-bit code is far coarser (about 85 times the step)


def test_delta_come_tiers_follow_the_singular_values():
    # singular values 8 > 4 > 2 > 1: with 1 vector at 8 bits and 3 at 2 bits, the largest
    # direction is the precise one; its rank-1 part is rebuilt within the 8-bit error
    x = _low_rank(60, 40, [8.0, 4.0, 2.0, 1.0], seed=4)
    c = DeltaCoMe(budget=(8 + 3 * 2) / 16 * 100 / 2400, allocation=((8, 1), (2, 3))).fit({"a": {"w": x}})
    assert c.tiers_["w"] == ((8, 1), (2, 3))
    u8 = c._block("a", "w", "U", 8, 60, 1)  # (60, 1)
    u_true = torch.linalg.svd(x)[0][:, :1]
    assert abs(float((u8 * u_true).sum())) > 0.999  # the 8-bit tier holds the top singular vector


def test_group_quantizer_grid():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 10, generator=g)
    x[0] = 0.0  # an all-zero row: GPTQ's range [-1, 1], rebuilt as zeros
    x[1] = torch.rand(10, generator=g)  # all positive: the range still starts at 0
    codes, scales, zeros = _quantize_groups(x, 3, group_size=4)
    assert codes.shape == (7, 10) and scales.shape == (7, 3) and zeros.shape == (7, 3)
    assert codes.min() >= 0 and codes.max() <= 7 and zeros.min() >= 0 and zeros.max() <= 7
    x_hat = _dequantize_groups(codes, scales, zeros, group_size=4)
    step = torch.from_numpy(scales.astype(np.float32)).repeat_interleave(4, dim=1)[:, :10]
    # half a step, up to the fp16 rounding of the scale (2**-11 relative, times 7 steps at most)
    assert torch.all((x - x_hat).abs() <= step / 2 * 1.02)
    assert torch.equal(x_hat[0], torch.zeros(10))
    assert torch.all(zeros[1] == 0)


def test_delta_come_rebuilds_from_packed_only():
    tvs = _task_vectors({"w": (40, 24)}, n_tasks=1)
    c = DeltaCoMe().fit(tvs)
    assert c.rebuild("task0")["w"].abs().max() > 0
    c.packed_["task0", "w", "S"] = np.zeros_like(c.packed_["task0", "w", "S"])  # bf16 zeros
    assert torch.equal(c.rebuild("task0")["w"], torch.zeros(40, 24))


# --------------------------------------------------------------------------------------------
# Determinism, compose, conv kernels, parameters
# --------------------------------------------------------------------------------------------

SHAPES = {"conv": (6, 3, 3, 3), "fc": (20, 16), "bias": (20,), "row": (1, 9)}
MAKERS = [lambda: DeltaCoMe(), lambda: DeltaCoMe(budget=1 / 256), lambda: TVQ(bits=3), lambda: RTVQ()]


@pytest.mark.parametrize("make", MAKERS)
def test_two_fits_give_the_same_bytes(make):
    tvs = _task_vectors(SHAPES, n_tasks=3, seed=6)
    a, b = make().fit(tvs), make().fit(tvs)
    assert _packed_equal(a, b)
    # and different task vectors give different bytes
    assert not _packed_equal(a, make().fit(_task_vectors(SHAPES, n_tasks=3, seed=7)))


@pytest.mark.parametrize("make", MAKERS)
def test_compose_is_the_sum_of_rebuilds(make):
    tvs = _task_vectors(SHAPES, n_tasks=3, seed=8)
    c = make().fit(tvs)
    alphas = {"task0": 0.3, "task2": -1.2}
    out = c.compose(alphas)
    for name, shape in SHAPES.items():
        expected = sum(a * c.rebuild(t)[name] for t, a in alphas.items())
        assert out[name].shape == shape
        assert torch.allclose(out[name], expected, atol=1e-7)
    with pytest.raises(KeyError, match="task9"):
        c.rebuild("task9")


def test_delta_come_flattens_conv_kernels():
    tvs = _task_vectors(SHAPES, n_tasks=1, seed=9)
    c = DeltaCoMe(budget=1.0, allocation=((8, 1),)).fit(tvs)  # full rank at 8 bits
    assert c.tiers_["conv"] == ((8, 6),)  # (6, 27): 6 singular vectors
    assert "row" not in c.tiers_  # a (1, 9) tensor is stored densely
    out = c.rebuild("task0")
    assert out["conv"].shape == (6, 3, 3, 3)
    rel = (out["conv"] - tvs["task0"]["conv"]).norm() / tvs["task0"]["conv"].norm()
    assert rel < 0.02


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TVQ(bits=0), "bits must be an integer from 1 to 16, got 0"),
        (lambda: TVQ(bits=2.5), "got 2.5"),
        (lambda: RTVQ(base_bits=17), "base_bits must be an integer"),
        (lambda: RTVQ(offset_bits=0), "offset_bits must be an integer"),
        (lambda: DeltaCoMe(budget=0), r"budget must be a fraction of the fp16 size in \(0, 1\], got 0"),
        (lambda: DeltaCoMe(budget=1.5), "got 1.5"),
        (lambda: DeltaCoMe(group_size=0), "group_size must be a positive integer, got 0"),
        (lambda: DeltaCoMe(allocation=((2, 10), (8, 1))), "distinct and decreasing"),
        (lambda: DeltaCoMe(allocation=((8, 0),)), "counts must be positive integers, got 0"),
        (lambda: DeltaCoMe(allocation=()), "at least one"),
    ],
)
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make().fit(_task_vectors({"w": (4, 4)}, n_tasks=1))


def test_empty_fit_is_an_error():
    with pytest.raises(ValueError, match="at least one task vector"):
        TVQ().fit({})


# --------------------------------------------------------------------------------------------
# The benchmark's settings
# --------------------------------------------------------------------------------------------


def test_variants():
    vs = variants(5)
    params = [(type(v).__name__, v.params()) for v in vs]
    assert ("DeltaCoMe", DeltaCoMe().params()) in params  # the papers' defaults are there
    assert ("TVQ", {"bits": 3}) in params
    assert ("RTVQ", {"base_bits": 3, "offset_bits": 2}) in params
    assert len({v.label for v in vs}) == len(vs)
    # in increasing storage, measured on a small layout of 5 tasks
    tvs = _task_vectors({"emb": (400, 160), "fc": (160, 160), "bias": (160,)}, n_tasks=5, seed=10)
    sizes = [v.fit(tvs).nbytes_ for v in vs]
    assert sizes == sorted(sizes)
    raw = 5 * 4 * (400 * 160 + 160 * 160 + 160)
    assert sizes[0] / raw < 0.01 and 0.02 < sizes[-1] / raw < 0.14  # Delta-CoMe below 1%, TVQ INT4 ~12.5%
    with pytest.raises(ValueError, match="n_tasks must be a positive integer"):
        variants(0)


def test_labels_and_families():
    assert DeltaCoMe().label == "Delta-CoMe (8/3/2-bit SVD, 1/16 of fp16)"
    assert TVQ(bits=2).label.startswith("TVQ INT2")
    assert RTVQ().label.startswith("RTVQ B3O2")
    assert {DeltaCoMe().series, TVQ().series, RTVQ().series} == {"Delta-CoMe", "TVQ", "RTVQ"}
    assert all("2025" in c.reference or "2024" in c.reference for c in (DeltaCoMe(), TVQ(), RTVQ()))
    assert math.isclose(DeltaCoMe(budget=0.3).budget, 0.3) and "0.3 of fp16" in DeltaCoMe(budget=0.3).label
