"""Group quantization codecs: error bounds, byte accounting, bit packing, KIVI layouts and segment parts."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attentionpack.parts.quant as Q
from attentionpack.codecs import RankRule, factorize
from attentionpack.parts import LowRankPart, QuantizedLowRankPart
from attentionpack.parts.quant import (
    Quantized,
    QuantizedPart,
    dequantize,
    error_bound,
    pack,
    quantize,
    quantize_keys,
    quantize_values,
    unpack,
)

FAST = settings(max_examples=60, deadline=None)
BITS = st.sampled_from([8, 4, 2])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@st.composite
def tensor_case(draw):
    """A float32 tensor (1-4 dims, odd sizes welcome), an axis, a group size and a bit width."""
    shape = tuple(draw(st.lists(st.integers(1, 13), min_size=1, max_size=4)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    group = draw(st.integers(1, 40))
    bits = draw(BITS)
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    offset = draw(st.sampled_from([0.0, 5.0, -1234.5]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * magnitude + offset
    return x, axis, group, bits


def group_ranges(x: torch.Tensor, group: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-element (min, max) of its group, computed group by group."""
    lo, hi = torch.empty_like(x), torch.empty_like(x)
    length = x.shape[axis]
    g = min(group, length)
    for start in range(0, length, g):
        n = min(g, length - start)
        part = x.narrow(axis, start, n)
        lo.narrow(axis, start, n).copy_(part.amin(axis, keepdim=True).expand_as(part))
        hi.narrow(axis, start, n).copy_(part.amax(axis, keepdim=True).expand_as(part))
    return lo, hi


# ---- round trip ------------------------------------------------------------------------------------------------
@FAST
@given(tensor_case())
def test_roundtrip_error_bound(case):
    x, axis, group, bits = case
    q = quantize(x, bits, group, axis)
    y = dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = (y - x).abs()
    tol = 1e-6 * (x.abs().max().item() + 1e-30)  # float32 arithmetic
    # stored (fp16, rounded outward) scale: every element within half a step
    assert (err <= error_bound(q) + tol).all()
    # in terms of the exact group range: scale/2 plus the fp16 rounding of scale and min
    lo, hi = group_ranges(x, group, axis)
    levels = 2**bits - 1
    exact_scale = (hi - lo) / levels
    fp16_rounding = 2**-10 * (exact_scale + lo.abs()) + 6e-8  # one fp16 ulp each (6e-8: smallest subnormal)
    assert (err <= exact_scale / 2 + fp16_rounding + tol).all()


@FAST
@given(tensor_case())
def test_params_rounded_outward(case):
    x, axis, group, bits = case
    q = quantize(x, bits, group, axis)
    assert q.scales.dtype == torch.float16 and q.mins.dtype == torch.float16
    xt = x.movedim(axis, -1)
    g = q.group_size
    pad = -xt.shape[-1] % g
    xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], pad)], -1).reshape(*xt.shape[:-1], -1, g)
    lo, hi = xt.amin(-1), xt.amax(-1)
    assert (q.mins.float() <= lo).all()
    top = q.mins.float() + (2**bits - 1) * q.scales.float()
    assert (top >= hi - 1e-6 * x.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_kept(dtype):
    x = torch.randn(2, 3, 37, 16).to(dtype)
    for bits in (8, 4, 2):
        y = dequantize(quantize(x, bits, 32, 2))
        assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert rel(dequantize(quantize(x, 8, 32, 2)), x) < 0.01


def test_group_larger_than_length_is_cut():
    x = torch.randn(2, 5, 7)
    q = quantize(x, 4, 32, axis=2)
    assert q.group_size == 7 and q.scales.shape == (2, 5, 1) and q.codes.shape == (2, 5, 4)


# ---- bytes -----------------------------------------------------------------------------------------------------
@FAST
@given(tensor_case())
def test_nbytes_accounting(case):
    x, axis, group, bits = case
    q = quantize(x, bits, group, axis)
    rest = math.prod(x.shape) // x.shape[axis]
    g = min(group, x.shape[axis])
    n_groups = -(-x.shape[axis] // g)
    codes = rest * math.ceil(n_groups * g * bits / 8)  # padding to whole groups (and bytes) counted
    params = 2 * rest * n_groups * 2  # scale + min, fp16
    assert q.nbytes() == storage_bytes(q.tensors()) == codes + params
    assert q.codes.dtype == torch.uint8


def test_bytes_per_element_kivi():
    x = torch.randn(1, 3, 256, 64)
    for fn in (quantize_keys, quantize_values):
        for bits in (8, 4, 2):
            q = fn(x, bits, 32)
            assert q.nbytes() / x.numel() == pytest.approx(bits / 8 + 4 / 32)  # codes + 2 fp16 per 32 elements


# ---- bit packing -----------------------------------------------------------------------------------------------
@FAST
@given(BITS, st.lists(st.integers(1, 5), max_size=2), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_pack_roundtrip(bits, rest, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*rest, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*rest, math.ceil(n * bits / 8))
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_layout_planar_low_bits_first():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    # 4-bit: byte i holds code i (low nibble) and code i + 2 (high nibble)
    assert pack(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 4).tolist() == [0x31, 0x42]
    # 2-bit, 5 codes padded to 8 = 4 planes of 2: byte 0 holds codes 0, 2, 4, 6; byte 1 codes 1, 3, 5, 7
    assert pack(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [0b00111101, 0b00000010]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_unpack_to_float_equals_codes(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 37), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, 37, dtype=torch.float32), codes.float())


# ---- constant input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 1.5, -3.0, 0.1, -1234.567, 1e-3, 1e-9])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_constant_input(value, bits):
    x = torch.full((2, 3, 45, 8), value)
    q = quantize(x, bits, 16, axis=2)
    y = dequantize(q)
    assert torch.isfinite(y).all()
    assert ((y - x).abs() <= error_bound(q) + 1e-7 * abs(value)).all()
    assert ((y - x).abs() <= 2**-10 * abs(value) + 6e-8).all()
    if torch.tensor(value).half().float().item() == torch.tensor(value).item():  # exact in fp16
        assert (q.scales == 0).all() and torch.equal(y, x)


def test_constant_groups_next_to_varying_ones():
    x = torch.randn(1, 2, 64, 4)
    x[..., :32, :] = 2.0  # first token group of every channel constant
    q = quantize_keys(x, 2, 32)
    y = dequantize(q)
    assert (q.scales[..., 0] == 0).all() and torch.equal(y[..., :32, :], x[..., :32, :])
    assert ((y - x).abs() <= error_bound(q) + 1e-6).all()


# ---- KIVI layouts ----------------------------------------------------------------------------------------------
def test_kivi_shapes():
    b, h, t, d = 2, 3, 70, 64
    x = torch.randn(b, h, t, d)
    k = quantize_keys(x, 4, 32)
    assert k.axis == 2 and k.codes.shape == (b, h, d, 96 // 2) and k.scales.shape == (b, h, d, 3)
    v = quantize_values(x, 2, 32)
    assert v.axis == 3 and v.codes.shape == (b, h, t, 64 // 4) and v.scales.shape == (b, h, t, 2)
    for q in (k, v):
        assert all(t_.shape[0] == b for t_ in q.tensors())
        assert dequantize(q).shape == x.shape


def test_keys_per_channel_values_per_token():
    x = torch.randn(1, 2, 64, 16)
    x2 = x.clone()
    x2[:, :, :, 5] *= 100  # an outlier channel
    k1, k2 = quantize_keys(x, 4, 32), quantize_keys(x2, 4, 32)
    others = [c for c in range(16) if c != 5]
    assert torch.equal(k1.scales[:, :, others], k2.scales[:, :, others])  # channels have their own scales
    x3 = x.clone()
    x3[:, :, 7, :] *= 100  # an outlier token
    v1, v3 = quantize_values(x, 4, 8), quantize_values(x3, 4, 8)
    others = [t for t in range(64) if t != 7]
    assert torch.equal(v1.scales[:, :, others], v3.scales[:, :, others])  # tokens have their own scales


def test_error_ordering_gaussian():
    x = torch.randn(2, 3, 256, 64, generator=torch.Generator().manual_seed(0))
    for fn in (quantize_keys, quantize_values):
        errs = [rel(dequantize(fn(x, bits, 32)), x) for bits in (8, 4, 2)]
        assert errs[0] < errs[1] < errs[2]
        assert errs[0] < 0.006 and errs[1] < 0.09 and errs[2] < 0.45


def test_fp16_params(monkeypatch):
    """fp16 scales/mins cost <1% relative error over fp32 ones (half the parameter bytes)."""
    x = torch.randn(2, 3, 256, 64, generator=torch.Generator().manual_seed(1))
    half = [rel(dequantize(quantize_keys(x, bits, 32)), x) for bits in (8, 4, 2)]
    monkeypatch.setattr(Q, "PARAM_DTYPE", torch.float32)
    full = [rel(dequantize(quantize_keys(x, bits, 32)), x) for bits in (8, 4, 2)]
    assert quantize_keys(x, 4, 32).scales.dtype == torch.float32
    for h, f in zip(half, full):
        assert h <= f * 1.01


# ---- parts -----------------------------------------------------------------------------------------------------
def make_rope(d: int):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))

    def rope(start, end, positions):
        ang = positions.float().unsqueeze(-1) * inv  # (B, T, d/2)
        ang = torch.cat([ang, ang], -1)
        return ang.cos(), ang.sin()

    return rope


@functools.cache
def lowrank_factors(b=2, t=48, h=2, d=16, seed=0):
    """Factors of a block with a decaying spectrum and a large mean (cached: tests never modify them)."""
    g = torch.Generator().manual_seed(seed)
    dim = h * d
    u = torch.randn(b, t, dim, generator=g) * torch.logspace(0, -3, dim)
    blocks = u @ torch.linalg.qr(torch.randn(dim, dim, generator=g))[0] + 3.0 * torch.randn(dim, generator=g)
    factors, ranks, _ = factorize(blocks, RankRule(energy=0.999))
    return factors, ranks


def parts(b=3, h=2, t=40, d=16):
    x = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(2))
    factors, ranks = lowrank_factors(b, t, h, d)
    pos = (torch.arange(t, dtype=torch.int32) + 7).expand(b, t).contiguous()
    return [
        QuantizedPart.keys(x, 4, 32),
        QuantizedPart.values(x, 2, 32),
        QuantizedLowRankPart.from_factors(factors, h, pos, tuple(ranks), coeff_bits=4),
        QuantizedLowRankPart.from_factors(factors, h, None, tuple(ranks), coeff_bits=8, basis_bits=None),
    ]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize(
    "fn",
    [
        lambda t: t.index_select(0, torch.tensor([2, 0, 0])),
        lambda t: t.repeat_interleave(2, dim=0),
        lambda t: t[torch.tensor([1, 2]), ...],
    ],
)
def test_map_batch(index, fn):
    part = parts()[index]
    rope = make_rope(16)
    before = part.materialize(7, 47, rope)
    part.map_batch(fn)
    after = part.materialize(7, 47, rope)
    torch.testing.assert_close(after, fn(before), rtol=1e-6, atol=1e-6)
    assert all(t.shape[0] == after.shape[0] for t in part.tensors())
    assert storage_bytes(part.tensors()) == sum(t.numel() * t.element_size() for t in part.tensors())


def test_quantized_part_keys_need_no_rope():
    x = torch.randn(1, 2, 40, 16)
    part = QuantizedPart.keys(x, 8, 32)
    y = part.materialize(0, 40, rope=None)  # post-RoPE storage: the callback is never used
    assert rel(y, x) < 0.01
    assert part.describe() == {"codec": "quant", "bits": 8, "group": 32, "layout": "per_channel"}
    assert QuantizedPart.values(x, 2, 16).describe()["layout"] == "per_token"


@pytest.mark.parametrize(
    "coeff_bits,basis_bits,tol", [(8, 8, 0.01), (8, 16, 0.006), (8, None, 0.006), (4, 8, 0.06), (4, None, 0.06)]
)
@pytest.mark.parametrize("keys", [True, False])
def test_quantized_lowrank_matches_lowrank(coeff_bits, basis_bits, tol, keys):
    b, t, h, d = 2, 48, 2, 16
    factors, ranks = lowrank_factors(b, t, h, d)
    pos = (torch.arange(t, dtype=torch.int32) + 100).expand(b, t).contiguous() if keys else None
    rope = make_rope(d)
    ref = LowRankPart(factors, h, pos, tuple(ranks)).materialize(100, 148, rope)
    part = QuantizedLowRankPart.from_factors(
        factors, h, pos, tuple(ranks), coeff_bits=coeff_bits, basis_bits=basis_bits
    )
    out = part.materialize(100, 148, rope)
    assert out.shape == ref.shape == (b, h, t, d)
    assert rel(out, ref) < tol
    desc = part.describe()
    assert desc["codec"] == "lowrank_quant" and desc["coeff_bits"] == coeff_bits and desc["basis_bits"] == basis_bits
    assert desc["rank"] == factors.rank and desc["sample_ranks"] == list(ranks)
    exact_bytes = sum(x.numel() * x.element_size() for x in LowRankPart(factors, h, pos).tensors())
    assert storage_bytes(part.tensors()) < exact_bytes


def test_coeffs_along_tokens_beats_rank():
    """Groups along T (per component) beat groups along r at equal bytes: components differ in scale."""
    factors, _ = lowrank_factors(2, 128, 4, 16, seed=3)
    ref = factors.reconstruct()
    for bits in (8, 4):
        along_t = quantize(factors.coeffs, bits, 32, axis=1)
        along_r = quantize(factors.coeffs, bits, 32, axis=2)
        e_t = rel(dequantize(along_t) @ factors.basis, ref)
        e_r = rel(dequantize(along_r) @ factors.basis, ref)
        assert e_t < 0.7 * e_r


# ---- invalid arguments -----------------------------------------------------------------------------------------
X = torch.randn(2, 3, 8, 4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: quantize(X, 3, 32, -1), r"bits=3 .*one of \(2, 4, 8\)"),
        (lambda: quantize(X, 16, 32, -1), r"bits=16"),
        (lambda: quantize(X, True, 32, -1), r"bits=True"),
        (lambda: quantize(X, 4, 0, -1), r"group_size=0 .*integer >= 1"),
        (lambda: quantize(X, 4, 2.5, -1), r"group_size=2.5"),
        (lambda: quantize(X, 4, 32, 4), r"axis=4 .*\[-4, 3\]"),
        (lambda: quantize(X, 4, 32, -5), r"axis=-5"),
        (lambda: quantize(X.long(), 4, 32, -1), r"x=torch.int64 .*floating-point"),
        (lambda: quantize([1.0], 4, 32, -1), r"x='list'"),
        (lambda: quantize(torch.tensor(1.0), 4, 32, 0), r"x.shape=\(\)"),
        (lambda: quantize(torch.empty(2, 0), 4, 32, 0), r"x.shape=\(2, 0\)"),
        (lambda: quantize(torch.tensor([1.0, float("nan")]), 4, 32, 0), r"non-finite"),
        (lambda: quantize(torch.tensor([1.0, float("inf")]), 4, 32, 0), r"non-finite"),
        (lambda: quantize(torch.tensor([0.0, 1e6]), 4, 32, 0), r"float16 range"),
        (lambda: quantize_keys(torch.randn(3, 8, 4), 4, 32), r"k.shape=\(3, 8, 4\) .*\(B, H, T, d\)"),
        (lambda: quantize_values(torch.randn(3, 8, 4), 4, 32), r"v.shape"),
        (lambda: quantize_values(X, 1, 32), r"bits=1"),
        (lambda: quantize(X, 4, 32, 0).map_batch(lambda t: t), r"axis=0"),
        (lambda: QuantizedLowRankPart.from_factors(lowrank_factors()[0], 2, coeff_bits=2), r"coeff_bits=2 .*\(4, 8\)"),
        (
            lambda: QuantizedLowRankPart.from_factors(lowrank_factors()[0], 2, basis_bits=4),
            r"basis_bits=4 .*8, 16 or None",
        ),
        (lambda: QuantizedLowRankPart.from_factors(lowrank_factors()[0], 5), r"num_heads=5 .*divisor of D=32"),
        (lambda: QuantizedLowRankPart.from_factors(lowrank_factors()[0], 2, coeff_group=0), r"group_size=0"),
    ],
)
def test_invalid_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_quantized_is_dataclass_with_metadata():
    q = quantize(torch.randn(2, 3, 70, 5), 2, 32, axis=-2)
    assert isinstance(q, Quantized)
    assert (q.shape, q.dtype, q.axis, q.group_size, q.bits) == ((2, 3, 70, 5), torch.float32, 2, 32, 2)
    assert q.tensors() == [q.codes, q.scales, q.mins]
    assert dequantize(q.map_batch(lambda t: t[:1])).shape == (1, 3, 70, 5)


def test_quantize_widths_equal_one_width_at_a_time():
    x = torch.randn(2, 3, 70, 64, generator=torch.Generator().manual_seed(5))
    both = Q.quantize_widths(x, (8, 4, 2), 32, axis=2)
    for bits in (8, 4, 2):
        one = Q.quantize(x, bits, 32, axis=2)
        assert both[bits].bits == bits and both[bits].shape == one.shape
        for a, b in zip(both[bits].tensors(), one.tensors()):
            assert torch.equal(a, b)


def test_group_range_keeps_the_bits_of_aminmax():
    """amin/amax stand in for torch.aminmax (faster on CPU); where a group's extreme is a zero, the sign of zero
    aminmax picks is kept, so the stored minimums and scales do not change (padding rows: zeros of both signs)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 96, 32, generator=g)
    plain_lo, plain_hi = Q._group_range(x[:1])  # no zero extreme: amin/amax
    x[1] *= 0  # a padded sample: +0 and -0
    x[2] = (x[2] * (torch.rand(3, 96, 32, generator=g) < 0.5)).abs()  # groups with zero minimums
    x[3] = -x[2]  # and zero maximums
    for xs, (lo, hi) in ((x[:1], (plain_lo, plain_hi)), (x, Q._group_range(x))):
        ref_lo, ref_hi = torch.aminmax(xs, dim=-1)
        assert torch.equal(lo.view(torch.int32), ref_lo.view(torch.int32))
        assert torch.equal(hi.view(torch.int32), ref_hi.view(torch.int32))
