"""tvbase.bench.sparse_peers: DARE, UltraDelta and T-Switch on tiny random task vectors.

Byte counts are derived by hand for small tensors (at most 56 entries, where a position
bitmap, ``1 + ceil(n / 8)`` bytes, is always smaller than coded gaps); the rebuilds are
checked against each method's defining rule computed here from the inputs.
"""

import math

import numpy as np
import pytest
import torch

from tvbase.bench.baselines import Compressor
from tvbase.bench.packing import unpack_positions
from tvbase.bench.sparse_peers import Dare, TSwitch, UltraDelta, _allocate_rates, _ultradelta_scope, variants


def _random_tasks(shapes, n_tasks=2, seed=0, scales=None):
    g = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * n_tasks
    return {f"t{i}": {n: scales[i] * torch.randn(s, generator=g) for n, s in shapes.items()} for i in range(n_tasks)}


def _mask(method, task, name):
    return torch.from_numpy(unpack_positions(method.packed_[task, name, "pos"], math.prod(method.shapes_[name])))


def _same_bytes(a, b):
    return a.packed_.keys() == b.packed_.keys() and all(np.array_equal(a.packed_[k], b.packed_[k]) for k in a.packed_)


def _check_compose(method, tvs):
    method.fit(tvs)
    alphas = {t: 0.5 + i for i, t in enumerate(tvs)}
    composed = method.compose(alphas)
    for name in method.shapes_:
        expected = sum(a * method.rebuild(t)[name] for t, a in alphas.items())
        torch.testing.assert_close(composed[name], expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------


def test_dare_bytes_by_hand():
    # p = 0: every entry kept; magnitudes in [1, 2] so no int8 code rounds to 0
    g = torch.Generator().manual_seed(1)
    def entries(*shape):
        return (1 + torch.rand(shape, generator=g)) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    tvs = {t: {"w": entries(6, 8), "b": entries(5)} for t in ("a", "b")}
    m = Dare(drop_rate=0.0).fit(tvs)
    # per task: w = bitmap 1 + 6, 48 codes, scale 4; b = bitmap 1 + 1, 5 codes, scale 4
    assert m.nbytes_ == 2 * ((7 + 48 + 4) + (2 + 5 + 4))


def test_dare_drops_at_rate_and_keeps_rescaled_int8_values():
    p = 0.9
    tvs = _random_tasks({"w": (200, 200), "b": (300,)}, n_tasks=1)
    m = Dare(drop_rate=p, seed=3).fit(tvs)
    rebuilt = m.rebuild("t0")
    for name, x in tvs["t0"].items():
        x, out, mask = x.reshape(-1), rebuilt[name].reshape(-1), _mask(m, "t0", name)
        v = x[mask] * (1.0 / (1.0 - p))  # kept, rescaled
        scale = v.abs().max() / 127
        assert torch.equal(out[mask], torch.round(v / scale) * scale)
        assert torch.all(out[~mask] == 0)
        assert torch.all(out[mask] != 0)
    density = _mask(m, "t0", "w").float().mean().item()
    # Bernoulli(0.1) over 40000 entries (sd 0.0015), less the ~1% of kept codes that round to 0
    assert abs(density - 0.1) < 0.008, density
    # the big tensor is sparse enough for coded positions: smaller than its bitmap
    pos = m.packed_["t0", "w", "pos"]
    assert pos.nbytes < 1 + math.ceil(40000 / 8)
    k = int(_mask(m, "t0", "w").sum())
    assert m.packed_["t0", "w", "q"].nbytes + m.packed_["t0", "w", "scale"].nbytes == k + 4


def test_dare_is_deterministic_and_seeded():
    tvs = _random_tasks({"w": (40, 30), "b": (30,)})
    a, b = Dare(0.9, seed=0).fit(tvs), Dare(0.9, seed=0).fit(tvs)
    assert _same_bytes(a, b)
    c = Dare(0.9, seed=1).fit(tvs)
    assert not torch.equal(_mask(a, "t0", "w"), _mask(c, "t0", "w"))
    # tasks and tensors draw independent masks
    assert not torch.equal(_mask(a, "t0", "w"), _mask(a, "t1", "w"))


def test_dare_compose_is_sum_of_rebuilds():
    _check_compose(Dare(0.8), _random_tasks({"w": (20, 10), "b": (10,)}, n_tasks=3))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dare_bad_rate(p):
    with pytest.raises(ValueError, match="drop_rate"):
        Dare(drop_rate=p).fit(_random_tasks({"w": (4, 4)}))


# --------------------------------------------------------------------------------------------
# UltraDelta
# --------------------------------------------------------------------------------------------


def test_ultradelta_bytes_by_hand():
    # one block weight whose 48 entries are the 16 levels c - 7.5 (c = 0..15) three times each:
    # 4-bit min-max codes are c; one tensor in scope -> its rate is the target 0.5; each level
    # drops round(3 * 0.5) = 2 of 3 -> 16 kept. The bias and the head are out of scope.
    g = torch.Generator().manual_seed(0)
    levels = torch.arange(16, dtype=torch.float32).repeat(3) - 7.5
    def task():
        return {"blocks.0.fc1.weight": levels[torch.randperm(48, generator=g)].reshape(6, 8),
                "blocks.0.fc1.bias": torch.randn(6, generator=g), "head.weight": torch.randn(3, 8, generator=g)}
    tvs = {"a": task(), "b": task()}
    m = UltraDelta(mask_rate=0.5, bits=4).fit(tvs)
    assert m.scope_ == ["blocks.0.fc1.weight"]
    # per task: bitmap 1 + 6, 16 codes x 4 bits = 8, range 2 x 4, task factor 4
    assert m.nbytes_ == 2 * (7 + 8 + 8 + 4)
    for t in tvs:
        rebuilt = m.rebuild(t)
        assert torch.all(rebuilt["blocks.0.fc1.bias"] == 0) and torch.all(rebuilt["head.weight"] == 0)
        kept = rebuilt["blocks.0.fc1.weight"][rebuilt["blocks.0.fc1.weight"] != 0] / m.factors_[t]
        torch.testing.assert_close(kept.sort().values, levels[:16], rtol=0, atol=1e-5)  # one of each level


def test_ultradelta_allocation_by_hand():
    rates = _allocate_rates({"a": 10, "b": 10, "c": 10}, {"a": 3.0, "b": 1.0, "c": 2.0}, target=0.9, step=0.05)
    # by std: b (low third) 0.95, c (middle) 0.9, a gets (0.9*30 - 0.9*10 - 0.95*10) / 10
    assert rates == pytest.approx({"b": 0.95, "c": 0.9, "a": 0.85})
    assert _allocate_rates({"a": 5}, {"a": 1.0}, target=0.97, step=0.01) == pytest.approx({"a": 0.97})


def test_ultradelta_scope():
    shapes = {"blocks.0.attn.qkv.weight": (12, 4), "blocks.0.norm1.weight": (4,), "pos_embed": (5, 4),
              "patch_embed.weight": (4, 1, 2, 2), "head.weight": (3, 4), "encoder.layer.11.output.dense.weight": (4, 8)}
    assert _ultradelta_scope(shapes, "blocks") == ["blocks.0.attn.qkv.weight", "encoder.layer.11.output.dense.weight"]
    assert _ultradelta_scope(shapes, "matrices") == [n for n, s in shapes.items() if len(s) >= 2]
    assert _ultradelta_scope(shapes, "all") == list(shapes)
    cnn = {"conv1.weight": (4, 1, 3, 3), "conv1.bias": (4,), "fc.weight": (3, 8)}  # no numbered blocks
    assert _ultradelta_scope(cnn, "blocks") == ["conv1.weight", "fc.weight"]


def test_ultradelta_rebuild_follows_allocation_levels_and_rescaling():
    target, step = 0.9, 0.01
    shapes = {f"blocks.{i}.fc.weight": (60, 50) for i in range(6)}
    shapes["blocks.0.fc.bias"] = (50,)
    g = torch.Generator().manual_seed(5)
    tvs = {"t0": {n: (0.01 * (1 + i)) * torch.randn(s, generator=g) for i, (n, s) in enumerate(shapes.items())}}
    m = UltraDelta(mask_rate=target, step_size=step, trace_norm=False).fit(tvs)
    assert "blocks.0.fc.bias" not in m.scope_
    factor = m.factors_["t0"]
    assert factor == pytest.approx(1 / (1 - target), rel=1e-6)  # no trace norm: the global rescale only
    rates = m.rates_["t0"]
    by_std = sorted(m.scope_, key=lambda n: tvs["t0"][n].std())
    assert [rates[n] for n in by_std[:2]] == pytest.approx([target + step] * 2)  # low-variance third
    assert [rates[n] for n in by_std[2:4]] == pytest.approx([target] * 2)
    assert [rates[n] for n in by_std[4:]] == pytest.approx([target - step] * 2)  # balances the mean
    rebuilt, kept_total = m.rebuild("t0"), 0
    for name in m.scope_:
        x = tvs["t0"][name].reshape(-1)
        lo, hi = x.min(), x.max()
        codes = torch.round((x - lo) / (hi - lo) * 15)
        mask = _mask(m, "t0", name)
        # every level drops exactly round(n_c * rate) of its n_c entries
        expected_kept = sum(n - round(n * rates[name]) for n in torch.bincount(codes.long(), minlength=16).tolist())
        assert int(mask.sum()) == expected_kept
        kept_total += expected_kept
        values = (codes / 15 * (hi - lo) + lo) * factor
        out = rebuilt[name].reshape(-1)
        torch.testing.assert_close(out[mask], values[mask], rtol=1e-6, atol=0)
        assert torch.all(out[~mask] == 0)
    assert torch.all(rebuilt["blocks.0.fc.bias"] == 0)
    assert abs(kept_total / (6 * 3000) - (1 - target)) < 0.002


def test_ultradelta_trace_norm_equalizes_tasks():
    shapes = {"blocks.0.fc1.weight": (40, 30), "blocks.0.fc2.weight": (30, 40)}
    tvs = _random_tasks(shapes, n_tasks=3, scales=[1.0, 3.0, 0.5])
    m = UltraDelta(mask_rate=0.9).fit(tvs)
    nuclear = [sum(float(torch.linalg.svdvals(m.rebuild(t)[n]).sum()) for n in shapes) for t in tvs]
    assert nuclear == pytest.approx([nuclear[0]] * 3, rel=1e-4)  # lambda_t = min N / N_t
    assert max(m.factors_.values()) == pytest.approx(1 / (1 - 0.9), rel=1e-6)  # the smallest task: lambda 1
    assert m.factors_["t1"] < m.factors_["t0"] < m.factors_["t2"]


def test_ultradelta_is_deterministic_and_seeded():
    tvs = _random_tasks({"blocks.0.w.weight": (40, 30), "blocks.1.w.weight": (30, 30)})
    a, b = UltraDelta(0.9, seed=0).fit(tvs), UltraDelta(0.9, seed=0).fit(tvs)
    assert _same_bytes(a, b)
    c = UltraDelta(0.9, seed=1).fit(tvs)
    assert not torch.equal(_mask(a, "t0", "blocks.0.w.weight"), _mask(c, "t0", "blocks.0.w.weight"))


def test_ultradelta_compose_is_sum_of_rebuilds():
    _check_compose(UltraDelta(0.8, scope="all"), _random_tasks({"blocks.0.w.weight": (20, 10), "b": (10,)}, 3))


@pytest.mark.parametrize("kwargs, match", [
    ({"mask_rate": 0.0}, "mask_rate"), ({"mask_rate": 1.0}, "mask_rate"),
    ({"mask_rate": 0.995, "step_size": 0.01}, "step_size"), ({"bits": 0}, "bits"), ({"bits": 2.5}, "bits"),
    ({"scope": "layers"}, "'blocks', 'matrices', 'all'"),
])
def test_ultradelta_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UltraDelta(**kwargs).fit(_random_tasks({"blocks.0.w.weight": (4, 4)}))


# --------------------------------------------------------------------------------------------
# T-Switch
# --------------------------------------------------------------------------------------------


def test_tswitch_bytes_by_hand():
    g = torch.Generator().manual_seed(2)
    def task():
        mags = 1 + torch.rand(48, generator=g)
        w = torch.cat([mags[:24], -mags[24:]])[torch.randperm(48, generator=g)].reshape(6, 8)
        b = torch.tensor([0.3, 0.2, 0.1, -0.4, -0.5])
        return {"w": w, "b": b, "s": torch.tensor(0.7)}
    m = TSwitch(drop_ratio=0.6).fit({"a": task(), "b": task()})
    # w: int(24 * 0.4) = 9 of each sign -> 18 kept: bitmap 1 + 6, 18 sign bits = 3, scale 4
    # b: int(3 * 0.4) = 1 positive; int(2 * 0.4) = 0 negatives -> all 2 kept (the code's rule):
    #    bitmap 1 + 1, 3 sign bits = 1, scale 4;  s: a 0-d tensor, float32 = 4
    assert m.nbytes_ == 2 * ((7 + 3 + 4) + (2 + 1 + 4) + 4)
    rebuilt = m.rebuild("a")
    assert torch.equal(rebuilt["b"] != 0, torch.tensor([True, False, False, True, True]))
    assert rebuilt["s"].item() == pytest.approx(0.7)


def test_tswitch_keeps_largest_of_each_sign_as_scaled_signs():
    drop = 0.7
    tvs = _random_tasks({"w": (50, 40), "b": (200,)}, n_tasks=1)
    m = TSwitch(drop_ratio=drop).fit(tvs)
    rebuilt = m.rebuild("t0")
    for name, x in tvs["t0"].items():
        x = x.reshape(-1)
        expected = torch.zeros(x.numel(), dtype=torch.bool)
        for side in (x > 0, x < 0):
            idx = torch.nonzero(side).squeeze(1)
            k = int(idx.numel() * (1 - drop))
            expected[idx[x[idx].abs().argsort(descending=True)[:k]]] = True
        mask = _mask(m, "t0", name)
        assert torch.equal(mask, expected)
        scale = x[mask].pow(2).mean().sqrt()
        out = rebuilt[name].reshape(-1)
        torch.testing.assert_close(out[mask], torch.sign(x[mask]) * scale, rtol=1e-6, atol=0)
        assert torch.all(out[~mask] == 0)
        assert abs(mask.float().mean().item() - (1 - drop)) < 0.01


def test_tswitch_is_deterministic():
    tvs = _random_tasks({"w": (40, 30), "b": (30,)})
    assert _same_bytes(TSwitch(0.9).fit(tvs), TSwitch(0.9).fit(tvs))


def test_tswitch_compose_is_sum_of_rebuilds():
    _check_compose(TSwitch(0.8), _random_tasks({"w": (20, 10), "b": (10,)}, n_tasks=3))


@pytest.mark.parametrize("d", [1.0, -0.2])
def test_tswitch_bad_ratio(d):
    with pytest.raises(ValueError, match="drop_ratio"):
        TSwitch(drop_ratio=d).fit(_random_tasks({"w": (4, 4)}))


# --------------------------------------------------------------------------------------------
# The benchmark's settings
# --------------------------------------------------------------------------------------------


def test_variants_include_paper_defaults_and_grow_in_storage():
    methods = variants(4)
    assert all(isinstance(m, Compressor) for m in methods)
    assert len({m.label for m in methods}) == len(methods)
    params = [(type(m), m.params()) for m in methods]
    assert (Dare, Dare().params()) in params
    assert (UltraDelta, UltraDelta().params()) in params
    assert (TSwitch, TSwitch().params()) in params
    tvs = _random_tasks({f"blocks.{i}.fc.weight": (64, 48) for i in range(3)} | {"head.bias": (48,)}, n_tasks=2)
    for family in ("DARE", "UltraDelta", "T-Switch"):
        sizes = [m.fit(tvs).nbytes_ for m in methods if m.family == family]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), (family, sizes)
